"""Reading local JSON lines one line at a time and Parquet one record batch at a time: a quick look reads only the
rows it takes, and every error still names the file, the line (or row) and, for bytes that are not UTF-8, their
offset in the file."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import medical
from lora_recipes import data as data_module
from lora_recipes.data import numbered_json_lines, prepare_data
from lora_recipes.errors import RecipeError


def card(i: int) -> str:
    return json.dumps({"input": f"What is sign {i}?", "output": f"Sign {i} is a finding."}) + "\n"


def test_a_quick_look_reads_only_the_rows_it_takes(tmp_path):
    path = tmp_path / "cards.jsonl"
    path.write_text(card(1) + "\n" + card(2) + card(3) + "{cut off")  # a blank line, then a bad line 5

    quick = prepare_data([str(path)], medical.SCHEMAS, eval_fraction=0.0, max_rows_per_source=2)

    assert (quick.sources[0].read, quick.train["messages"][1][-1]["content"]) == (2, "Sign 2 is a finding.")
    with pytest.raises(RecipeError, match=r"cards.jsonl: line 5: invalid JSON \(Expecting property name"):
        prepare_data([str(path)], medical.SCHEMAS)


def test_bytes_that_are_not_utf8_are_named_by_line_and_file_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    third = '{"input": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    path.write_bytes(card(1).encode() + card(2).encode() + third)
    offset = len(card(1)) + len(card(2)) + third.index(b"\xe9")
    with pytest.raises(RecipeError, match=rf"^{path}: line 3: bytes that are not UTF-8 at offset {offset} "):
        numbered_json_lines(path)


def test_a_byte_order_mark_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + card(1).encode() + b"\n  \n" + card(2).encode())
    assert [(number, row["input"]) for number, row in numbered_json_lines(path)] == [
        (1, "What is sign 1?"), (4, "What is sign 2?")]


def test_parquet_is_read_in_record_batches_with_rows_numbered_across_them(tmp_path, monkeypatch):
    rows = [json.loads(card(i)) for i in range(5)]
    path = tmp_path / "cards.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    batches, iter_batches = [], pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    monkeypatch.setattr(data_module, "PARQUET_BATCH_ROWS", 2)

    data = prepare_data([str(path)], medical.SCHEMAS, eval_fraction=0.0)

    assert batches == [2, 2, 1]
    assert sorted(m[-1]["content"] for m in data.train["messages"]) == sorted(r["output"] for r in rows)
    pq.write_table(pa.Table.from_pylist(rows[:4] + [{"input": "What is sign 5?", "output": None}]), path)
    with pytest.raises(RecipeError, match=r"cards.parquet: row 5: field 'output': expected str, got null$"):
        prepare_data([str(path)], medical.SCHEMAS)
