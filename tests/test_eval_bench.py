"""The committed evaluation benchmark (the run docs/performance.md links) is complete and shown as measured, and
the benchmark still runs (`--quick`: the same report in miniature)."""

import json
import statistics
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from bench.eval_throughput import SCORERS, TASKS, markdown

RESULTS = REPO_ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def cpu_results():
    return json.loads((RESULTS / "eval-cpu.json").read_text())


def check_complete(results: dict, examples: int) -> None:
    assert set(results["tasks"]) == set(TASKS)
    for name, task in results["tasks"].items():
        assert task["examples"] == examples and task["requests"] == examples * task["options"], name
        assert task["same_picks"] and task["max_abs_difference"] < 1e-4, name  # the same numbers, faster
        for measured in task["rounds"]:
            assert set(measured) == set(SCORERS) and all(m["cpu_seconds"] > 0 for m in measured.values())
    assert [task["options"] for task in results["tasks"].values()] == [4, 5, 3]


def test_results_cover_every_task(cpu_results):
    assert cpu_results["command"] == "python bench/eval_throughput.py" and cpu_results["machine"]["device"] == "cpu"
    assert all(len(task["rounds"]) >= 5 for task in cpu_results["tasks"].values())
    check_complete(cpu_results, examples=10)


def test_ratios_follow_from_the_rounds(cpu_results):
    for task in cpu_results["tasks"].values():
        per_round = [r["option by option"]["cpu_seconds"] / r["prompt once"]["cpu_seconds"] for r in task["rounds"]]
        assert task["speed_up"]["rounds"] == pytest.approx(per_round)
        assert task["speed_up"]["median"] == pytest.approx(statistics.median(per_round))


def test_reading_each_prompt_once_is_faster_on_every_task(cpu_results):
    assert all(task["speed_up"]["median"] > 1 for task in cpu_results["tasks"].values())


def test_quick_run_writes_the_same_report(tmp_path):
    proc = subprocess.run([sys.executable, "bench/eval_throughput.py", "--quick", "--output_dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [(table, results)] = [(path.read_text(), json.loads(path.with_suffix(".json").read_text()))
                          for path in tmp_path.glob("eval-*-quick.md")]
    assert table == markdown(results) and table in proc.stdout
    check_complete(results, examples=4)


def test_the_docs_link_the_committed_run_and_copy_none_of_it(cpu_results):
    """One source: bench/results/eval-cpu.md is the report of eval-cpu.json; the docs link it and quote single figures
    from the JSON (tests/test_figures.py), never a copy of its rows."""
    report = markdown(cpu_results)
    assert (RESULTS / "eval-cpu.md").read_text() == report
    docs = {path: path.read_text() for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]}
    assert "(../bench/results/eval-cpu.md)" in docs[REPO_ROOT / "docs" / "performance.md"]
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    copied = [(path.name, row) for path, text in docs.items() for row in rows if row in text]
    assert not copied, f"the docs copy rows of bench/results/eval-cpu.md: {copied}"
