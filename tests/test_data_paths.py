"""A local file and the Arrow table a Hub id loads to go through different code (a plain Python pass that names the
bad line, and `Dataset.map` that can use `num_proc`): every schema of every domain must come out the same."""

import importlib

import pytest
from conftest import REPO_ROOT
from datasets import Dataset

from bench.train_throughput import synthetic_rows
from lora_recipes import data as data_module
from lora_recipes.data import MIN_ROWS_PER_PROCESS_POOL, prepare_data, worth_processes

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
