"""Local files of any size, and sources streamed instead of stored.

Staging (`stage_file`): a local file is copied into an Arrow file on disk one batch at a time (JSON lines as their
text, line by line; Parquet and CSV as their record batches), and `data.prepare_data` converts it from there in
batches, in worker processes where the rows repay them. Memory stays a batch of rows, whatever the size of the file;
the converted rows stay on disk, memory-mapped.

Streaming (`stream_data`, `streaming: true`): nothing is stored; the training sources are read, converted and
validated as training consumes them, for `max_steps` steps, with a fixed number of held-out eval rows.
"""

import atexit
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path

from .data import (
    HubUnreachable,
    Schema,
    Source,
    SourceReport,
    _convert,
    _decode,
    _read_json_array,
    _read_labelled_lines,
    _starts_with,
    detect_schema,
    iter_file,
    json_line_texts,
    local_files,
    parse_json_line,
    resolve_sources,
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


# ---------------------------------------------------------------------------------------------------------------
# Streaming: rows converted as training reads them
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StreamedData:
    """A streamed training set, the eval rows held out of it, and what was read (`sources`, counted as the stream is
    read: rows read, kept, dropped by reason, held out for eval, trained on)."""

    train: "datasets.IterableDataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    sources: list[SourceReport]

    def summary(self) -> str:
        return "\n".join(f"{s.source}: streamed, {s.read} rows read so far, {s.eval} held out for eval"
                         for s in self.sources)


def _source_rows(source: Source, schemas: list[Schema], seed: int):
    """The converted rows of one source as it is read (`data._convert`: the same validation and converters, errors
    naming the file and row, or the Hub source and row): a local file or folder one file at a time, a Hub split
    through `datasets` streaming."""
    if source.path is not None:
        if not source.path.exists():
            raise RecipeError(f"{source.text}: no such local file or folder (and not a Hub dataset id 'owner/name')")
        for file in local_files(source.path):
            rows = iter_file(file)
            first = next(rows, None)
            if first is None:
                raise RecipeError(f"{file}: the file has no rows")
            schema = detect_schema(first.keys(), schemas, str(file))
            for index, row in enumerate(chain([first], rows)):
                yield _convert(row, index, schema, str(file), 1, seed)
        return
    from datasets import load_dataset

    try:
        rows = iter(load_dataset(source.repo_id, name=source.config, split=source.split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # datasets and huggingface_hub raise many types for "offline" and "not found"
        raise HubUnreachable(f"{source}: could not stream it from the Hugging Face Hub "
                             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
                             ) from None
    if first is None:
        raise RecipeError(f"{source}: the split has no rows")
    schema = detect_schema(first.keys(), schemas, str(source))
    for index, row in enumerate(chain([first], rows)):
        yield _convert(row, index, schema, str(source), 1, seed)


def _mixed(sources: list[Source], schemas: list[Schema], seed: int, reports: list[SourceReport]):
    """(source index, converted row) from every source in turn (or, with weights, a seeded draw in proportion to
    them) until all are read; counts each row read."""
    import random

    streams = {i: _source_rows(s, schemas, seed) for i, s in enumerate(sources)}
    rng = random.Random(seed)
    turn = 0
    while streams:
        live = list(streams)
        if sources[0].weight is not None:
            i = rng.choices(live, weights=[sources[j].weight for j in live])[0]
        else:
            i, turn = live[turn % len(live)], turn + 1
        row = next(streams[i], None)
        if row is None:
            del streams[i]
            continue
        reports[i].read += 1
        yield i, row


def _eval_side(row: dict, eval_fraction: float) -> bool:
    """The split rule of `data.prepare_data`: the seeded position of the row's group, else of its prompt."""
    return row["split_position"] < eval_fraction


def stream_data(sources: list[str], schemas: list[Schema], eval_fraction: float, eval_rows: int, seed: int = 42,
                eval_only=()) -> StreamedData:
    """The training sources streamed: each row converted and validated as training reads it.

    The eval split is the first `eval_rows` rows of the stream whose prompt (or group) hashes into eval
    (`split_position` < eval_fraction, the rule of the stored split); training skips every row that hashes there, not
    only those, so a prompt never reaches both sides, whatever the source or the order. There is no deduplication
    (it would hold a digest per row of an endless stream), and `weight=W` draws the sources in proportion to their
    weights (`fraction=F` needs the source's size: refused).
    """
    from datasets import Dataset, DatasetInfo, Features, IterableDataset, List, Value
    from datasets.iterable_dataset import ExamplesIterable

    train_sources, _ = resolve_sources(sources, eval_only=eval_only)
    fractions = [s.text for s in train_sources if s.fraction is not None]
    if fractions:
        raise RecipeError(f"{', '.join(fractions)}: fraction=F needs the source's size, which a stream does not "
                          "know: use weight=W, or streaming false")
    reports = [SourceReport(source=str(s), schema="streamed", mixture=s.mixture) for s in train_sources]

    held_out = []
    if eval_rows and eval_fraction > 0:
        counting = [SourceReport(source=r.source, schema=r.schema) for r in reports]  # this pass is not training
        for i, row in _mixed(train_sources, schemas, seed, counting):
            if not row["drop_reason"] and _eval_side(row, eval_fraction):
                held_out.append({"messages": row["messages"], "schema": row["schema"]})
                reports[i].eval += 1
                if len(held_out) == eval_rows:
                    break

    def train_rows():
        # each pass counts afresh: TRL peeks at the first row before training, and training reads the stream last
        for report in reports:
            report.read = report.kept = report.train = 0
            report.dropped = {}
        for i, row in _mixed(train_sources, schemas, seed, reports):
            report = reports[i]
            if row["drop_reason"]:
                report.dropped[row["drop_reason"]] = report.dropped.get(row["drop_reason"], 0) + 1
            elif _eval_side(row, eval_fraction):
                report.dropped["eval split"] = report.dropped.get("eval split", 0) + 1
            else:
                report.kept += 1
                report.train += 1
                yield f"{i}-{report.read}", {"messages": row["messages"]}

    features = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
    # one shard: under DDP, accelerate then gives each rank its own batches of the one stream (IterableDatasetShard)
    train = IterableDataset(ExamplesIterable(lambda: train_rows(), {}), info=DatasetInfo(features=features))
    return StreamedData(train=train, eval=Dataset.from_list(held_out) if held_out else None, sources=reports)


def write_stream_card(output_dir, data: StreamedData) -> None:
    """The data card of a streamed run, written after training: what was read from each source (on every rank: each
    reads the stream and trains on its own batches), what was dropped and why, how many rows the eval split holds."""
    from .data_card import CARD_JSON, CARD_MD
    from .run_card import write_json

    sources = [asdict(s) for s in data.sources]
    total = {key: sum(s[key] for s in sources) for key in ("read", "kept", "eval")}
    write_json(Path(output_dir) / CARD_JSON, {"streaming": True, "sources": sources, "total": total,
                                              "eval_rows": len(data.eval) if data.eval is not None else 0})
    lines = ["# Data card (streamed)", "",
             "Rows read from each source in the last pass over the stream, by the end of training (the loader reads a "
             "batch ahead of the last step); `kept` went to training, `eval` was held out before training. Streamed "
             "rows are not deduplicated.", "",
             "| source | read | kept | eval | dropped |", "|---|---|---|---|---|"]
    for s in sources:
        dropped = ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items()) or "-"
        lines.append(f"| {s['source']} | {s['read']} | {s['kept']} | {s['eval']} | {dropped} |")
    (Path(output_dir) / CARD_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
