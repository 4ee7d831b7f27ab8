"""Streaming (`streaming: true`): the training sources are converted and validated as training reads them, the eval
split is a fixed number of held-out rows that training never sees, and under DDP each rank trains on its own rows."""

import json
import os
from collections import Counter

import pytest
from conftest import SAMPLES, log_history, run_recipe_in_process
from test_distributed import run_torchrun

from data import medical
from lora_recipes.data import _load_source, _position, content_key, parse_source, prompt_key
from lora_recipes.data_stream import stream_data
from lora_recipes.errors import RecipeError

FOLDER = SAMPLES / "medical"
SMOKE = ["--config", "recipes/configs/medical_smoke.yaml", "--dataset_name", str(FOLDER), "--streaming", "true",
         "--eval_after_training", "false", "--save_strategy", "no", "--logging_steps", "1"]


def stream_order(eval_fraction: float, seed: int) -> list[tuple[str, str]]:
    """Each row of the folder in stream order, converted without streaming: (side, prompt), side 'train', 'eval' (its
    prompt's seeded position is below eval_fraction) or the converter's reason to drop it."""
    rows = []
    for file in sorted(FOLDER.glob("*.jsonl")):
        converted, _ = _load_source(parse_source(str(file)), medical.SCHEMAS, None, None, seed)
        for row in converted:
            prompt = prompt_key(row["messages"])
            in_eval = _position(prompt or content_key(row["messages"]), seed) < eval_fraction
            rows.append((row["drop_reason"] or ("eval" if in_eval else "train"), prompt))
    return rows


def test_the_streamed_eval_rows_are_held_out_of_training():
    data = stream_data([str(FOLDER)], medical.SCHEMAS, eval_fraction=0.1, eval_rows=10, seed=7)
    trained = [prompt_key(row["messages"]) for row in data.train]
    held_out = [prompt_key(m) for m in data.eval["messages"]]

    rows = stream_order(0.1, 7)
    train = [prompt for side, prompt in rows if side == "train"]
    eval_side = [prompt for side, prompt in rows if side == "eval"]
    assert held_out == eval_side[:10]  # the first 10 of the stream that hash into eval
    assert trained == train and not set(trained) & set(eval_side)
    [report] = data.sources
    assert (report.read, report.kept, report.eval) == (len(rows), len(train), 10)
    assert report.dropped == Counter("eval split" if side == "eval" else side for side, _ in rows if side != "train")


def test_a_streamed_row_with_a_bad_field_names_file_and_row(tmp_path):
    (tmp_path / "cards.jsonl").write_text('{"input": "What is A?", "output": "A."}\n{"input": "What is B?", '
                                          '"output": 3}\n')
    data = stream_data([str(tmp_path)], medical.SCHEMAS, eval_fraction=0.0, eval_rows=0)
    with pytest.raises(RecipeError, match=r"cards\.jsonl: row 2: field 'output': expected str, got int$"):
        list(data.train)


def test_streaming_needs_max_steps(monkeypatch, capsys):
    code, _, err = run_recipe_in_process(monkeypatch, capsys, *SMOKE, "--max_steps", "-1", "--output_dir", "x")
    assert code == 2 and "streaming needs max_steps > 0" in err and len(err.strip().splitlines()) == 1


def test_a_local_folder_streams_end_to_end(monkeypatch, capsys, tmp_path):
    code, _, err = run_recipe_in_process(monkeypatch, capsys, *SMOKE, "--max_steps", "3", "--eval_steps", "3",
                                         "--streaming_eval_rows", "8", "--output_dir", str(tmp_path))
    assert code == 0, err[-3000:]

    history = log_history(tmp_path)
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3] and any("eval_loss" in e for e in history)
    card = json.loads((tmp_path / "data_card.json").read_text())
    # 3 steps of 8 rows, and the batch the loader reads ahead: 32 training rows, read from the stream's first rows
    sides = [side for side, _ in stream_order(0.1, 42)]
    read = next(n for n in range(len(sides)) if sides[:n].count("train") == 32)
    [source] = card["sources"]
    assert card["streaming"] and card["eval_rows"] == 8
    assert (source["read"], source["kept"], source["eval"]) == (read, 32, 8)
    dropped = Counter("eval split" if side == "eval" else side for side in sides[:read] if side != "train")
    assert source["dropped"] == dropped
    assert json.loads((tmp_path / "run_card.json").read_text())["config"]["data"]["streaming"] is True


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_rows_of_the_stream(tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "cards.jsonl").write_text("".join(json.dumps({"input": f"What is sign {i}?", "output": f"Sign {i} is a "
                                                           "finding."}) + "\n" for i in range(64)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = run_torchrun(["tests/distributed_probes.py", "--record_rows", *SMOKE, "--dataset_name", str(cards),
                         "--max_steps", "4", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                         "--eval_fraction", "0", "--streaming_eval_rows", "0", "--output_dir", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [(out / f"rows-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    # 4 steps x 4 rows on each rank, every row distinct (the 64 rows are), none trained on both ranks
    assert [len(set(rows)) for rows in ranks] == [16, 16] and not set(ranks[0]) & set(ranks[1])
