"""The offline demos as the README launches them: wall time end to end, training time, first and last logged loss.

    python bench/demo.py               # the three *_smoke.yaml demos, 2 rounds and the medical demo in bf16
    python bench/demo.py --rounds 1 --demos medical

Each round launches every demo once (`accelerate launch recipes/sft_<domain>.py --config
recipes/configs/<domain>_smoke.yaml`, offline), in a different order every round, into a fresh output folder.
Wall time runs from the launch to the exit (start-up, data, training, evaluation and plots included); training
time is the Trainer's `train_runtime`. The losses are deterministic (seeded); the times depend on the machine and on
what else runs on it, so the load average is recorded with them. Writes bench/results/demo-<device>.json and .md,
which the docs quote (tests/test_figures.py checks the quotes).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.train_throughput import machine, write_results  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
DOMAINS = ("medical", "legal", "finance")
# name -> (domain, overrides): the demos as shipped, and the medical demo with bf16 weights and autocast, which
# medical_smoke.yaml's choice of float32 for the tiny model rests on
DEMOS = {"medical": ("medical", ()), "legal": ("legal", ()), "finance": ("finance", ()),
         "medical, bf16": ("medical", ("--dtype", "bfloat16", "--bf16", "true"))}


def launch(domain: str, overrides: tuple[str, ...], output_dir: Path) -> dict:
    """One demo, launched as a user does; its wall time, training time, losses and data sizes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", f"recipes/sft_{domain}.py",
               "--config", f"recipes/configs/{domain}_smoke.yaml", "--output_dir", str(output_dir), *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: the {domain} demo failed:\n{proc.stderr[-3000:]}")
    losses = [entry["loss"] for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    card = json.loads((output_dir / "run_card.json").read_text())
    return {"seconds": seconds, "train_seconds": card["metrics"]["train_runtime"], "steps": card["config"]["training"][
        "max_steps"], "first_loss": losses[0], "last_loss": losses[-1],
            "rows": {key: sum(source[key] for source in card["data"]) for key in ("read", "train", "eval")},
            "load_average": os.getloadavg()[0]}


def summarise(runs: list[dict]) -> dict:
    first = runs[0]
    return {"runs": runs, "seconds_min": min(r["seconds"] for r in runs),
            "seconds_max": max(r["seconds"] for r in runs),
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "train_seconds_median": statistics.median(r["train_seconds"] for r in runs),
            "steps": first["steps"], "first_loss": first["first_loss"], "last_loss": first["last_loss"],
            "rows": first["rows"]}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"`{results['command']}` on {m['cpu_cores']}-core CPU ({m['cpu']}), no GPU; load average "
             f"{m['load_average_at_start']:.1f} at start, {results['load_average_at_end']:.1f} at the end. "
             f"{results['rounds']} round(s), the demos in a different order each round.", "",
             "| demo | rows read -> train / eval | steps | training loss, first -> last log | training time (median) "
             "| end to end: median (range) |",
             "|---|---|---|---|---|---|"]
    for name, d in results["demos"].items():
        rows = d["rows"]
        lines.append(f"| {name} | {rows['read']} -> {rows['train']} / {rows['eval']} | {d['steps']} | "
                     f"{d['first_loss']:.2f} -> {d['last_loss']:.2f} | "
                     f"{d['train_seconds_median']:.0f} s | {d['seconds_median']:.0f} s "
                     f"({d['seconds_min']:.0f}-{d['seconds_max']:.0f} s) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--demos", nargs="+", choices=DEMOS, default=list(DEMOS))
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    full = args.rounds == 2 and args.demos == list(DEMOS)
    command = "python bench/demo.py" + ("" if full else f" --rounds {args.rounds} --demos {shlex.join(args.demos)}")
    results = {"command": command, "machine": machine("cpu"), "rounds": args.rounds}
    runs = {name: [] for name in args.demos}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.demos[r % len(args.demos):] + args.demos[:r % len(args.demos)]
            for i, name in enumerate(order):
                runs[name].append(launch(*DEMOS[name], Path(tmp) / f"{r}-{i}"))
                print(f"round {r + 1}: {name}: {runs[name][-1]['seconds']:.0f} s", flush=True)
    results["demos"] = {name: summarise(runs[name]) for name in args.demos}
    results["load_average_at_end"] = os.getloadavg()[0]

    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = "demo-cpu" if full else "demo-cpu-partial"
    write_results(args.output_dir / f"{name}.json", results, markdown(results))


if __name__ == "__main__":
    main()
