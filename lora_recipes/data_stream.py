"""Local files of any size, and sources streamed instead of stored.

Staging (`stage_file`): a local file is copied into an Arrow file on disk one batch at a time (JSON lines as their
text, line by line; Parquet and CSV as their record batches), and `data.prepare_data` converts it from there in
batches, in worker processes where the rows repay them. Memory stays a batch of rows, whatever the size of the file;
the converted rows stay on disk, memory-mapped.
"""

import atexit
import json
import shutil
import tempfile
from itertools import islice
from pathlib import Path

from .data import (
    _decode,
    _read_json_array,
    _read_labelled_lines,
    _starts_with,
    json_line_texts,
    parse_json_line,
    table_batches,
)
from .errors import RecipeError

STAGE_BATCH_ROWS = 10_000  # rows of a local file written to Arrow at a time


def temporary_work_dir() -> Path:
    """A folder for staged and converted sources, removed when the process exits (the datasets prepared from it are
    memory-mapped until then; `distributed.prepare_data_once` saves its own copy for training)."""
    path = Path(tempfile.mkdtemp(prefix="lora-recipes-data-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _write_batches(batches, path: Path):
    """Record batches into an Arrow stream file (the format `Dataset.from_file` memory-maps); None when none came."""
    import pyarrow as pa

    writer = None
    try:
        for batch in batches:
            if writer is None:
                writer = pa.ipc.new_stream(str(path), batch.schema)
            writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
    return writer


def _json_batches(numbered_texts, max_rows: int | None):
    """(line, json) record batches of STAGE_BATCH_ROWS numbered JSON texts."""
    import pyarrow as pa

    numbered_texts = islice(numbered_texts, max_rows)
    while chunk := list(islice(numbered_texts, STAGE_BATCH_ROWS)):
        numbers, texts = zip(*chunk, strict=True)
        yield pa.record_batch([pa.array(numbers, pa.int64()), pa.array(texts, pa.large_string())],
                              names=["line", "json"])


def _limited(batches, max_rows: int | None):
    """Record batches cut off after `max_rows` rows."""
    left = max_rows
    for batch in batches:
        if left is not None and batch.num_rows >= left:
            if left:
                yield batch.slice(0, left)
            return
        left = None if left is None else left - batch.num_rows
        yield batch


def stage_file(file: Path, work_dir: Path, max_rows: int | None = None):
    """One local file as an Arrow dataset on disk, and the columns of its rows (for `detect_schema`): `.parquet` and
    `.csv` with their own columns, batch by batch; JSON lines as `line` (number) and `json` (text), line by line,
    parsed when converted; a `.json` array and `.txt` labelled lines (read whole: their format has no rows to stream)
    as the same `line`/`json` columns."""
    from datasets import Dataset

    path = Path(tempfile.mkdtemp(prefix=f"{file.stem[:40]}-", dir=work_dir)) / "rows.arrow"
    if file.suffix in (".csv", ".parquet"):
        batches = _limited(table_batches(file), max_rows)
    else:
        if file.suffix == ".txt":
            numbered = ((i, json.dumps(row)) for i, row in enumerate(_read_labelled_lines(file), start=1))
        elif file.suffix == ".json" and _starts_with(file, "["):
            numbered = ((i, json.dumps(row)) for i, row in enumerate(_read_json_array(file, _decode(file)), start=1))
        else:
            numbered = json_line_texts(file)
        batches = _json_batches(numbered, max_rows)
    if _write_batches(batches, path) is None:
        raise RecipeError(f"{file}: the file has no rows")
    staged = Dataset.from_file(str(path))
    if not len(staged):
        raise RecipeError(f"{file}: the file has no rows")
    if staged.column_names == ["line", "json"]:
        first = staged[0]
        return staged, parse_json_line(file, first["line"], first["json"]).keys()
    return staged, staged.column_names
