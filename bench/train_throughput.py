"""The recipe against a bare TRL SFTTrainer, side by side: throughput, memory, padding, data preparation, start-up.

    python bench/train_throughput.py             # CPU here (2 cores: about 30 minutes), CUDA when present
    python bench/train_throughput.py --quick     # every section in miniature, ~1 minute (a test runs it)
    python bench/train_throughput.py --launch    # section 4 alone, 6 launches each: bench/results/launch-<device>.*

One run measures, on the same random-init model of realistic proportions (no download), the same data and seed:
1. training throughput (non-padding tokens per second) and peak memory of the recipe (its real defaults,
   recipes/configs/medical.yaml, with use_cpu on CPU) against a bare `SFTTrainer` with TRL's defaults, plus
   one-setting variants of the recipe (activation checkpointing, precision, optimizer);
2. padded batches against packing (bfd, padding-free position ids) on the lengths of the domain's sample rows,
   with the padding waste of each, for every attention implementation available here;
3. data preparation (`prepare_data`) of 100k synthetic rows per source schema of every domain with samples: from a
   local file, and from the Arrow table a Hub id loads to, with `num_proc` 1 and 2;
4. time from `accelerate launch recipes/sft_medical.py` to the first optimizer step, phase by phase, against a bare
   TRL script, launched in turns, wall clock and CPU seconds;
and on CUDA, the memory planner against the allocator's peak of real steps.

Each trainer runs in its own process (`python -m lora_recipes.measure`); they take turns, one timed round of
optimizer steps each, in a different order every round, after warm-up steps that are not timed. On CPU each trainer
runs one thread and throughput is counted per CPU second (`time.process_time`), which other processes on a shared
machine do not inflate; the wall clock (`time.perf_counter`) is recorded beside it. Ratios: median over rounds.
Writes bench/results/<device>.json and bench/results/<device>.md.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lora_recipes.data import MIN_ROWS_PER_PROCESS_POOL  # noqa: E402
from lora_recipes.measure import (  # noqa: E402
    collect,
    long_chats,
    measure,
    peak_rss,
    random_model,
    read_events,
    release_free_memory,
    reset_peak_rss,
    start,
)

RESULTS = REPO_ROOT / "bench" / "results"
BASELINE = "bare TRL SFTTrainer (TRL defaults)"
# the recipe's real defaults on both devices (with use_cpu on CPU; the smoke YAML is sized for the tiny model)
RECIPE_CONFIG = REPO_ROOT / "recipes" / "configs" / "medical.yaml"
SAMPLES = REPO_ROOT / "data" / "samples"
# Llama proportions scaled down: head_dim 64, 4 query heads per KV head, MLP 3.5x hidden, vocabulary 32x hidden
# (the tokenizer uses the first 1024 ids; the LM head and softmax still span all 8192, as in real models)
BENCH_MODEL = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 1, "vocab_size": 8192, "tie_word_embeddings": True}
QUICK_MODEL = {**BENCH_MODEL, "num_hidden_layers": 1, "vocab_size": 2048}
MEMORY_MODELS = {  # CUDA only: the planner against the allocator
    "llama-like": {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 4, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 32768},
    "qwen2-like": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 4,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 65536},
}


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],
    }


def write_results(output: Path, results: dict, table: str) -> None:
    """A benchmark's results: the JSON at `output`, its table beside it (.md), and the table printed."""
    output.write_text(json.dumps(results, indent=2) + "\n")
    output.with_suffix(".md").write_text(table)
    print(table)


# ---------------------------------------------------------------------------------------------------------------
# 1 + 2. Trainers side by side
# ---------------------------------------------------------------------------------------------------------------
def attention_implementations(device: str) -> list[str]:
    import importlib.util

    found = ["sdpa", "eager"]  # eager: the attention that every architecture has, with the mask it must build
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def trainer_variants(device: str, quick: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (kind, overrides of the recipe's YAML). The baseline shares only model, data, LoRA, batch and seed."""
    variants = {BASELINE: ("baseline", []), "recipe": ("recipe", [])}
    if quick:
        return variants
    # one packed row per batch, about as many tokens as the padded batch of 4 (the samples average ~170 tokens)
    for attn in attention_implementations(device):
        suffix = "" if attn == "sdpa" else f", {attn}"
        if attn != "sdpa":
            variants[f"recipe{suffix}"] = ("recipe", ["--attn_implementation", attn])
        variants[f"recipe + packing (bfd, padding-free, 1 row of 768){suffix}"] = (
            "recipe", ["--attn_implementation", attn, "--packing", "true", "--max_length", "768",
                       "--per_device_train_batch_size", "1"])
    variants["recipe, activation checkpointing off"] = ("recipe", ["--activation_checkpointing", "false"])
    variants["recipe, fp32 weights, no autocast"] = ("recipe", ["--dtype", "float32", "--bf16", "false"])
    variants["recipe, non-fused AdamW"] = ("recipe", ["--optim", "adamw_torch"])
    variants["recipe, LoRA dropout 0.05 (TRL's default)"] = ("recipe", ["--lora_dropout", "0.05"])
    variants["recipe, loss on every token (TRL's default)"] = ("recipe", ["--assistant_only_loss", "false"])
    return variants


def run_args(device: str, model: Path, output_dir: Path, max_steps: int) -> list[str]:
    """The recipe's YAML for this device, on the bench model and the medical samples, with no eval or checkpoints."""
    sources = [str(p) for p in sorted((SAMPLES / "medical").glob("*.jsonl"))]
    return ["--config", str(RECIPE_CONFIG), "--model_name_or_path", str(model), "--dataset_name", *sources,
            "--output_dir", str(output_dir), "--max_steps", str(max_steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", *(["--use_cpu", "true"] if device == "cpu" else [])]


def side_by_side(model: Path, device: str, workdir: Path, warmup: int, rounds: int, steps_per_round: int,
                 variants: dict[str, tuple[str, list[str]]]) -> dict:
    """Every variant (name -> (kind, YAML overrides)) in its own process, started one at a time, then timed in
    interleaved rounds."""
    workers = {}
    for i, (name, (kind, overrides)) in enumerate(variants.items()):
        args = [*run_args(device, model, workdir / f"run{i}", warmup + rounds * steps_per_round),
                "--logging_steps", "1000", "--disable_tqdm", "true", *overrides]
        spec = {"kind": kind, "domain": "medical", "config": str(RECIPE_CONFIG), "args": args,
                "warmup": warmup, "rounds": rounds, "steps_per_round": steps_per_round}
        if device == "cpu":
            spec["threads"] = 1  # its CPU seconds then measure its work, whatever else the machine runs
        proc = start(spec, gate=True)
        workers[name] = {"proc": proc, "kind": kind, "overrides": overrides,
                         "events": read_events(proc, "waiting")}  # start-up and warm-up, while the others wait
        print(f"  {name}: ready", flush=True)
    names = list(workers)
    for r in range(rounds):
        # a different order every round, so that a load that rises or falls during a round hits every trainer
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order[::-1] if r % 2 else order:
            workers[name]["proc"].stdin.write("go\n")
            workers[name]["proc"].stdin.flush()
            workers[name]["events"] += read_events(workers[name]["proc"], "round")
        print(f"  round {r + 1}/{rounds} done", flush=True)
    for w in workers.values():
        w["proc"].stdin.close()
        w["events"] += read_events(w["proc"], "done")
        w["proc"].wait()

    trainers = {}
    for name, w in workers.items():
        result = collect(w["events"])
        trainers[name] = {
            "kind": w["kind"],
            "overrides": w["overrides"],
            # wall clock: the best round is the least disturbed by other load (load only ever slows a round down)
            "tokens_per_s": max(r["tokens"] / r["seconds"] for r in result["rounds"]),
            "tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in result["rounds"]),
            "rounds": result["rounds"],
            "padding_waste": result["padding_waste"],
            "tokens_per_batch": result["tokens_per_batch"],
            "peak_memory_bytes": result["cuda_peak_bytes"] if device == "cuda" else result["rss_peak_bytes"],
            "training_memory_bytes": (result["cuda_peak_bytes"] if device == "cuda"
                                      else result["rss_peak_bytes"] - result["rss_start_bytes"]),
        }
    return trainers


def ratios(trainers: dict, name: str, reference: str, device: str) -> dict:
    """Throughput of `name` over `reference`, round by round (CPU seconds on CPU, wall clock on CUDA): the median
    and range of the per-round ratios, and the ratio of the best wall-clock rounds."""
    clock = "cpu_seconds" if device == "cpu" else "seconds"
    per_round = [(a["tokens"] / a[clock]) / (b["tokens"] / b[clock])
                 for a, b in zip(trainers[name]["rounds"], trainers[reference]["rounds"], strict=True)]
    return {"median": statistics.median(per_round), "rounds": per_round, "clock": clock,
            "best_wall": trainers[name]["tokens_per_s"] / trainers[reference]["tokens_per_s"]}


# ---------------------------------------------------------------------------------------------------------------
# 3. Data preparation
# ---------------------------------------------------------------------------------------------------------------
def domains() -> list[str]:
    """Domains with a data module (data/<domain>.py) and sample rows (data/samples/<domain>/)."""
    return sorted(p.stem for p in (REPO_ROOT / "data").glob("*.py")
                  if p.stem != "__init__" and (SAMPLES / p.stem).is_dir())


def synthetic_rows(sample_file: Path, rows: int, path: Path) -> Path:
    """`rows` rows in the sample file's schema, as JSON lines: its rows repeated, each made distinct (so that
    deduplication keeps them all) by a numbered string field."""
    from lora_recipes.data import read_file

    samples = read_file(sample_file)
    text_field = next(k for k, v in samples[0].items() if isinstance(v, str) and len(v) > 20)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = dict(samples[i % len(samples)])
            row[text_field] = f"{row[text_field]} (#{i})"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def data_preparation(rows: int, num_procs: tuple[int, ...], repeats: int, workdir: Path) -> list[dict]:
    """`prepare_data` on `rows` synthetic rows of every source schema, through both of its paths: a local file (staged
    as Arrow on disk a batch at a time, then converted from there, in this process) and the Arrow table that
    `load_dataset` returns for a Hub id (converted with `Dataset.map` in `num_proc` processes). The Hub table is read
    from the same rows beforehand, so its time is conversion, deduplication and split only. The local file is also
    measured for its peak memory: the growth of the resident set's peak (VmHWM, reset first) over its size before."""
    import importlib
    from unittest import mock

    import datasets

    from lora_recipes import data as data_module
    from lora_recipes.data import detect_schema, prepare_data, read_file

    datasets.disable_progress_bars()
    datasets.disable_caching()  # a repeat must convert again, not load the previous repeat's cache files
    results = []
    for domain in domains():
        module = importlib.import_module(f"data.{domain}")
        for sample_file in sorted(p for p in (SAMPLES / domain).iterdir() if p.suffix in (".jsonl", ".txt")):
            schema = detect_schema(read_file(sample_file)[0].keys(), module.SCHEMAS, str(sample_file)).name
            path = synthetic_rows(sample_file, rows, workdir / f"{domain}-{sample_file.stem}.jsonl")
            table = datasets.Dataset.from_json(str(path), cache_dir=str(workdir / "hf-cache"))
            hub_id = f"synthetic/{sample_file.stem}"
            paths = [("local file", None, str(path))] + [("Hub table", n, hub_id) for n in num_procs]
            for source_kind, num_proc, source in paths:
                seconds = []
                with mock.patch.object(data_module, "load_hub_train_split", lambda *_, table=table: table):
                    for _ in range(repeats):
                        before = release_free_memory()  # the previous run's garbage does not count
                        reset_peak_rss()
                        started = time.perf_counter()
                        prepared = prepare_data([source], module.SCHEMAS, eval_fraction=0.01, num_proc=num_proc)
                        seconds.append(time.perf_counter() - started)
                        peak = peak_rss() - before
                report = prepared.sources[0]
                if source_kind == "local file":
                    kept = report.kept  # the samples hold a few invalid rows: every path must drop the same ones
                elif report.kept != kept:
                    raise RuntimeError(f"{domain}/{schema}: {source_kind} kept {report.kept} rows, the local file "
                                       f"{kept}")
                results.append({"domain": domain, "schema": schema, "rows": rows, "source": source_kind,
                                "num_proc": num_proc, "seconds": seconds, "rows_per_s": rows / min(seconds),
                                "kept": report.kept, "dropped": report.dropped})
                if source_kind == "local file":
                    results[-1].update(file_bytes=path.stat().st_size, peak_memory_bytes=peak)
                print(f"  {domain}/{schema}, {source_kind}"
                      f"{f', num_proc {num_proc}' if num_proc else ''}: {rows / min(seconds):,.0f} rows/s", flush=True)
            path.unlink()
    return results


# ---------------------------------------------------------------------------------------------------------------
# 4. Launch to first optimizer step, as a user launches the recipe (and a bare TRL script, alternately)
# ---------------------------------------------------------------------------------------------------------------
PHASES = (("imports and tokenizer", "Converting "), ("data ready", "total: "),
          ("model and trainer ready", "global batch = "), ("first optimizer step", "'loss'"))
BASELINE_PHASES = (("first optimizer step", '"first_step"'),)
# The first step is the same work for both (model, batch, checkpointing); one micro-batch keeps it from drowning the
# start-up that differs
LAUNCH_ARGS = ("--logging_steps", "1", "--gradient_accumulation_steps", "1")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of process `root` and its descendants so far, reaped children included (Linux)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def timed_launch(cmd: list[str], phases: tuple) -> dict:
    """Seconds from starting `cmd` to the first output line that holds each phase's marker, wall clock and CPU time of
    its processes (`{"cpu_seconds": {phase: s}}`, which other load on the machine does not inflate as much); the
    processes are stopped at the last marker."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the launcher and the script it starts
    seen, cpu, tail = {}, {}, []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            for phase, marker in phases:
                if marker in line and phase not in seen:
                    seen[phase] = time.perf_counter() - started
                    cpu[phase] = tree_cpu_seconds(proc.pid)
            if len(seen) == len(phases):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if len(seen) != len(phases):
        missing = [phase for phase, _ in phases if phase not in seen]
        raise RuntimeError(f"{' '.join(cmd[-8:])}: failed or printed no marker for {missing}:\n{''.join(tail)}")
    return {**seen, "cpu_seconds": cpu}


def launch_to_first_step(model: Path, device: str, workdir: Path, repeats: int) -> dict:
    """`repeats` launches of the recipe and of a bare TRL script each, interleaved (ABBA: each goes first in every
    other round), so that the machine's load falls on both alike."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {"recipe": [], BASELINE: []}
    for i in range(repeats):
        args = [*run_args(device, model, workdir / f"launch{i}", 1), *LAUNCH_ARGS]
        spec = {"kind": "baseline", "domain": "medical", "config": str(RECIPE_CONFIG), "args": args, "launch": True}
        commands = {"recipe": ([*launcher, "recipes/sft_medical.py", *args], PHASES),
                    BASELINE: ([*launcher, "-m", "lora_recipes.measure", json.dumps(spec)], BASELINE_PHASES)}
        for name in list(commands)[:: 1 if i % 2 == 0 else -1]:
            runs[name].append(timed_launch(*commands[name]))
        print(f"  launch {i + 1}: first optimizer step after {runs['recipe'][-1]['first optimizer step']:.1f} s "
              f"(recipe), {runs[BASELINE][-1]['first optimizer step']:.1f} s (bare TRL)", flush=True)
    return runs


def launch_ratio(launches: dict, clock: str = "wall") -> float:
    """Median seconds to the first optimizer step, recipe over bare TRL, on the wall clock or in CPU seconds."""
    def seconds(run):
        return run["first optimizer step"] if clock == "wall" else run["cpu_seconds"]["first optimizer step"]

    return (statistics.median(seconds(run) for run in launches["recipe"])
            / statistics.median(seconds(run) for run in launches[BASELINE]))


def launch_markdown(results: dict) -> str:
    """The report of `--launch`: each phase, recipe against bare TRL, wall clock and CPU seconds."""
    m, launches = results["machine"], results["launch"]
    where = m["gpu"] if m["device"] == "cuda" else f"{m['cpu_cores']}-core CPU ({m['cpu']}), no GPU"
    lines = [f"`{results['command']}` on {where}; load average {m['load_average_at_start']:.1f} at start, "
             f"{results['load_average_at_end']:.1f} at the end. `accelerate launch recipes/sft_medical.py` (the real "
             f"defaults, on the bench model: random-init shape {results['model']}, the medical samples, "
             f"`{' '.join(LAUNCH_ARGS)}`) against a bare TRL `SFTTrainer` script on the same model, data and batch; "
             f"{len(launches['recipe'])} launches each, interleaved.", "",
             f"| `accelerate launch` to ... (median of {len(launches['recipe'])}) | recipe, wall | bare TRL, wall "
             "| recipe, CPU | bare TRL, CPU |", "|---|---|---|---|---|"]
    for phase, _ in PHASES:
        cells = []
        for clock in ("wall", "cpu"):
            for name in ("recipe", BASELINE):
                values = [run[phase] if clock == "wall" else run["cpu_seconds"][phase]
                          for run in launches[name] if phase in run]
                cells.append(f"{statistics.median(values):.1f} s" if values else "")
        lines.append(f"| {phase} | {' | '.join(cells)} |")
    lines += ["", f"Recipe / bare TRL, to the first optimizer step: **{launch_ratio(launches):.2f}x** wall clock, "
              f"**{launch_ratio(launches, 'cpu'):.2f}x** CPU seconds (of the launcher and the script, which the other "
              "load on a shared machine inflates less than the wall clock)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the memory planner against the allocator
# ---------------------------------------------------------------------------------------------------------------
def planner_on_cuda(workdir: Path, models: dict[str, dict] = MEMORY_MODELS) -> list[dict]:
    """The planner's peak against `torch.cuda.max_memory_allocated` of two recipe steps on random-init `models`
    (name -> config.json fields), with activation checkpointing on and off."""
    from lora_recipes.config import parse_args
    from lora_recipes.memory import architecture, plan, setup_from_args

    config = RECIPE_CONFIG
    results = []
    for name, shape in models.items():
        model = random_model(workdir / f"memory-{name}", **dict(shape))
        data = long_chats(workdir / f"memory-{name}.jsonl", rows=32, words=2000)
        for checkpointing in ("true", "false"):
            args = ["--config", str(config), "--model_name_or_path", str(model), "--dataset_name", str(data),
                    "--output_dir", str(workdir / f"memory-{name}-out"), "--max_steps", "2", "--eval_strategy", "no",
                    "--save_strategy", "no", "--report_to", "none", "--eval_fraction", "0",
                    "--activation_checkpointing", checkpointing]
            measured = measure({"kind": "recipe", "domain": "medical", "config": str(config), "args": args})
            _, training_args, model_args = parse_args(config, args)
            planned = plan(architecture(str(model)), setup_from_args(training_args, model_args))
            results.append({
                "model": name, "activation_checkpointing": checkpointing == "true",
                "planned_bytes": planned.peak_without_runtime, "measured_allocated_bytes": measured["cuda_peak_bytes"],
                "measured_reserved_bytes": measured["cuda_reserved_bytes"],
                "error": planned.peak_without_runtime / measured["cuda_peak_bytes"] - 1,
            })
            print(f"  {name}, checkpointing {checkpointing}: planner error {results[-1]['error']:+.1%}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    m = results["machine"]
    where = m["gpu"] if m["device"] == "cuda" else f"{m['cpu_cores']}-core CPU ({m['cpu']}), no GPU"
    cpu = m["device"] == "cpu"
    trainers = results["trainers"]
    rounds = trainers[BASELINE]["rounds"]
    lines = [
        f"`{results['command']}` on {where}"
        f"{' (trainers single-threaded, see below)' if cpu else ''}; load average "
        f"{m['load_average_at_start']:.1f} at start, {results['load_average_at_end']:.1f} at the end. Model: "
        f"random-init {results.get('model_name', 'Llama')} shape {results['model']}. "
        "Data: the SYNTHETIC medical samples.",
        "",
        f"| trainer | vs bare TRL: median (range) | non-padding tokens per {'CPU second' if cpu else 'second'} | "
        "best wall-clock tokens/s | "
        "padding waste | tokens/batch | peak memory | of which training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in trainers.items():
        r = results["ratios"].get(name)
        versus = f"**{r['median']:.2f}x** ({min(r['rounds']):.2f}-{max(r['rounds']):.2f})" if r else "1"
        median = statistics.median(x["tokens"] / x["cpu_seconds" if cpu else "seconds"] for x in t["rounds"])
        lines.append(f"| {name} | {versus} | {median:,.0f} | {t['tokens_per_s']:,.0f} | "
                     f"{t['padding_waste']:.0%} | {t['tokens_per_batch']:,.0f} | "
                     f"{t['peak_memory_bytes'] / 2**20:,.0f} MiB | {t['training_memory_bytes'] / 2**20:,.0f} MiB |")
    peak = ("the CUDA allocator's peak" if m["device"] == "cuda"
            else "peak resident set over the process after its imports (weights, data and runtime included); "
                 "of which training: its growth during the training steps")
    clock = ("CPU seconds of single-threaded trainers (unlike wall time, they do not grow when other processes "
             "share the cores)" if cpu else "wall-clock seconds")
    lines += ["", f"Each trainer: {len(rounds)} interleaved rounds of {rounds[0]['steps']} optimizer step(s), after "
              f"warm-up steps; ratio per round in {clock}, median and range over rounds. Peak memory: {peak}.", ""]
    if results.get("data_preparation"):  # the GPU benchmark (bench/gpu_throughput.py) has no such section
        repeats = len(results["data_preparation"][0]["seconds"])
        num_procs = sorted({d["num_proc"] for d in results["data_preparation"] if d["num_proc"]})
        # size and peak memory: measured since bench/data_memory.py exists (results before it lack them)
        memory = all("peak_memory_bytes" in d for d in results["data_preparation"] if d["source"] == "local file")
        lines += [f"| data preparation (`prepare_data`, rows/s, best of {repeats}) | rows | "
                  + ("file size | peak memory (local file) | " if memory else "") + "local .jsonl file | "
                  + " | ".join(f"Hub table, num_proc {n}" for n in num_procs) + " |",
                  "|---|---|---|" + "---|---|" * memory + "---|" * len(num_procs)]
        by_schema: dict[tuple, dict] = {}
        for d in results["data_preparation"]:
            by_schema.setdefault((d["domain"], d["schema"], d["rows"]), {})[d["num_proc"]] = d
        for (domain, schema, rows), runs in by_schema.items():
            local = runs[None]
            size = (f"{local['file_bytes'] / 2**20:,.1f} MiB | {local['peak_memory_bytes'] / 2**20:,.0f} MiB | "
                    if memory else "")
            lines.append(f"| {domain} / {schema} | {rows:,} | {size}{local['rows_per_s']:,.0f} | "
                         + " | ".join(f"{runs[n]['rows_per_s']:,.0f}" for n in num_procs) + " |")
    if results.get("launch"):
        launches = results["launch"]
        lines += ["", f"| `accelerate launch` to ... (median of {len(launches['recipe'])}) | recipe | bare TRL |",
                  "|---|---|---|"]
        for phase, _ in PHASES:
            bare = [run[phase] for run in launches[BASELINE] if phase in run]
            lines.append(f"| {phase} | {statistics.median(run[phase] for run in launches['recipe']):.1f} s | "
                         + (f"{statistics.median(bare):.1f} s |" if bare else "|"))
    if results.get("planner_on_cuda"):
        lines += ["", "| planner vs CUDA allocator | checkpointing | planned | measured | error |",
                  "|---|---|---|---|---|"]
        for r in results["planner_on_cuda"]:
            lines.append(f"| {r['model']} | {'on' if r['activation_checkpointing'] else 'off'} | "
                         f"{r['planned_bytes'] / 2**30:.2f} GiB | {r['measured_allocated_bytes'] / 2**30:.2f} GiB | "
                         f"{r['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def launch_only(device: str, repeats: int, output_dir: Path) -> None:
    """Section 4 alone: writes `launch-<device>.json|md`."""
    results = {"command": f"python bench/train_throughput.py --launch {repeats}", "machine": machine(device),
               "model": BENCH_MODEL}
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        model = random_model(workdir / "model", **dict(BENCH_MODEL))
        print("4. launch to first optimizer step", flush=True)
        results["launch"] = launch_to_first_step(model, device, workdir, repeats)
        results["launch_ratio"] = {"wall": launch_ratio(results["launch"]),
                                   "cpu": launch_ratio(results["launch"], "cpu")}
        results["load_average_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_results(output_dir / f"launch-{device}.json", results, launch_markdown(results))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every section in miniature (seconds, not minutes)")
    parser.add_argument("--launch", type=int, nargs="?", const=6, metavar="REPEATS",
                        help="only section 4, launch to first step, with REPEATS launches each (default 6)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.launch:
        launch_only(device, args.launch, args.output_dir)
        return
    warmup, rounds, steps_per_round = (1, 1, 1) if args.quick else (2, 12, 3)
    results = {"command": "python bench/train_throughput.py" + (" --quick" if args.quick else ""),
               "machine": machine(device)}
    stem = device + ("-quick" if args.quick else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    partial = args.output_dir / f"{stem}.partial.json"  # what a crash or an interrupt leaves behind
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        shape = QUICK_MODEL if args.quick else BENCH_MODEL
        model = random_model(workdir / "model", **dict(shape))
        results["model"] = shape
        print("1-2. trainers side by side", flush=True)
        results["trainers"] = side_by_side(model, device, workdir, warmup, rounds, steps_per_round,
                                           trainer_variants(device, args.quick))
        results["ratios"] = {name: ratios(results["trainers"], name, BASELINE, device)
                             for name in results["trainers"] if name != BASELINE}
        partial.write_text(json.dumps(results, indent=2) + "\n")
        print("3. data preparation", flush=True)
        # --quick: the fewest rows for which prepare_data starts worker processes at all
        results["data_preparation"] = data_preparation(MIN_ROWS_PER_PROCESS_POOL if args.quick else 100_000, (1, 2),
                                                       1 if args.quick else 2, workdir)
        partial.write_text(json.dumps(results, indent=2) + "\n")
        print("4. launch to first optimizer step", flush=True)
        results["launch"] = launch_to_first_step(model, device, workdir, 1 if args.quick else 5)
        if device == "cuda" and not args.quick:
            print("planner vs CUDA allocator", flush=True)
            results["planner_on_cuda"] = planner_on_cuda(workdir)
        results["load_average_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(args.output_dir / f"{stem}.json", results, markdown(results))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
