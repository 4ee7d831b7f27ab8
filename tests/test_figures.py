"""One source for each measured figure: the docs quote a figure as a link to the result file it comes from, with the
key in the link's title (`[1.18x](bench/results/cpu.json "ratios > recipe > median")`), or as the output of the
command written above it; each quote must match its source. Figures in other forms (a speed-up or a duration in
prose) and time claims in YAML comments, recipe docstrings and notebooks are refused: they drift."""

import json
import re
import shlex
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FIGURE = re.compile(r"\[([^\]]*)\]\(([^)\s]+\.json) \"([^\"]+)\"\)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
OUTPUT = re.compile(r"<!-- output: (.+?) -->\n```text\n(.*?)```", re.DOTALL)
# a figure written in prose instead of quoted: a speed-up ratio or a duration
LOOSE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? ?(?:s|seconds?|min|minutes?|hours?)\b")
TIME_CLAIM = re.compile(r"\b(?:\d+(?:\.\d+)? ?(?:s|seconds?|minutes?|hours?)|(?:half|about|under|a few|several) "
                        r"(?:a )?(?:minute|hour)s?)\b", re.IGNORECASE)


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def lookup(source: Path, key: str):
    value = json.loads(source.read_text())
    for part in key.split(" > "):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def quotes(doc: Path) -> list[tuple[str, Path, str]]:
    return [(text, (doc.parent / target).resolve(), key) for text, target, key in FIGURE.findall(doc.read_text())]


def prose(doc: Path) -> str:
    """The doc without code blocks, inline code, figure quotes and planner outputs: what is left is prose."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    text = FIGURE.sub("", text)
    return re.sub(r"`[^`]*`", "", text)


def test_the_docs_quote_figures():
    found = [q for doc in DOCS for q in quotes(doc)]
    assert len(found) >= 15
    assert {source.name for _, source, _ in found} >= {"cpu.json", "eval-cpu.json", "demo-cpu.json"}


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_quoted_figure_matches_its_source(doc):
    wrong = []
    for text, source, key in quotes(doc):
        value = lookup(source, key)
        [shown] = NUMBER.findall(text)
        if text.rstrip().endswith("%"):
            value *= 100
        decimals = len(shown.partition(".")[2])  # the figure as rounded for the page
        if f"{value:.{decimals}f}" != shown.replace(",", ""):
            wrong.append(f"{text!r} for {source.name}: {key} = {value}")
    assert not wrong, f"{doc_id(doc)} quotes figures its sources do not hold: {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_no_figure_is_written_in_prose(doc):
    loose = LOOSE.findall(prose(doc))
    assert not loose, f"{doc_id(doc)}: quote these as links to their result file: {loose}"


def test_yaml_comments_docstrings_and_notebooks_make_no_time_claims():
    """How long the demo takes is in bench/results/demo-cpu.md; nothing here has been timed on a GPU."""
    texts = {p: "\n".join(line.partition("#")[2] for line in p.read_text().splitlines())
             for p in (REPO_ROOT / "recipes" / "configs").glob("*.yaml")}
    texts.update({p: p.read_text().split('"""')[1] for p in (REPO_ROOT / "recipes").glob("*.py")})
    for p in (REPO_ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(p.read_text())["cells"]
        texts[p] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    claims = {doc_id(p): TIME_CLAIM.findall(text) for p, text in texts.items() if TIME_CLAIM.findall(text)}
    assert not claims, claims


# ---------------------------------------------------------------------------------------------------------------
# The memory planner's figures: the output of the command written above them
# ---------------------------------------------------------------------------------------------------------------
def test_planner_outputs_are_what_the_command_prints(capsys):
    from recipes.plan_memory import main

    text = (REPO_ROOT / "docs" / "performance.md").read_text()
    outputs = OUTPUT.findall(text)
    assert len(outputs) >= 2
    for command, shown in outputs:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "recipes/plan_memory.py"], command
        main(argv[2:])
        assert capsys.readouterr().out == shown, command


def planner_rows() -> list[str]:
    """The table of shipped architectures, from the planner: 4 x 2048 tokens, 16 sequences per device per step."""
    from lora_recipes.memory import GiB, Setup, architecture, largest_batch, plan, shipped_configs

    setup = Setup(mixed_precision="bf16", per_device_train_batch_size=4, gradient_accumulation_steps=4)
    models = ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "microsoft/Phi-3-mini-4k-instruct",
              "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "meta-llama/Llama-3.1-8B-Instruct",
              "google/gemma-2-9b-it", "meta-llama/Llama-3.1-70B-Instruct"]
    assert len(models) == len(shipped_configs())
    rows = []
    for model in models:
        arch = architecture(model)
        on, off = (plan(arch, replace(setup, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                      activation_checkpointing=c)) for c in (True, False))
        fits = [largest_batch(arch, setup, gib * GiB) for gib in (24, 80)]
        fits = ["does not fit" if f is None else f"{f[0]} x {f[1]}" for f in fits]
        rows.append(f"| {model} | {on.parts['weights'] / GiB:.2f} GiB | {on.peak / GiB:.1f} GiB | "
                    f"{off.peak / GiB:.1f} GiB | {fits[0]} | {fits[1]} |")
    return rows


def test_planner_table_is_what_the_planner_says():
    text = (REPO_ROOT / "docs" / "performance.md").read_text()
    table = text.split("<!-- planner table -->\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert table == planner_rows()


# ---------------------------------------------------------------------------------------------------------------
# The demo measurements (bench/demo.py)
# ---------------------------------------------------------------------------------------------------------------
def test_demo_results_cover_every_demo_and_are_shown_as_measured():
    from bench.demo import DEMOS, markdown

    results = json.loads((REPO_ROOT / "bench" / "results" / "demo-cpu.json").read_text())
    assert results["command"] == "python bench/demo.py" and results["machine"]["device"] == "cpu"
    assert list(results["demos"]) == list(DEMOS)
    for demo in results["demos"].values():
        runs = demo["runs"]
        assert len(runs) == results["rounds"] >= 2
        # seeded: every round logs the same losses; the times are the rounds' own
        assert {(r["first_loss"], r["last_loss"]) for r in runs} == {(demo["first_loss"], demo["last_loss"])}
        assert demo["last_loss"] < demo["first_loss"]
        assert demo["seconds_median"] == statistics.median(r["seconds"] for r in runs)
        assert demo["seconds_min"] <= demo["seconds_median"] <= demo["seconds_max"]
    assert (REPO_ROOT / "bench" / "results" / "demo-cpu.md").read_text() == markdown(results)
