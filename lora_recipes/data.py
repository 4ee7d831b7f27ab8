"""Load, validate, convert, deduplicate and split the sources of a domain.

A domain module (`data/medical.py`, ...) declares its source schemas; everything else happens here, once for
every domain:

    source (a local file or folder, or a Hub dataset `ID`, `ID:CONFIG`, `ID@SPLIT`, `ID:CONFIG@SPLIT`: one syntax,
            parsed by `parse_source`, for training sources, eval sources and the evaluation sets)
      -> rows read (.jsonl, .json array or lines, .csv, .parquet, `sentence@label` .txt lines, or the Hub split: the
         one named, else `train` for training and the held-out split for evaluation, see `held_out_split`)
      -> schema detected from the columns
      -> each row validated (missing or wrong-typed field: an error naming source, row and field)
      -> converted to {"messages": [...]} by the schema's pure function (rows dropped on purpose are counted)
      -> deduplicated on content across all sources
      -> split into train/eval by a seeded hash of the prompt (stable under reordering; the same question, whatever
         its answer, never straddles the split), or of the schema's group (a company's filings) with at least one
         group on each side
"""

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import RecipeError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant")
SOURCE_FORMS = "ID, ID:CONFIG, ID@SPLIT or ID:CONFIG@SPLIT (ID is owner/name), or a local file or folder"
PARQUET_BATCH_ROWS = 10_000  # rows of a .parquet file converted at a time
BATCH_ROWS = 10_000  # rows of a converted source read at a time by deduplication and the split
# A training source's share of the mixture, after its name: `SOURCE weight=W` or `SOURCE fraction=F` (see Source)
MIXTURE = re.compile(r"(?P<name>.*\S)\s+(?P<kind>weight|fraction)=(?P<value>\S*)")
# The split an eval source from the Hub reads when it names none and is not one of the domain's standard sets: `test`,
# as `recipes/evaluate.py` reads it; never `train`, which the recipes train on
HELD_OUT_SPLIT = "test"


class DropRow(Exception):
    """Raised by a converter for a row that is skipped on purpose; the message is the reason, and it is counted."""


class HubUnreachable(RecipeError):
    """A Hub dataset could not be loaded (offline, unknown id or split); evaluation skips its default sets on it."""


class FieldError(Exception):
    """Raised by a converter for an invalid value; the data layer adds the source and the row."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field '{field_name}': {problem}")


@dataclass(frozen=True)
class Schema:
    """One source format: the columns that identify it, their types, and its converter."""

    name: str
    fields: dict[str, type | tuple[type, ...]]  # required columns and their accepted types (detection uses the keys)
    to_messages: Callable[[dict], dict]
    # rows of one group (a company's filings) land on the same side of the split; None: split by prompt
    split_key: Callable[[dict], str] | None = None
    # How evaluation scores its answers: "multiple_choice" (a lettered options block, answer `C. ...`), a label set
    # ("Yes", "No", "Maybe": a classification, the answer starts with one) or "open"; None: told by each answer's
    # text (data in chat form, whose source declares nothing)
    task: str | tuple[str, ...] | None = None

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.fields)})"


@dataclass
class SourceReport:
    source: str
    schema: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, duplicates included
    train: int = 0
    eval: int = 0
    truncated: int = 0  # kept rows longer than max_length tokens, which SFTTrainer cuts
    groups: int = 0  # distinct split groups of a source split by groups (0: split by prompt)
    eval_groups: int = 0
    split_note: str = ""  # why the split differs from the plain hash (a group moved so that each side has one)
    mixture: str = ""  # the share asked for ('weight 2', 'fraction 0.5'); train + eval then differ from kept


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    sources: list[SourceReport]
    work_dir: Path | None = None  # the staged and converted sources that train and eval map (removed at exit)

    def summary(self) -> str:
        lines = [f"{'source':<60} {'schema':<11} {'read':>7} {'kept':>7} {'train':>7} {'eval':>6}  dropped"]
        for s in self.sources:
            dropped = ", ".join(f"{n} {reason}" for reason, n in s.dropped.items()) or "-"
            lines.append(f"{s.source[-60:]:<60} {s.schema:<11} {s.read:>7} {s.kept:>7} {s.train:>7} {s.eval:>6}  "
                         f"{dropped}")
        lines += [f"{s.source}: {s.truncated} rows longer than max_length are truncated" for s in self.sources
                  if s.truncated]
        lines += [f"{s.source}: {s.mixture}: {s.kept} kept rows -> {s.train + s.eval}"
                  + (" (upsampled: rows repeat)" if s.train + s.eval > s.kept else "")
                  for s in self.sources if s.mixture]
        lines += [f"{s.source}: split by group, {s.eval_groups} of {s.groups} groups in eval"
                  + (f" ({s.split_note})" if s.split_note else "") for s in self.sources if s.groups]
        lines.append(f"total: {sum(s.read for s in self.sources)} read, {len(self.train)} train, "
                     f"{len(self.eval) if self.eval is not None else 0} eval")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Naming a source
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A source as named: a local file or folder (`path`), or a Hub dataset (`repo_id`, `config`, `split`; None when
    not named); a training source may carry its share of the mixture, `weight` or `fraction`."""

    text: str
    path: Path | None = None
    repo_id: str = ""
    config: str | None = None
    split: str | None = None
    # weight=W: the sources share their rows in proportion to their weights (every training source has one);
    # fraction=F: F times this source's rows. Either repeats rows where it asks for more than the source holds
    weight: float | None = None
    fraction: float | None = None

    @property
    def mixture(self) -> str:
        """'weight W', 'fraction F', or '' (the source as it is)."""
        return (f"weight {self.weight:g}" if self.weight is not None
                else f"fraction {self.fraction:g}" if self.fraction is not None else "")

    @property
    def hub(self) -> str:
        """`ID` or `ID:CONFIG`, as a domain's EVAL_ONLY and EVAL_SETS name a Hub dataset."""
        return f"{self.repo_id}:{self.config}" if self.config else self.repo_id

    @property
    def key(self) -> str:
        """The same for two names of the same rows: the resolved path, or `ID:CONFIG@SPLIT`."""
        return str(self.path.resolve()) if self.path else f"{self.hub}@{self.split}"

    def with_split(self, default: str) -> "Source":
        """This source reading `default` unless it names a split (a local one reads its files)."""
        return self if self.path or self.split else replace(self, split=default)

    def __str__(self) -> str:
        return self.text if self.path else f"{self.hub}@{self.split}" if self.split else self.hub


def parse_source(text: str) -> Source:
    """A local file or folder when the path exists or cannot be a Hub id (a data-file suffix, not one '/'), else a
    Hub dataset `ID[:CONFIG][@SPLIT]`; a malformed Hub name is a one-line error that shows the forms. A trailing
    ` weight=W` or ` fraction=F` (a number > 0) sets the source's share of the mixture."""
    if not text.strip():  # Path("") is the current folder
        raise RecipeError(f"an empty source name; sources are {SOURCE_FORMS}")
    mixture = MIXTURE.fullmatch(text.strip())
    if mixture and not Path(text).exists():
        try:
            value = float(mixture["value"])
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise RecipeError(f"{text}: {mixture['kind']} must be a number > 0, got '{mixture['value']}'")
        return replace(_parse_name(mixture["name"]), **{mixture["kind"]: value})
    return _parse_name(text)


def _parse_name(text: str) -> Source:
    path = Path(text)
    if path.exists():
        return Source(text, path=path)
    name, at, split = text.partition("@")
    repo_id, colon, config = name.partition(":")
    if repo_id.count("/") != 1 or Path(repo_id).suffix in LOCAL_SUFFIXES:
        return Source(text, path=path)  # loading says it is missing
    if ":" in config:  # ID:CONFIG:SPLIT reads as a config named "CONFIG:SPLIT": say how to name the split
        config, _, split = config.partition(":")
        raise RecipeError(f"{text}: name the split with '@': {repo_id}:{config}@{split} (sources are {SOURCE_FORMS})")
    if not all(repo_id.split("/")) or (colon and not config) or (at and not split) or "@" in split:
        raise RecipeError(f"{text}: not a source name; sources are {SOURCE_FORMS}")
    return Source(text, repo_id=repo_id, config=config or None, split=split or None)


def held_out_split(source: Source, standard_splits: dict[str, str]) -> str:
    """The split an eval source from the Hub reads: the one named, else the one the domain evaluates that set on
    (`standard_splits`, ID[:CONFIG] -> split, from its EVAL_SETS), else `test`."""
    return source.split or standard_splits.get(source.hub, HELD_OUT_SPLIT)


def resolve_sources(sources: list[str], eval_sources: list[str] | None = None, eval_only=(),
                    standard_splits: dict[str, str] | None = None) -> tuple[list[Source], list[Source]]:
    """(training, eval) sources parsed, each Hub one with the split it reads (`train` for training); refuses a
    training source that a domain's EVAL_ONLY lists (an entry without @SPLIT covers every split) and a source named
    for both training and evaluation."""
    train = [parse_source(s).with_split("train") for s in sources]
    held_out = [parse_source(s) for s in eval_sources or []]
    held_out = [s.with_split(held_out_split(s, standard_splits or {})) for s in held_out]
    weighted = [s.text for s in train if s.weight is not None]
    if weighted and len(weighted) < len(train):
        unweighted = ", ".join(s.text for s in train if s.weight is None)
        raise RecipeError(f"{unweighted}: no weight, while {', '.join(weighted)} has one: weights share the mixture "
                          "among all training sources, so give each one a weight (or use fraction=F per source)")
    mixed = [s.text for s in held_out if s.mixture]
    if mixed:
        raise RecipeError(f"{', '.join(mixed)}: an eval source takes no weight or fraction (it is read whole); "
                          "weigh the training sources")
    for source in train:
        for entry in map(parse_source, eval_only):
            if source.hub and source.hub == entry.hub and entry.split in (None, source.split):
                raise RecipeError(f"{source.text}: evaluation-only ({entry.text}), never trained on")
    both = {s.key for s in train} & {s.key for s in held_out}
    if both:
        raise RecipeError(f"{', '.join(sorted(both))}: named both to train on and to evaluate on; evaluate on another "
                          "split (@SPLIT) or file, or leave out --eval_dataset_name to hold out a split of the data")
    return train, held_out


# ---------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------
def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}: line {line}: bytes that are not UTF-8 at offset {e.start} (re-encode the file "
                          "as UTF-8)") from None


def json_line_texts(path: Path):
    """(line number, text) for each non-blank line of a JSON-lines file, read one line at a time (memory: one line,
    whatever the file's size); bytes that are not UTF-8 are a one-line error naming the line and the file offset."""
    with path.open("rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RecipeError(f"{path}: line {number}: bytes that are not UTF-8 at offset {offset + e.start} "
                                  "(re-encode the file as UTF-8)") from None
            offset += len(raw)
            if line.strip():
                yield number, line


def parse_json_line(path, number: int, line: str) -> dict:
    """One line of a JSON-lines file as an object; a bad line is a one-line error naming it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise RecipeError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def iter_json_lines(path: Path):
    """(line number, object) for each non-blank line of a JSON-lines file, read one line at a time; a bad line is a
    one-line error naming it."""
    for number, line in json_line_texts(path):
        yield number, parse_json_line(path, number, line)


def numbered_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a bad line is a one-line error naming it."""
    return list(iter_json_lines(path))


def _read_json_array(path: Path, text: str) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}; is the array cut "
                          "short?)") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise RecipeError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def table_batches(path: Path):
    """Record batches of a .csv file (pyarrow's streaming reader: column types are inferred from the first block) or
    of a .parquet file (PARQUET_BATCH_ROWS rows each): memory is one batch, whatever the file's size."""
    import pyarrow as pa

    try:
        if path.suffix == ".csv":
            import pyarrow.csv as pacsv

            batches = pacsv.open_csv(path)
        else:
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        yield from batches
    except (pa.ArrowInvalid, OSError) as e:
        problem = str(e).strip().splitlines()[0]
        raise RecipeError(f"{path}: not a readable {path.suffix[1:]} file ({problem})") from None


def _read_table(path: Path):
    """Rows of a .csv or .parquet file, one record batch at a time."""
    for batch in table_batches(path):
        yield from batch.to_pylist()


def _read_labelled_lines(path: Path) -> list[dict]:
    """`sentence@label` per line (the raw Financial PhraseBank files): columns `sentence` and `label`.

    UTF-8, or latin-1 when the bytes are not UTF-8: the PhraseBank ships in latin-1, and latin-1 decodes any byte.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")
        if not at:
            raise RecipeError(f"{path}: line {number}: expected 'sentence@label' (a .txt source holds one labelled "
                              "sentence per line)")
        rows.append({"sentence": sentence.strip(), "label": label.strip()})
    return rows


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-blank character of a text file is `char` (a .json file holding one array)."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            text = chunk.decode("utf-8-sig", errors="replace").lstrip()
            if text:
                return text.startswith(char)
    return False


def iter_file(path: Path):
    """Rows of one local file, with errors that name the file and the line; JSON lines are read one line at a time."""
    if path.suffix in (".csv", ".parquet"):
        yield from _read_table(path)
    elif path.suffix == ".txt":
        yield from _read_labelled_lines(path)
    elif path.suffix == ".json" and _starts_with(path, "["):
        yield from _read_json_array(path, _decode(path))
    else:
        yield from (row for _, row in iter_json_lines(path))


def read_file(path: Path) -> list[dict]:
    """Rows of one local file, with errors that name the file and the line."""
    rows = list(iter_file(path))
    if not rows:
        raise RecipeError(f"{path}: the file has no rows")
    return rows


def local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise RecipeError(f"{path}: folder holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise RecipeError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(LOCAL_SUFFIXES)})")
    return [path]


def load_hub_train_split(repo_id: str, config: str | None = None, split: str = "train"):
    """A split of a Hub dataset (`train` unless named), with a one-line error when the Hub is out of reach."""
    from datasets import load_dataset

    try:
        return load_dataset(repo_id, name=config, split=split)
    except Exception as e:  # datasets and huggingface_hub raise many types for "offline" and "not found"
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubUnreachable(
            f"dataset '{repo_id}{':' + config if config else ''}': could not load its {split} split from the "
            f"Hugging Face Hub ({problem[:200]}). Offline? Pass a local file or folder with --dataset_name, or run "
            "the offline demo with a *_smoke.yaml config"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Schemas and validation
# ---------------------------------------------------------------------------------------------------------------
def detect_schema(columns, schemas: list[Schema], source: str) -> Schema:
    """The most specific schema whose required columns are all present."""
    matches = [s for s in schemas if set(s.fields) <= set(columns)]
    if not matches:
        supported = "; ".join(s.describe() for s in schemas)
        raise RecipeError(f"{source}: unknown schema, columns {sorted(columns)}. Supported schemas: {supported}")
    return max(matches, key=lambda s: len(s.fields))


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def validate_row(row: dict, schema: Schema) -> None:
    """Raise FieldError for a missing or wrong-typed required field."""
    for name, types in schema.fields.items():
        if name not in row:
            raise FieldError(name, "missing")
        value = row[name]
        accepted = types if isinstance(types, tuple) else (types,)
        # bool is an int in Python, but a label of True is a data error
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            shown = "null" if value is None else type(value).__name__
            raise FieldError(name, f"expected {_type_name(types)}, got {shown}")


def validate_messages(messages) -> None:
    """Raise FieldError unless `messages` is a chat with at least one non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "expected a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise FieldError(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FieldError(f"messages[{i}].content", "expected a string")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise FieldError("messages", "no assistant turn with content to learn from")


def content_key(messages: list[dict]) -> str:
    """What makes two examples the same: their user and assistant text, case and spacing ignored."""
    text = "\x1f".join(m["content"] for m in messages if m["role"] != "system")
    return re.sub(r"\s+", " ", text).strip().lower()


def question(messages: list[dict]) -> str:
    """What the model is asked: the user turns of an example."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def normalise(text: str) -> str:
    """Case, punctuation and spacing removed: 'What is X?' and 'what is x' are the same question."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()))


def prompt_key(messages: list[dict]) -> str:
    """What makes two examples the same question whatever their answers: the normalised user turns (the data card's
    exact train/eval overlap compares the same)."""
    return normalise(question(messages))


def digest(text: str) -> bytes:
    """16 bytes standing for `text` in the deduplication sets (128 bits: among a billion rows the odds of any two
    texts colliding are about 1 in 10**21)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _convert(row: dict, index: int, schema: Schema, source: str, row_offset: int, seed: int) -> dict:
    """One row converted, with what deduplication, the split and the mixture read: fixed-size digests of its content
    and prompt, and its seeded positions in [0, 1) (`_position`), so that they never hold the texts."""
    try:
        validate_row(row, schema)
        messages = schema.to_messages(row)["messages"]
        validate_messages(messages)
    except DropRow as reason:
        return {"messages": [], "split_key": "", "drop_reason": str(reason), "schema": schema.name, "content": b"",
                "prompt": b"", "split_position": 0.0, "mixture_position": 0.0}
    except FieldError as e:
        raise RecipeError(f"{source}: row {index + row_offset}: {e}") from None
    split_key = schema.split_key(row) if schema.split_key else ""  # "": split by prompt (prepare_data)
    content, prompt = content_key(messages), prompt_key(messages)
    return {"messages": messages, "split_key": split_key, "drop_reason": "", "schema": schema.name,
            "content": digest(content), "prompt": digest(prompt) if prompt else b"",
            "split_position": _position(split_key or prompt or content, seed),
            "mixture_position": _position("mixture\x1f" + content, seed)}


def _convert_rows(rows, indices: list[int], schema: Schema, source: str, seed: int) -> dict:
    out = {name: [] for name in _converted_features()}
    for index, row in zip(indices, rows, strict=True):
        for key, value in _convert(row, index, schema, source, 1, seed).items():
            out[key].append(value)
    return out


def _convert_batch(batch: dict, indices: list[int], schema: Schema, source: str, seed: int) -> dict:
    """`_convert` over a batch of rows: `datasets` pays its per-call overhead once per batch, not once per row."""
    rows = (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))
    return _convert_rows(rows, indices, schema, source, seed)


def _convert_json_batch(batch: dict, indices: list[int], schema: Schema, source: str, seed: int) -> dict:
    """`_convert` over a batch of JSON texts (the `line` and `json` columns of a staged local file, see
    `data_stream.stage_file`): parsed here, in the worker processes, with errors that name the line."""
    rows = (parse_json_line(source, number, text) for number, text in zip(batch["line"], batch["json"], strict=True))
    return _convert_rows(rows, indices, schema, source, seed)


# ---------------------------------------------------------------------------------------------------------------
# One source, then the mixture
# ---------------------------------------------------------------------------------------------------------------
# Worker processes take ~0.5 s to start (bench/results/cpu.md: launch to first step): below this many rows one process
# converts or tokenizes sooner. At 100k rows two processes convert 1.14-1.53x faster than one, at 10k about as fast
MIN_ROWS_PER_PROCESS_POOL = 10_000


def worth_processes(num_proc: int | None, rows: int) -> int | None:
    """`num_proc` where the rows are many enough to repay starting the processes, else None (this process)."""
    return num_proc if num_proc and num_proc > 1 and rows >= MIN_ROWS_PER_PROCESS_POOL else None


def _converted_features():
    """The columns every converted source has, typed up front: a file whose rows are all dropped still concatenates."""
    from datasets import Features, List, Value

    return Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                     "split_key": Value("string"), "drop_reason": Value("string"), "schema": Value("string"),
                     "content": Value("binary"), "prompt": Value("binary"), "split_position": Value("float64"),
                     "mixture_position": Value("float64")})


def _convert_table(table, schema: Schema, source: str, num_proc: int | None, seed: int, desc: str):
    """A table on disk converted in batches, in worker processes where its rows repay them (`worth_processes`): a
    staged local file (`line`, `json` columns) or a Hub split (the source's own columns)."""
    staged_json = table.column_names == ["line", "json"]
    return table.map(
        _convert_json_batch if staged_json else _convert_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"schema": schema, "source": source, "seed": seed},
        remove_columns=table.column_names,
        features=_converted_features(),
        num_proc=worth_processes(num_proc, len(table)),
        desc=desc,
    )


def _load_source(source: Source, schemas: list[Schema], max_rows: int | None, num_proc: int | None, seed: int = 0,
                 work_dir: Path | None = None):
    """Convert one source (a Hub one with its split resolved); returns (Dataset of the `_converted_features`, schema
    name). A local file is first staged as Arrow in `work_dir` (a temporary folder when None), then converted from
    there: memory stays a batch of rows whatever the size of the file."""
    from datasets import concatenate_datasets

    from .data_stream import stage_file, temporary_work_dir

    path = source.path
    if path is not None:
        if not path.exists():
            raise RecipeError(f"{source.text}: no such local file or folder (and not a Hub dataset id 'owner/name')")
        work_dir = work_dir or temporary_work_dir()
        converted, schema_names = [], set()
        for file in local_files(path):
            staged, columns = stage_file(file, work_dir, max_rows)
            schema = detect_schema(columns, schemas, str(file))
            converted.append(_convert_table(staged, schema, str(file), num_proc, seed, f"Converting {file.name}"))
            schema_names.add(schema.name)
        return concatenate_datasets(converted), "+".join(sorted(schema_names))

    table = load_hub_train_split(source.repo_id, source.config, source.split)
    if max_rows is not None:
        table = table.select(range(min(max_rows, len(table))))
    schema = detect_schema(table.column_names, schemas, str(source))
    return _convert_table(table, schema, str(source), num_proc, seed, f"Converting {source}"), schema.name


def load_converted(source: str, schemas: list[Schema], split: str = "train") -> tuple[list[dict], SourceReport]:
    """One source converted to {messages, schema} rows, neither deduplicated nor split: how an evaluation set is
    read. A Hub source reads `split` unless it names its own."""
    parsed = parse_source(source).with_split(split)
    converted, schema_name = _load_source(parsed, schemas, None, None)
    drops = Counter(reason for reason in converted["drop_reason"] if reason)
    kept = [{"messages": example["messages"], "schema": example["schema"]}
            for example in converted.select_columns(["messages", "schema", "drop_reason"])
            if not example["drop_reason"]]
    report = SourceReport(source=str(parsed), schema=schema_name, read=len(converted), kept=len(kept),
                          dropped=dict(drops.most_common()))
    return kept, report


def _position(split_key: str, seed: int) -> float:
    """Where a split key falls in [0, 1) for this seed: below eval_fraction is eval."""
    digest = hashlib.sha256(f"{seed}\x1f{split_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _eval_sides(examples, seed: int, eval_fraction: float, report: SourceReport):
    """Which examples of one source (a converted Dataset) go to eval, as a bool array: by the seeded position of their
    group (a schema's split_key) or, without one, of their prompt (`split_position`). A source of two or more groups
    gets at least one on each side: a few groups at a small eval_fraction would otherwise all hash into train
    (recorded in the report)."""
    import numpy as np

    positions, keys = [], []
    for batch in examples.select_columns(["split_key", "split_position"]).iter(batch_size=BATCH_ROWS):
        positions.append(np.asarray(batch["split_position"], dtype=np.float64))
        keys += [key or None for key in batch["split_key"]]  # None: one shared object per ungrouped row
    positions = np.concatenate(positions or [np.zeros(0)])
    in_eval = positions < eval_fraction
    group_positions = {key: float(p) for key, p in zip(keys, positions, strict=True) if key}
    groups = sorted(group_positions, key=group_positions.get)
    group_in_eval = {g: group_positions[g] < eval_fraction for g in groups}
    if len(groups) >= 2 and eval_fraction > 0:
        if not any(group_in_eval.values()):
            group_in_eval[groups[0]] = True
            report.split_note = f"none hashed into eval at eval_fraction {eval_fraction}: the first by hash moved"
        elif all(group_in_eval.values()):
            group_in_eval[groups[-1]] = False
            report.split_note = f"all hashed into eval at eval_fraction {eval_fraction}: the last by hash moved back"
    if groups:
        report.groups, report.eval_groups = len(groups), sum(group_in_eval.values())
        for i, key in enumerate(keys):
            if key:
                in_eval[i] = group_in_eval[key]
    return in_eval


def mixture_targets(sources: list[Source], counts: list[int]) -> list[int]:
    """Rows each training source gives one side of the split, from the `counts` it holds there: with weights, the
    sources share their rows in proportion to their weights (a source with none on this side takes no share); with
    fractions, fraction x its rows; else all of them."""
    if sources and sources[0].weight is not None:  # then every source has one (resolve_sources)
        total_weight = sum(s.weight for s, n in zip(sources, counts, strict=True) if n)
        return [round(s.weight / total_weight * sum(counts)) if n else 0
                for s, n in zip(sources, counts, strict=True)]
    return [n if s.fraction is None else round(s.fraction * n) for s, n in zip(sources, counts, strict=True)]


def resample(indices, positions, target: int):
    """`target` of `indices` (a source's rows on one side of the split): each one target // len(indices) times, then
    the rest in the order of their seeded `positions` (`mixture_position`: a seeded subset by content, the same
    whatever the row order)."""
    import numpy as np

    if not len(indices):
        return indices
    copies, rest = divmod(target, len(indices))
    ranked = indices[np.argsort(positions, kind="stable")]
    return np.concatenate([np.tile(indices, copies), ranked[:rest]])


def tokenize_chats(dataset, tokenizer, assistant_only_loss: bool, num_proc: int | None = None,
                   desc: str = "Tokenizing") -> "datasets.Dataset":  # noqa: F821
    """The `messages` of each example as SFTTrainer tokenizes them: `input_ids` with the chat template, and with
    assistant_only_loss `assistant_masks`, the columns SFTTrainer takes as already tokenized. Batched, in worker
    processes where the rows repay them."""
    from datasets import Features, List, Value

    def tokenize(batch):
        # verbose=False: the tokenizer's warning that long rows cause "indexing errors" is wrong here: they are cut to
        # max_length, and counted
        out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=assistant_only_loss,
                                            tokenizer_kwargs={"verbose": False})
        return {name: out[name] for name in features}

    features = Features({"input_ids": List(Value("int32"))}
                        | ({"assistant_masks": List(Value("int8"))} if assistant_only_loss else {}))
    return dataset.map(tokenize, batched=True, batch_size=256, remove_columns=dataset.column_names, features=features,
                       num_proc=worth_processes(num_proc, len(dataset)), desc=desc)


def token_lengths(dataset, tokenizer, assistant_only_loss: bool, num_proc: int | None = None,
                  desc: str = "Measuring token lengths") -> dict[str, list]:
    """Per example of a dataset of `messages`: `length` (tokens with the chat template), `first_target` and
    `last_target` (indices of the first and last token in the loss: the assistant tokens with assistant_only_loss,
    else every token; `length` and -1 when none is). Read from its token columns when it has them (`TokenBudget`
    made them), else tokenized (`tokenize_chats`)."""
    import numpy as np
    import pyarrow.compute as pc

    if "input_ids" not in dataset.column_names:
        dataset = tokenize_chats(dataset, tokenizer, assistant_only_loss, num_proc, desc)
    columns = ["input_ids"] + (["assistant_masks"] if assistant_only_loss else [])
    measured = {"length": [], "first_target": [], "last_target": []}
    # record batches of Arrow, counted with numpy: a Python list per row would cost more than the tokenizing
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=65_536):
        lengths = pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        first, last = np.zeros_like(lengths), lengths - 1  # without assistant_only_loss every token is in the loss
        if assistant_only_loss:
            starts = np.cumsum(lengths) - lengths
            ones = np.flatnonzero(pc.list_flatten(batch["assistant_masks"]).to_numpy(zero_copy_only=False))
            rows = np.repeat(np.arange(len(lengths)), lengths)[ones]
            first, last = lengths.copy(), np.full_like(lengths, -1)
            with_target, at = np.unique(rows, return_index=True)  # the first 1 of each row that has one
            first[with_target] = ones[at] - starts[with_target]
            with_target, at = np.unique(rows[::-1], return_index=True)  # its last 1
            last[with_target] = ones[::-1][at] - starts[with_target]
        for name, values in (("length", lengths), ("first_target", first), ("last_target", last)):
            measured[name] += values.tolist()
    return measured


def no_target_within(measured: dict[str, list], max_length: int | None, keep_end: bool) -> list[bool]:
    """Per example: no loss token among the tokens TRL keeps (the first max_length, or with keep_end the last; all of
    them without max_length): TRL drops such a row, nothing is left to learn."""
    if keep_end and max_length is not None:
        return [last < length - max_length for length, last in zip(measured["length"], measured["last_target"],
                                                                    strict=True)]
    return [first >= min(length, max_length or length) for length, first in zip(measured["length"],
                                                                                measured["first_target"], strict=True)]


@dataclass(frozen=True)
class TokenBudget:
    """How SFTTrainer will cut each row: its chat-template tokens, truncated to `max_length` (None: not cut). The
    token ids it measures are handed on with the rows (`prepare_data`), so that SFTTrainer does not tokenize again."""

    tokenizer: object
    max_length: int | None
    keep_end: bool = False  # truncation_mode 'keep_end'
    assistant_only_loss: bool = False  # then a row whose answer is cut off entirely has no loss (TRL drops it)

    def fit(self, examples, source: str, report: SourceReport, drops: Counter, num_proc: int | None = None):
        """The rows (a Dataset with `messages`) that still train once cut, with the token columns SFTTrainer takes as
        already tokenized (`tokenize_chats`: it then builds its labels, truncation and drops from them instead of
        applying the chat template again); counts the truncated ones, drops (counted) those left without answer.
        Tokenized in batches, in `num_proc` worker processes where the rows repay them (`worth_processes`)."""
        from datasets import concatenate_datasets

        if not len(examples):
            return examples
        tokenized = tokenize_chats(examples.select_columns(["messages"]), self.tokenizer, self.assistant_only_loss,
                                   num_proc, desc=f"Measuring {Path(source).name} in tokens")
        measured = token_lengths(tokenized, self.tokenizer, self.assistant_only_loss)
        # side by side needs contiguous rows: flattening the kept rows here spares datasets rewriting both sides
        examples = concatenate_datasets([examples.flatten_indices(), tokenized], axis=1)
        if self.max_length is not None:
            shortest = min(measured["length"])
            if shortest > self.max_length:
                raise RecipeError(f"{source}: every row is longer than max_length={self.max_length} tokens (the "
                                  f"shortest has {shortest}): raise --max_length or shorten the rows")
            report.truncated += sum(length > self.max_length for length in measured["length"])
        if not self.assistant_only_loss:
            return examples
        cut_off = no_target_within(measured, self.max_length, self.keep_end)
        if any(cut_off):
            drops["answer cut off by max_length"] += sum(cut_off)
        return examples.select([i for i, no_answer in enumerate(cut_off) if not no_answer])


def prepare_data(
    sources: list[str],
    schemas: list[Schema],
    eval_fraction: float = 0.05,
    seed: int = 42,
    max_rows_per_source: int | None = None,
    num_proc: int | None = None,
    eval_sources: list[str] | None = None,
    budget: TokenBudget | None = None,
    eval_only=(),
    standard_splits: dict[str, str] | None = None,
) -> PreparedData:
    """Every source converted, validated, deduplicated across sources and split into train/eval.

    With `eval_sources`, they are the eval set (a Hub one reads its held-out split, see `held_out_split`) and every
    row of `sources` trains, except rows that ask an eval question (dropped, counted). With `budget`, rows longer
    than max_length are counted and rows it would leave without an answer are dropped (counted), and train and eval
    carry the token ids it measured (`TokenBudget.fit`). `eval_only` (a domain's EVAL_ONLY) is refused as a training
    source. A source that keeps no row at all is an error, with the reasons. A training source's `weight=W` or
    `fraction=F` (see `Source`) then sets its rows on each side of the split (`mixture_targets`, `resample`, seeded).
    """
    import numpy as np
    from datasets import concatenate_datasets

    from .data_stream import temporary_work_dir

    work_dir = temporary_work_dir()  # the staged and converted sources, which the returned datasets map
    train_sources, held_out_sources = resolve_sources(sources, eval_sources, eval_only, standard_splits)
    # fixed-size digests, not the texts: memory per row stays 16 bytes whatever the length of its conversation, and
    # the rows themselves stay on disk (a source is its converted Dataset and the indices of the rows kept)
    seen: set[bytes] = set()  # content of every kept row: a repeat is a duplicate
    held_out: set[bytes] = set()  # prompts of the eval sources: a training row asking one is dropped
    split = []  # per training source: its kept rows, and which go to eval
    eval_rows, reports = [], []
    for is_eval, source in [(True, s) for s in held_out_sources] + [(False, s) for s in train_sources]:
        converted, schema_name = _load_source(source, schemas, max_rows_per_source, num_proc, seed, work_dir)
        report = SourceReport(source=str(source), schema=schema_name, read=len(converted), mixture=source.mixture)
        drops = Counter()
        kept_indices = []
        columns = converted.select_columns(["drop_reason", "prompt", "content"])
        for start, batch in enumerate(columns.iter(batch_size=BATCH_ROWS)):
            rows = zip(batch["drop_reason"], batch["prompt"], batch["content"], strict=True)
            for index, (drop_reason, prompt, content) in enumerate(rows, start=start * BATCH_ROWS):
                if drop_reason:
                    drops[drop_reason] += 1
                elif not is_eval and prompt and prompt in held_out:
                    drops["in the eval set"] += 1
                elif content in seen:
                    drops["duplicate"] += 1
                else:
                    seen.add(content)
                    if is_eval:
                        held_out.add(prompt)
                    kept_indices.append(index)
        kept = converted.select(kept_indices)
        if budget is not None:
            kept = budget.fit(kept, source.text, report, drops, num_proc)
        if is_eval:
            eval_rows.append(kept)
            report.eval = len(kept)
        else:
            split.append((kept, np.zeros(len(kept), dtype=bool) if held_out_sources
                          else _eval_sides(kept, seed, eval_fraction, report)))
        report.kept = len(kept)
        report.dropped = dict(drops.most_common())
        reports.append(report)
        if not report.kept:
            reasons = ", ".join(f"{n} {reason}" for reason, n in drops.most_common())
            raise RecipeError(f"{source.text}: no row left to {'evaluate' if is_eval else 'train'} on "
                              f"(dropped: {reasons})")

    # the mixture, on each side of the split, on indices: a copy stays on its original's side, so upsampling never
    # brings a prompt or group to both
    train_rows = []
    for to_eval, rows in ((False, train_rows), (True, eval_rows)):
        per_source = [np.flatnonzero(sides == to_eval) for _, sides in split]
        targets = mixture_targets(train_sources, [len(side) for side in per_source])
        for report, (kept, _), side, target in zip(reports[len(held_out_sources):], split, per_source, targets,
                                                   strict=True):
            positions = np.asarray(kept.select(side)["mixture_position"], dtype=np.float64)
            rows.append(kept.select(resample(side, positions, target)))
            if to_eval:
                report.eval = target
            else:
                report.train = target
    train_rows = [rows for rows in train_rows if len(rows)]
    if not train_rows:
        raise RecipeError(f"no training rows left from {', '.join(sources)}: all {sum(map(len, eval_rows))} kept "
                          "rows fell in the eval split; lower eval_fraction or add data")
    eval_rows = [rows for rows in eval_rows if len(rows)]
    # the token ids a budget made: SFTTrainer takes a dataset with `input_ids` as tokenized
    token_columns = [c for c in ("input_ids", "assistant_masks") if c in train_rows[0].column_names]
    return PreparedData(
        train=concatenate_datasets(train_rows).select_columns(["messages", *token_columns]),
        # the schema tells evaluation how to score an eval row (Schema.task)
        eval=(concatenate_datasets(eval_rows).select_columns(["messages", "schema", *token_columns]) if eval_rows
              else None),
        sources=reports,
        work_dir=work_dir,
    )


def prepare_domain(domain, data_args, training_args, tokenizer) -> PreparedData:
    """`prepare_data` for a recipe run: the sources `data_args` names, read with `domain`'s schemas, split with the
    run's seed and tokenized once against its token budget (SFTTrainer trains on those ids). Training calls it;
    `recipes/evaluate.py` calls it again with the settings in run_card.json to rebuild the same held-out split."""
    from .evaluation import eval_sets

    return prepare_data(
        data_args.dataset_name,
        domain.SCHEMAS,
        eval_fraction=data_args.eval_fraction,
        seed=training_args.seed,
        max_rows_per_source=data_args.max_rows_per_source,
        num_proc=training_args.dataset_num_proc,
        eval_sources=data_args.eval_dataset_name,
        eval_only=domain.EVAL_ONLY,
        standard_splits={eval_set.source: eval_set.split for eval_set in eval_sets(domain)},
        budget=TokenBudget(tokenizer, training_args.max_length, keep_end=training_args.truncation_mode == "keep_end",
                           assistant_only_loss=training_args.assistant_only_loss),
    )
