"""A local file and the Arrow table a Hub id loads to go through different code (a plain Python pass that names the
bad line, and `Dataset.map` that can use `num_proc`): every schema of every domain must come out the same. And the
one syntax that names a source, with the split each kind of source reads (the Hub replaced by a recording fake)."""

import importlib
import json
import re

import pytest
from conftest import REPO_ROOT
from datasets import Dataset

from bench.train_throughput import synthetic_rows
from data import finance, legal, medical
from lora_recipes import data as data_module
from lora_recipes.config import parse_args
from lora_recipes.data import MIN_ROWS_PER_PROCESS_POOL, parse_source, prepare_data, worth_processes
from lora_recipes.errors import RecipeError
from lora_recipes.evaluation import parse_hub_source
from lora_recipes.sft import main

SAMPLES = REPO_ROOT / "data" / "samples"
ROWS = 1200


def sample_files():
    return [(domain, path) for domain in ("medical", "legal", "finance")
            for path in sorted((SAMPLES / domain).iterdir()) if path.suffix in (".jsonl", ".txt")]


@pytest.mark.parametrize(("domain", "sample"), sample_files(), ids=lambda x: getattr(x, "name", x))
def test_local_file_and_hub_table_prepare_alike(domain, sample, tmp_path, monkeypatch):
    schemas = importlib.import_module(f"data.{domain}").SCHEMAS
    path = synthetic_rows(sample, ROWS, tmp_path / f"{sample.stem}.jsonl")
    table = Dataset.from_json(str(path), cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "load_hub_train_split", lambda *_: table)
    monkeypatch.setattr(data_module, "MIN_ROWS_PER_PROCESS_POOL", 1000)  # so that two processes do convert

    local = prepare_data([str(path)], schemas, eval_fraction=0.1)
    hub = prepare_data([f"synthetic/{sample.stem}"], schemas, eval_fraction=0.1, num_proc=2)

    assert local.sources[0].schema == hub.sources[0].schema
    assert (local.sources[0].kept, local.sources[0].dropped) == (hub.sources[0].kept, hub.sources[0].dropped)
    assert local.sources[0].kept + sum(local.sources[0].dropped.values()) == ROWS
    assert local.train["messages"] == hub.train["messages"] and local.eval["messages"] == hub.eval["messages"]
    assert 0 < len(local.eval) < len(local.train)


def test_worker_processes_only_where_the_rows_repay_them():
    assert worth_processes(4, 220) is None  # the demo's rows: starting 4 processes costs more than it saves
    assert worth_processes(4, MIN_ROWS_PER_PROCESS_POOL) == 4
    assert worth_processes(1, 10**6) is None and worth_processes(None, 10**6) is None


# ---------------------------------------------------------------------------------------------------------------
# Naming a source: one syntax for training sources, eval sources and the evaluation sets
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_calls(monkeypatch):
    """`datasets.load_dataset` replaced: records (id, config, split) and returns flashcard rows that name them."""
    import datasets

    calls = []

    def load_dataset(repo_id, name=None, split=None):
        calls.append((repo_id, name, split))
        return Dataset.from_list([{"input": f"{repo_id} {name} {split}: question {i}?", "output": f"Answer {i}."}
                                  for i in range(20)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("source, config, split", [
    ("someone/cases", None, "train"),
    ("someone/cases:en", "en", "train"),
    ("someone/cases@validation", None, "validation"),
    ("someone/cases:en@validation", "en", "validation"),
])
def test_a_training_source_reads_the_split_it_names_else_train(hub_calls, source, config, split):
    data = prepare_data([source], medical.SCHEMAS, eval_fraction=0.0)
    assert hub_calls == [("someone/cases", config, split)]
    assert len(data.train) == 20 and data.sources[0].source == f"someone/cases{':en' if config else ''}@{split}"


@pytest.mark.parametrize("source, config, split", [
    ("someone/cases", None, "test"),  # no @SPLIT: a held-out split, never train
    ("someone/cases:en", "en", "test"),
    ("someone/cases@validation", None, "validation"),
    ("GBaker/MedQA-USMLE-4-options", None, "test"),  # a standard set: its own evaluation split
    ("openlifescienceai/medmcqa", None, "validation"),  # (its test split has no labels)
])
def test_an_eval_source_reads_a_held_out_split(hub_calls, source, config, split):
    standard_splits = {eval_set.source: eval_set.split for eval_set in medical.EVAL_SETS}
    data = prepare_data(["owner/train-set"], medical.SCHEMAS, eval_sources=[source], standard_splits=standard_splits)
    assert hub_calls == [(re.split("[:@]", source)[0], config, split), ("owner/train-set", None, "train")]
    assert (len(data.train), len(data.eval)) == (20, 20)
    assert parse_hub_source(source, medical)[2] == split  # recipes/evaluate.py reads the same split


def test_the_recipe_evaluates_eval_dataset_name_on_its_held_out_split(hub_calls, tmp_path):
    args = parse_args(REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml", [
        "--output_dir", str(tmp_path), "--data_card_only", "true", "--dataset_name", "owner/train-set",
        "--eval_dataset_name", "GBaker/MedQA-USMLE-4-options", "openlifescienceai/medmcqa"])
    main(medical, *args)
    assert sorted(hub_calls) == [("GBaker/MedQA-USMLE-4-options", None, "test"),
                                 ("openlifescienceai/medmcqa", None, "validation"), ("owner/train-set", None, "train")]
    card = json.loads((tmp_path / "data_card.json").read_text())
    assert (card["total"]["train"], card["total"]["eval"]) == (20, 40)


@pytest.mark.parametrize("train, held_out", [
    (["someone/cases@test"], ["someone/cases"]),  # both read test
    (["someone/cases"], ["someone/cases@train"]),
    (["someone/cases:en@validation"], ["someone/cases:en@validation"]),
])
def test_the_same_source_and_split_on_both_sides_is_refused(hub_calls, train, held_out):
    with pytest.raises(RecipeError, match=r"named both to train on and to evaluate on"):
        prepare_data(train, medical.SCHEMAS, eval_sources=held_out)
    assert hub_calls == []  # refused before anything loads


def test_an_eval_only_set_is_refused_whatever_split_it_names(hub_calls, tmp_path):
    args = parse_args(REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml", [
        "--output_dir", str(tmp_path), "--data_card_only", "true"])
    for source in ("qiaojin/PubMedQA:pqa_labeled", "qiaojin/PubMedQA:pqa_labeled@train",
                   "qiaojin/PubMedQA:pqa_labeled@test"):
        args[0].dataset_name = [source]
        with pytest.raises(RecipeError, match=r"evaluation-only \(qiaojin/PubMedQA:pqa_labeled\), never trained on"):
            main(medical, *args)
    assert hub_calls == []
    # PubMedQA's other configs are training sets
    assert prepare_data(["qiaojin/PubMedQA:pqa_artificial"], medical.SCHEMAS, eval_fraction=0.0,
                        eval_only=medical.EVAL_ONLY).sources[0].source == "qiaojin/PubMedQA:pqa_artificial@train"


@pytest.mark.parametrize("source, expected", [
    ("coastalcph/lex_glue:case_hold:validation", r"name the split with '@': coastalcph/lex_glue:case_hold@validation"),
    ("someone/cases@", r"not a source name; sources are ID, ID:CONFIG, ID@SPLIT or ID:CONFIG@SPLIT"),
    ("someone/cases:@test", r"not a source name"),
    ("someone/:en", r"not a source name"),
    ("someone/cases@test@validation", r"not a source name"),
])
def test_a_malformed_source_name_is_a_one_line_error(hub_calls, source, expected):
    with pytest.raises(RecipeError, match=expected) as error:
        prepare_data([source], medical.SCHEMAS)
    assert str(error.value).startswith(f"{source}: ") and "\n" not in str(error.value) and hub_calls == []


def test_every_hub_source_the_docs_and_configs_show_parses():
    files = [REPO_ROOT / "README.md", *(REPO_ROOT / "data").glob("*.py"), *(REPO_ROOT / "recipes" / "configs").glob(
        "*.yaml"), *(REPO_ROOT / "notebooks").glob("*.ipynb"), *(REPO_ROOT / "docs").glob("*.md")]
    named = {match for path in files
             for match in re.findall(r"[\w.-]+/[\w.-]+(?::[\w.:-]+|@[\w.-]+)+", path.read_text(encoding="utf-8"))}
    named |= {s for domain in (medical, legal, finance) for s in domain.EVAL_ONLY}
    named |= {s.source for domain in (medical, legal, finance) for s in getattr(domain, "EVAL_SETS", ())}
    assert "coastalcph/lex_glue:case_hold" in named and len(named) >= 5
    for source in sorted(named):
        parsed = parse_source(source)
        assert parsed.path is None and parsed.repo_id.count("/") == 1, source


def test_a_missing_local_file_named_for_evaluation_says_so(hub_calls):
    from lora_recipes.evaluation import named_tasks

    with pytest.raises(RecipeError, match=r"^missing\.jsonl: no such local file or folder"):
        named_tasks(["missing.jsonl"], medical, None, [])
    with pytest.raises(RecipeError, match=r"^an empty source name"):
        prepare_data([""], medical.SCHEMAS)
    assert hub_calls == []
