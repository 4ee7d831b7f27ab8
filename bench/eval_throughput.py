"""Evaluation's choice scoring, side by side: one full pass per option against each prompt read once.

    python bench/eval_throughput.py             # CPU here (~15 minutes on the shared 2 cores), CUDA when present
    python bench/eval_throughput.py --quick     # in miniature, seconds (a test runs it)

On the same random-init model of realistic proportions (bench/train_throughput.py's, no download) and the domains'
sample rows, for multiple choice with 4 options (MedQA), with 5 (CaseHOLD) and Yes/No/Maybe (PubMedQA):
- option by option: `continuation_logprobs` over every (prompt, option) request, the prompt in every pass;
- prompt once: `grouped_logprobs`, the scorer evaluation uses: one pass of each prompt gives every option's first
  token, and the options' other tokens are read from its KV cache.
Both take turns on the same requests, in a different order every round; each round times one pass of every task's
examples. On CPU the process runs one thread and speed is counted per CPU second (`time.process_time`), which other
processes on a shared machine do not inflate; the wall clock is recorded beside it. Ratios: median over rounds. Both
scorers' log-likelihoods and picks are compared too. Writes bench/results/eval-<device>.json and .md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.train_throughput import BENCH_MODEL, QUICK_MODEL, machine, write_results  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
SAMPLES = REPO_ROOT / "data" / "samples"
TASKS = {  # name -> (domain, sample file)
    "MedQA, 4 options": ("medical", "medqa.jsonl"),
    "CaseHOLD, 5 options": ("legal", "case_hold.jsonl"),
    "PubMedQA, Yes/No/Maybe": ("medical", "pubmedqa.jsonl"),
}
SCORERS = ("option by option", "prompt once")
BATCH_SIZE = 8  # recipes/evaluate.py's default
MAX_LENGTH = 2048  # its default without a run card


def choice_tasks(tokenizer, examples: int) -> dict:
    """name -> (requests, the example of each request, examples, options per example, mean prompt tokens)."""
    import importlib

    from lora_recipes.data import load_converted
    from lora_recipes.evaluation import build_tasks, choice_requests

    tasks = {}
    for name, (domain_name, file) in TASKS.items():
        domain = importlib.import_module(f"data.{domain_name}")
        rows, _ = load_converted(str(SAMPLES / domain_name / file), domain.SCHEMAS)
        [task] = build_tasks(name, rows, domain, examples, source=file)
        requests, owners, _ = choice_requests(tokenizer, task.items, MAX_LENGTH)
        contexts = {tuple(context) for context, _ in requests}
        tasks[name] = (requests, owners, len(task.items), len(task.items[0].options),
                       statistics.mean(len(context) for context in contexts))
    return tasks


def score(scorer: str, model, requests: list, pad_id: int) -> list[float]:
    from lora_recipes.evaluation import continuation_logprobs, grouped_logprobs

    function = continuation_logprobs if scorer == "option by option" else grouped_logprobs
    return function(model, requests, BATCH_SIZE, pad_id, desc=scorer)


def picks(scores: list[float], owners: list[int]) -> list[int]:
    best: dict[int, int] = {}
    for i, owner in enumerate(owners):
        if owner not in best or scores[i] > scores[best[owner]]:
            best[owner] = i
    return [best[owner] for owner in sorted(best)]


def side_by_side(model, tokenizer, tasks: dict, rounds: int, cuda: bool) -> dict:
    """Every task, both scorers in turn (the order alternating by round), after one untimed warm-up pass each."""
    import torch

    results = {}
    for name, (requests, owners, examples, options, prompt_tokens) in tasks.items():
        scores = {scorer: score(scorer, model, requests, tokenizer.pad_token_id) for scorer in SCORERS}  # warm-up
        timed = []
        for r in range(rounds):
            measured = {}
            for scorer in SCORERS[::-1] if r % 2 else SCORERS:
                started, cpu_started = time.perf_counter(), time.process_time()
                score(scorer, model, requests, tokenizer.pad_token_id)
                if cuda:
                    torch.cuda.synchronize()
                measured[scorer] = {"seconds": time.perf_counter() - started,
                                    "cpu_seconds": time.process_time() - cpu_started}
            timed.append(measured)
            print(f"  {name}, round {r + 1}/{rounds}: " + ", ".join(
                f"{scorer} {examples / m['seconds']:.1f} examples/s" for scorer, m in measured.items()), flush=True)
        old, new = scores["option by option"], scores["prompt once"]
        results[name] = {"examples": examples, "options": options, "requests": len(requests),
                         "mean_prompt_tokens": prompt_tokens, "rounds": timed,
                         "max_abs_difference": max(abs(a - b) for a, b in zip(old, new, strict=True)),
                         "same_picks": picks(old, owners) == picks(new, owners)}
    return results


def speed_up(task: dict, clock: str) -> dict:
    """Examples/s of prompt once over option by option, round by round: median and the per-round ratios."""
    per_round = [r["option by option"][clock] / r["prompt once"][clock] for r in task["rounds"]]
    return {"median": statistics.median(per_round), "rounds": per_round, "clock": clock}


def markdown(results: dict) -> str:
    m = results["machine"]
    cpu = m["device"] == "cpu"
    where = f"{m['cpu_cores']}-core CPU ({m['cpu']}), no GPU" if cpu else m["gpu"]
    clock = "cpu_seconds" if cpu else "seconds"
    unit = "CPU second" if cpu else "second"
    lines = [f"`{results['command']}` on {where}{', one thread' if cpu else ''}; load average "
             f"{m['load_average_at_start']:.1f} at start, {results['load_average_at_end']:.1f} at the end. Model: "
             f"random-init Llama shape {results['model']}, {results['dtype']}. Batch size {results['batch_size']}. "
             "Data: the SYNTHETIC sample rows.", "",
             f"| task | examples | mean prompt tokens | option by option: examples per {unit} | prompt once: "
             f"examples per {unit} | speed-up: median (range) | max log-likelihood difference | same picks |",
             "|---|---|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        ratio = task["speed_up"]
        speed = {scorer: statistics.median(task["examples"] / r[scorer][clock] for r in task["rounds"])
                 for scorer in SCORERS}
        lines.append(f"| {name} | {task['examples']} | {task['mean_prompt_tokens']:.0f} | "
                     f"{speed['option by option']:.1f} | {speed['prompt once']:.1f} | **{ratio['median']:.2f}x** "
                     f"({min(ratio['rounds']):.2f}-{max(ratio['rounds']):.2f}) | {task['max_abs_difference']:.1e} | "
                     f"{'yes' if task['same_picks'] else 'NO'} |")
    rounds = len(next(iter(results["tasks"].values()))["rounds"])
    lines += ["", f"{rounds} interleaved rounds per task, after one untimed pass of each scorer; ratio per round in "
              f"{'CPU seconds of the single-threaded process' if cpu else 'wall-clock seconds'}, median and range."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_recipes.measure import random_model

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # its CPU seconds then measure its work, whatever else the machine runs
    shape = QUICK_MODEL if args.quick else BENCH_MODEL
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as workdir:
        path = random_model(Path(workdir) / "model", **dict(shape))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda" if cuda else "cpu").eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    results = {"command": "python bench/eval_throughput.py" + (" --quick" if args.quick else ""),
               "machine": machine("cuda" if cuda else "cpu"), "model": shape,
               "dtype": str(dtype).removeprefix("torch."), "batch_size": BATCH_SIZE}
    tasks = choice_tasks(tokenizer, 4 if args.quick else 10)
    results["tasks"] = side_by_side(model, tokenizer, tasks, 1 if args.quick else 5, cuda)
    for task in results["tasks"].values():
        task["speed_up"] = speed_up(task, "seconds" if cuda else "cpu_seconds")
    results["load_average_at_end"] = os.getloadavg()[0]
    stem = f"eval-{results['machine']['device']}{'-quick' if args.quick else ''}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_results(args.output_dir / f"{stem}.json", results, markdown(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few examples, one round (seconds, not minutes)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    main(parser.parse_args())
