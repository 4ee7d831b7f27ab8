"""The committed benchmark results (the run docs/performance.md links) are complete, consistent, and shown as
measured; and the benchmark still runs (`--quick`: every section in miniature, same report)."""

import importlib
import json
import statistics
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from bench.train_throughput import BASELINE, PHASES, launch_markdown, launch_ratio, markdown
from lora_recipes.data import MIN_ROWS_PER_PROCESS_POOL

RESULTS = REPO_ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def cpu_results():
    return json.loads((RESULTS / "cpu.json").read_text())


def check_complete(r: dict, rows: int, variants: bool = True) -> None:
    trainers = r["trainers"]
    assert {BASELINE, "recipe"} <= set(trainers) and set(r["ratios"]) == set(trainers) - {BASELINE}
    for t in trainers.values():
        assert t["rounds"] and t["tokens_per_cpu_s"] > 0 and t["peak_memory_bytes"] > 0
    if variants:
        packed = next(t for name, t in trainers.items() if "packing" in name)
        assert packed["padding_waste"] == 0 < trainers["recipe"]["padding_waste"]
    # every source schema of every domain, from a local file and from a Hub-style table with num_proc 1 and 2
    measured = {(d["domain"], d["schema"], d["source"], d["num_proc"]) for d in r["data_preparation"]}
    expected = {(domain, schema.name, source, num_proc)
                for domain in ("medical", "legal", "finance")
                for schema in importlib.import_module(f"data.{domain}").SCHEMAS if schema.name != "messages"
                for source, num_proc in (("local file", None), ("Hub table", 1), ("Hub table", 2))}
    assert measured == expected
    assert all(d["rows"] == rows and d["kept"] + sum(d["dropped"].values()) == d["rows"]
               for d in r["data_preparation"])
    for run in r["launch"]["recipe"]:
        assert [run[phase] for phase, _ in PHASES] == sorted(run[phase] for phase, _ in PHASES)


def check_launches(launches: dict) -> None:
    """As many launches of each, every phase after the one before on both clocks, the first step of each measured."""
    assert len(launches["recipe"]) == len(launches[BASELINE]) > 0
    for run in launches["recipe"]:
        assert [run[phase] for phase, _ in PHASES] == sorted(run[phase] for phase, _ in PHASES)
        cpu = [run["cpu_seconds"][phase] for phase, _ in PHASES]
        assert cpu == sorted(cpu) and cpu[0] > 0
    assert all(0 < run["cpu_seconds"]["first optimizer step"] for run in launches[BASELINE])


def test_results_cover_every_section(cpu_results):
    assert cpu_results["command"] == "python bench/train_throughput.py" and cpu_results["machine"]["device"] == "cpu"
    assert all(len(t["rounds"]) >= 5 for t in cpu_results["trainers"].values())
    check_complete(cpu_results, rows=100_000)


@pytest.mark.slow
def test_quick_run_writes_the_same_report(tmp_path):
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--quick", "--output_dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [report] = tmp_path.glob("*-quick.json")
    results = json.loads(report.read_text())
    check_complete(results, rows=MIN_ROWS_PER_PROCESS_POOL, variants=False)
    check_launches(results["launch"])
    local = [d for d in results["data_preparation"] if d["source"] == "local file"]
    assert all(d["file_bytes"] > 0 and d["peak_memory_bytes"] > 0 for d in local)
    assert report.with_suffix(".md").read_text() == markdown(results) and not list(tmp_path.glob("*.partial.json"))


def test_ratios_follow_from_the_rounds(cpu_results):
    trainers = cpu_results["trainers"]
    for name, ratio in cpu_results["ratios"].items():
        per_round = [(a["tokens"] / a["cpu_seconds"]) / (b["tokens"] / b["cpu_seconds"])
                     for a, b in zip(trainers[name]["rounds"], trainers[BASELINE]["rounds"], strict=True)]
        assert ratio["rounds"] == pytest.approx(per_round)
        assert ratio["median"] == pytest.approx(statistics.median(per_round))


def test_recipe_is_not_slower_than_bare_trl(cpu_results):
    assert cpu_results["ratios"]["recipe"]["median"] >= 1.0


def test_the_docs_link_the_committed_table_and_copy_none_of_it(cpu_results):
    """One source: bench/results/cpu.md is the report of cpu.json; the docs link it and quote single figures from the
    JSON (tests/test_figures.py), never a copy of its rows."""
    table = markdown(cpu_results)
    assert (RESULTS / "cpu.md").read_text() == table
    docs = {path: path.read_text() for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]}
    assert "(../bench/results/cpu.md)" in docs[REPO_ROOT / "docs" / "performance.md"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    copied = [(path.name, row) for path, text in docs.items() for row in rows if row in text]
    assert not copied, f"the docs copy rows of bench/results/cpu.md: {copied}"


def test_launch_results_are_complete_and_shown_as_measured():
    results = json.loads((RESULTS / "launch-cpu.json").read_text())
    assert results["command"].startswith("python bench/train_throughput.py --launch")
    check_launches(results["launch"])
    assert len(results["launch"]["recipe"]) >= 5
    assert results["launch_ratio"] == pytest.approx({"wall": launch_ratio(results["launch"]),
                                                     "cpu": launch_ratio(results["launch"], "cpu")})
    assert (RESULTS / "launch-cpu.md").read_text() == launch_markdown(results)


def test_a_2gb_local_file_was_prepared_in_bounded_memory():
    """bench/data_memory.py's committed run: ~2 GB of JSON lines (chat rows) prepared with every process's peak
    resident set under 2 GB, every row read and kept (distinct), shown as measured."""
    from bench import data_memory

    results = json.loads((RESULTS / "data-scale-cpu.json").read_text())
    assert (RESULTS / "data-scale-cpu.md").read_text() == data_memory.markdown(results)
    for run in results["runs"]:
        assert run["file_bytes"] >= 1.9 * 2**30 and run["kept"] == run["rows"] > 400_000
        assert run["peak_rss"] < 2 * 2**30 and run["peak_child_rss"] < 2 * 2**30
