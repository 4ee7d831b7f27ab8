"""The GPU section of the benchmark: what only a CUDA machine can measure, in one command.

    python bench/gpu_throughput.py           # CUDA (never run yet); writes bench/results/<gpu>.json and .md
    python bench/gpu_throughput.py --plan    # any machine: print what it would run, run nothing

Without a CUDA device it prints the plan and exits 0 (skipped), so any script may call it. On the default model's
real shape (Qwen2.5-1.5B-Instruct from data/model_configs/, random weights: no download), the SYNTHETIC medical
samples and one seed, side by side like bench/train_throughput.py (each trainer its own process, interleaved rounds,
ratios as medians over rounds, wall clock):
1. the recipe (recipes/configs/medical.yaml as is: 4-bit NF4, bf16, checkpointing) against a bare TRL SFTTrainer,
   padded batches;
2. packed rows with padding-free batches (bfd) on SDPA, and on flash_attention_2 when flash-attn is installed;
3. TRL's `use_liger_kernel` on (the recipe row is off), when liger-kernel is installed; activation checkpointing off;
4. the memory planner's peak against `torch.cuda.max_memory_allocated` of real steps, checkpointing on and off.

An offline GPU machine needs wheels brought along: on a Linux x86_64 machine with Python 3.11 and PyPI,
`pip download -r requirements.txt -d wheels/` (torch from PyPI on Linux is the CUDA build; the pins are exactly the
ones the tests ran), optionally
`liger-kernel>=0.8.2` (TRL 1.16's minimum) and a flash-attn wheel built for that torch and CUDA; then
`pip install --no-index --find-links wheels/ -r requirements.txt` on the GPU machine.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.train_throughput import (  # noqa: E402
    BASELINE,
    RESULTS,
    machine,
    markdown,
    planner_on_cuda,
    ratios,
    side_by_side,
    write_results,
)
from lora_recipes.measure import random_model  # noqa: E402
from lora_recipes.memory import MODEL_CONFIGS  # noqa: E402

DEFAULT_MODEL = "qwen2.5-1.5b-instruct"  # the base of recipes/configs/medical.yaml, by its shipped config.json
WARMUP, ROUNDS, STEPS_PER_ROUND = 2, 6, 3
PACKED = ["--packing", "true", "--max_length", "768", "--per_device_train_batch_size", "1"]  # as on CPU


def default_model_shape() -> dict:
    """The default model's config.json fields that shape the network (token ids come from the bench tokenizer)."""
    config = json.loads((MODEL_CONFIGS / f"{DEFAULT_MODEL}.json").read_text())
    token_ids = ("bos_token_id", "eos_token_id")
    return {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", *token_ids)}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def variants(flash_attn: bool, liger: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (kind, overrides of medical.yaml); rows that need a package appear only where it is installed."""
    rows = {BASELINE: ("baseline", []), "recipe": ("recipe", []),
            "recipe + packing (bfd, padding-free, 1 row of 768), sdpa": ("recipe", PACKED)}
    if flash_attn:
        rows["recipe, flash_attention_2"] = ("recipe", ["--attn_implementation", "flash_attention_2"])
        rows["recipe + packing (bfd, padding-free, 1 row of 768), flash_attention_2"] = (
            "recipe", [*PACKED, "--attn_implementation", "flash_attention_2"])
    if liger:
        rows["recipe, use_liger_kernel"] = ("recipe", ["--use_liger_kernel", "true"])
    rows["recipe, activation checkpointing off"] = ("recipe", ["--activation_checkpointing", "false"])
    return rows


def plan_text(flash_attn: bool, liger: bool) -> str:
    lines = [f"Model: random-init {DEFAULT_MODEL} shape (data/model_configs/{DEFAULT_MODEL}.json), the SYNTHETIC "
             f"medical samples; {ROUNDS} interleaved rounds of {STEPS_PER_ROUND} optimizer steps after {WARMUP} "
             "warm-up steps.", "Trainers side by side (YAML overrides of recipes/configs/medical.yaml):"]
    lines += [f"  - {name}: {' '.join(overrides) or '(as is)'}" for name, (_, overrides) in
              variants(flash_attn, liger).items()]
    for package, present in (("flash-attn", flash_attn), ("liger-kernel", liger)):
        if not present:
            lines.append(f"  ({package} is not installed: its rows are left out)")
    lines.append(f"Memory planner vs torch.cuda.max_memory_allocated: {DEFAULT_MODEL}, medical.yaml, activation "
                 "checkpointing on and off.")
    lines.append("Writes bench/results/<gpu>.json and bench/results/<gpu>.md.")
    return "\n".join(lines)


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the results file of that GPU."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print what would run and exit")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    flash_attn, liger = installed("flash_attn"), installed("liger_kernel")
    if args.plan or not torch.cuda.is_available():
        if not args.plan:
            print("No CUDA device: the GPU benchmark is skipped. On a CUDA machine it runs:")
        print(plan_text(flash_attn, liger))
        return 0

    results = {"command": "python bench/gpu_throughput.py", "machine": machine("cuda"), "model_name": DEFAULT_MODEL}
    stem = gpu_slug(results["machine"]["gpu"])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        shape = default_model_shape()
        model = random_model(workdir / "model", **dict(shape))
        results["model"] = shape
        print("1-3. trainers side by side", flush=True)
        results["trainers"] = side_by_side(model, "cuda", workdir, WARMUP, ROUNDS, STEPS_PER_ROUND,
                                           variants(flash_attn, liger))
        results["ratios"] = {name: ratios(results["trainers"], name, BASELINE, "cuda")
                             for name in results["trainers"] if name != BASELINE}
        print("4. planner vs CUDA allocator", flush=True)
        results["planner_on_cuda"] = planner_on_cuda(workdir, {DEFAULT_MODEL: shape})
        results["load_average_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(args.output_dir / f"{stem}.json", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
