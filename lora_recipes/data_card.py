"""The data card: what a run trains and evaluates on, written next to its outputs before any model loads.

    data_card.md            the card to read: sources, token lengths, train/eval overlap, warnings
    data_card.json          the same numbers for scripts
    data_card_lengths.png   token-length histogram of train and eval, with max_length marked

Every recipe writes it (`lora_recipes/sft.py`, step 3); `--data_card_only true` writes it and stops, loading the
tokenizer but no model. Token lengths use the tokenizer and chat template of the run, exactly as TRL tokenises for
training. The overlap check compares the questions (user turns) of the eval split with those of the train split:
exact after normalisation (case, punctuation, spacing), and near-duplicate by the Jaccard similarity of their
character 5-gram sets, found with MinHash banding so that it scales to a few hundred thousand rows.
"""

import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .data import no_target_within, normalise, question, token_lengths
from .run_card import redact, write_json

CARD_JSON, CARD_MD, CARD_PLOT = "data_card.json", "data_card.md", "data_card_lengths.png"
NGRAM = 5  # characters per shingle: short enough for paraphrases to share many, long enough to ignore common letters
NEAR_DUPLICATE_JACCARD = 0.8  # two questions this similar read as the same question with a detail changed
NUM_PERM, BANDS = 64, 16  # 16 bands of 4 MinHash values: a pair at Jaccard 0.8 becomes a candidate with p > 0.999
SHOWN_PAIRS = 5
_rng = np.random.default_rng(0)
_HASH_A = _rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_HASH_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------------------
# Token lengths
# ---------------------------------------------------------------------------------------------------------------
def length_stats(measured: dict[str, list], max_length: int | None, keep_end: bool = False) -> dict:
    lengths = np.array(measured["length"])
    if lengths.size == 0:
        return {"examples": 0}
    longer = int((lengths > max_length).sum()) if max_length else 0
    # a row with no loss token among the tokens TRL keeps leaves nothing to learn, and TRL drops it
    no_target = sum(no_target_within(measured, max_length, keep_end)) if max_length else 0
    return {
        "examples": int(lengths.size),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "p99": int(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
        "longer_than_max_length": longer,
        "share_longer_than_max_length": round(longer / lengths.size, 4),
        "no_target_within_max_length": no_target,
    }


# ---------------------------------------------------------------------------------------------------------------
# Train/eval overlap
# ---------------------------------------------------------------------------------------------------------------
def shingles(text: str) -> np.ndarray:
    """The sorted set of character n-grams of `text`, each packed losslessly into one integer."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size < NGRAM:
        data = np.pad(data, (0, NGRAM - data.size))
    windows = np.lib.stride_tricks.sliding_window_view(data, NGRAM).astype(np.uint64)
    packed = np.zeros(len(windows), dtype=np.uint64)
    for k in range(NGRAM):
        packed |= windows[:, k] << np.uint64(8 * k)
    return np.unique(packed)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (a.size + b.size - shared)


def _band_keys(shingle_set: np.ndarray) -> list[tuple[int, bytes]]:
    signature = ((shingle_set[:, None] * _HASH_A + _HASH_B) >> np.uint64(32)).min(axis=0)  # multiply-shift MinHash
    return [(band, rows.tobytes()) for band, rows in enumerate(signature.reshape(BANDS, -1))]


def overlap(train_questions, eval_questions: list[str]) -> dict:
    """Eval examples whose question is also a training question: exactly (normalised) or nearly (Jaccard). The
    training questions (any iterable) are read once and only the matched ones kept: memory grows with the eval set."""
    normalised_eval = [normalise(q) for q in eval_questions]
    eval_by_text, buckets = defaultdict(list), defaultdict(list)
    eval_shingles = [shingles(q) for q in normalised_eval]
    for i, (text, shingle_set) in enumerate(zip(normalised_eval, eval_shingles, strict=True)):
        if not text:  # no user turn (or only punctuation): nothing to compare
            continue
        eval_by_text[text].append(i)
        for key in _band_keys(shingle_set):
            buckets[key].append(i)

    exact: dict[int, str] = {}  # eval index -> a training question that is the same
    near: dict[int, tuple[float, str]] = {}  # eval index -> (best Jaccard, that training question)
    for train_question in train_questions:
        text = normalise(train_question)
        if not text:
            continue
        for i in eval_by_text.get(text, ()):
            exact.setdefault(i, train_question)
        shingle_set = shingles(text)
        candidates = {i for key in _band_keys(shingle_set) for i in buckets.get(key, ())}
        for i in candidates - exact.keys():
            similarity = jaccard(shingle_set, eval_shingles[i])
            if similarity >= NEAR_DUPLICATE_JACCARD and similarity > near.get(i, (0.0,))[0]:
                near[i] = (similarity, train_question)
    near = {i: match for i, match in near.items() if i not in exact}

    pairs = [{"kind": "exact", "jaccard": 1.0, "eval": eval_questions[i], "train": train}
             for i, train in sorted(exact.items())[:SHOWN_PAIRS]]
    pairs += [{"kind": "near-duplicate", "jaccard": round(similarity, 3), "eval": eval_questions[i], "train": train}
              for i, (similarity, train) in sorted(near.items(), key=lambda item: -item[1][0])
              [:SHOWN_PAIRS - len(pairs)]]
    return {"eval_examples": len(eval_questions), "exact": len(exact), "near_duplicate": len(near), "ngram": NGRAM,
            "jaccard_threshold": NEAR_DUPLICATE_JACCARD, "examples": pairs}


# ---------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------
def source_counts(sources) -> tuple[list[dict], dict]:
    """Per source and in total: read, kept, dropped by reason, duplicates, train, eval."""
    rows = []
    for report in sources:
        entry = asdict(report)
        entry["duplicates"] = entry["dropped"].pop("duplicate", 0)
        rows.append(entry)
    total = {key: sum(r[key] for r in rows) for key in ("read", "kept", "duplicates", "train", "eval")}
    dropped = defaultdict(int)
    for entry in rows:
        for reason, count in entry["dropped"].items():
            dropped[reason] += count
    total["dropped"] = dict(dropped)
    return rows, total


def mixture_counts(sources) -> list[dict] | None:
    """Per source, when any has a weight or fraction: rows and share of all rows before the mixture (kept) and after
    it (train + eval), and how many times a row is used on average (above 1: upsampled, rows repeat)."""
    if not any(s.mixture for s in sources):
        return None
    before, after = sum(s.kept for s in sources), sum(s.train + s.eval for s in sources)
    return [{"source": s.source, "mixture": s.mixture or "-", "before": s.kept, "after": s.train + s.eval,
             "share_before": round(s.kept / before, 4), "share_after": round((s.train + s.eval) / after, 4),
             "uses_per_row": round((s.train + s.eval) / s.kept, 3)} for s in sources]


def build_card(data, tokenizer, max_length: int | None, assistant_only_loss: bool = True,
               num_proc: int | None = None, keep_end: bool = False) -> tuple[dict, dict]:
    """The card's numbers for a PreparedData, and the per-example token lengths (for the plot); `keep_end`: the run
    truncates with truncation_mode keep_end."""
    splits = {"train": data.train, "eval": data.eval}
    measured = {name: token_lengths(ds, tokenizer, assistant_only_loss, num_proc)
                for name, ds in splits.items() if ds is not None}
    sources, total = source_counts(data.sources)
    lengths = {name: length_stats(m, max_length, keep_end) for name, m in measured.items()}
    eval_overlap = None
    if data.eval is not None:
        # the training rows a batch at a time: a large train split stays on disk
        train_questions = (question(m) for batch in data.train.select_columns(["messages"]).iter(batch_size=1000)
                           for m in batch["messages"])
        eval_overlap = overlap(train_questions, [question(m) for m in data.eval["messages"]])

    warnings = []
    if eval_overlap and eval_overlap["exact"] + eval_overlap["near_duplicate"]:
        warnings.append(
            f"{eval_overlap['exact'] + eval_overlap['near_duplicate']} of {eval_overlap['eval_examples']} eval "
            f"examples repeat a training question ({eval_overlap['exact']} exact, {eval_overlap['near_duplicate']} "
            f"near-duplicate at character {NGRAM}-gram Jaccard >= {NEAR_DUPLICATE_JACCARD}): eval loss overstates "
            "how well the model generalises")
    warnings += [f"{s['source']}: split by group, {s['eval_groups']} of {s['groups']} groups in eval "
                 f"({s['split_note']})" for s in sources if s["split_note"]]
    for name, stats in lengths.items():
        if stats.get("longer_than_max_length"):
            warnings.append(f"{stats['longer_than_max_length']} of {stats['examples']} {name} examples "
                            f"({stats['share_longer_than_max_length']:.1%}) are longer than max_length {max_length} "
                            "and will be truncated")
        if stats.get("no_target_within_max_length"):
            kept = "last" if keep_end else "first"
            warnings.append(f"{stats['no_target_within_max_length']} {name} examples have no answer token within "
                            f"the {kept} max_length {max_length} tokens: TRL drops them (nothing left to learn)")
    card = {
        "tokenizer": tokenizer.name_or_path,
        "max_length": max_length,
        "truncation_mode": "keep_end" if keep_end else "keep_start",
        "assistant_only_loss": assistant_only_loss,
        "sources": sources,
        "total": total,
        "mixture": mixture_counts(data.sources),
        "token_lengths": lengths,
        "overlap": eval_overlap,
        "warnings": warnings,
        "files": {"markdown": CARD_MD, "json": CARD_JSON, "plot": CARD_PLOT},
    }
    return card, measured


def plot_lengths(measured: dict[str, dict], max_length: int | None, path: Path) -> None:
    """Histogram of token lengths per split (matplotlib's Agg canvas: no display, no global pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    longest = max(max(m["length"], default=0) for m in measured.values())
    bins = np.linspace(0, max(longest, max_length or 0, 1), 41)
    for name, m in measured.items():
        ax.hist(m["length"], bins=bins, alpha=0.6, label=f"{name} ({len(m['length'])} examples)")
    if max_length:
        ax.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _cell(text: str, width: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def to_markdown(card: dict) -> str:
    def dropped(reasons: dict) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "-"

    lines = ["# Data card", "",
             f"Tokenizer `{card['tokenizer']}`, max_length {card['max_length']} ({card['truncation_mode']}), "
             f"loss on assistant turns only: {card['assistant_only_loss']}.", "",
             "## Sources", "",
             "| source | schema | read | kept | dropped | duplicates | train | eval |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for s in card["sources"]:
        lines.append(f"| {s['source']} | {s['schema']} | {s['read']} | {s['kept']} | {dropped(s['dropped'])} | "
                     f"{s['duplicates']} | {s['train']} | {s['eval']} |")
    t = card["total"]
    lines += [f"| **total** | | {t['read']} | {t['kept']} | {dropped(t['dropped'])} | {t['duplicates']} | "
              f"{t['train']} | {t['eval']} |", ""]
    if card["mixture"]:
        lines += ["## Mixture", "",
                  "Rows per source before the mixture (kept: cleaned and deduplicated) and after it (train + eval), "
                  "applied on each side of the split, seeded. Above 1 use per row: upsampled, its rows repeat.", "",
                  "| source | asked | rows before | share before | rows after | share after | uses per row |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m['source']} | {m['mixture']} | {m['before']} | {m['share_before']:.1%} | {m['after']} | "
                  f"{m['share_after']:.1%} | {m['uses_per_row']:g}{' (upsampled)' if m['uses_per_row'] > 1 else ''} |"
                  for m in card["mixture"]]
        lines.append("")
    lines += ["## Token lengths", "",
              "| split | examples | min | mean | p50 | p90 | p99 | max | > max_length "
              "| no answer token within max_length |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in card["token_lengths"].items():
        if s["examples"]:
            lines.append(f"| {name} | {s['examples']} | {s['min']} | {s['mean']} | {s['p50']} | {s['p90']} | "
                         f"{s['p99']} | {s['max']} | {s['longer_than_max_length']} "
                         f"({s['share_longer_than_max_length']:.1%}) | {s['no_target_within_max_length']} |")
    lines += ["", f"![token lengths]({CARD_PLOT})", "", "## Train/eval overlap", ""]
    o = card["overlap"]
    if o is None:
        lines.append("No eval split.")
    else:
        lines.append(f"Of {o['eval_examples']} eval questions, {o['exact']} also appear in train (after normalising "
                     f"case, punctuation and spacing) and {o['near_duplicate']} more are near-duplicates of a train "
                     f"question (character {o['ngram']}-gram Jaccard >= {o['jaccard_threshold']}).")
        if o["examples"]:
            lines += ["", "| kind | Jaccard | eval question | train question |", "|---|---:|---|---|"]
            lines += [f"| {p['kind']} | {p['jaccard']} | {_cell(p['eval'])} | {_cell(p['train'])} |"
                      for p in o["examples"]]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in card["warnings"]] or ["None."])
    return "\n".join(lines) + "\n"


def write_data_card(output_dir, data, tokenizer, max_length: int | None, assistant_only_loss: bool = True,
                    num_proc: int | None = None, keep_end: bool = False, plot: bool = True) -> dict:
    """Measure `data` (a PreparedData), write the card's three files into `output_dir` (`plot=False`: all but the
    histogram, see `plot_data_card`), print its warnings."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card, measured = build_card(data, tokenizer, max_length, assistant_only_loss, num_proc, keep_end)
    write_json(output_dir / CARD_JSON, card)
    (output_dir / CARD_MD).write_text(redact(to_markdown(card)), encoding="utf-8")
    if plot:
        plot_lengths(measured, max_length, output_dir / CARD_PLOT)
    for warning in card["warnings"]:
        print(f"warning: data card: {warning}", file=sys.stderr)
    print(f"Data card written to {output_dir / CARD_MD}")
    return card


def plot_data_card(output_dir, data, tokenizer, max_length: int | None, assistant_only_loss: bool = True) -> None:
    """The card's token-length histogram on its own: a training run draws it after training, next to the loss curve,
    because importing matplotlib and drawing cost about a second that would otherwise come before the first step."""
    measured = {name: token_lengths(ds, tokenizer, assistant_only_loss) for name, ds in
                (("train", data.train), ("eval", data.eval)) if ds is not None}
    plot_lengths(measured, max_length, Path(output_dir) / CARD_PLOT)
