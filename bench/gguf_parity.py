"""GGUF parity on a real model: SmolLM2-135M-Instruct with a short medical LoRA run, merged, exported by
`recipes/export_gguf.py` at every quantisation (each with the GGUF LoRA on its base), and what each export's own check
measured against the merged transformers model.

    python bench/gguf_parity.py          # bench/results/gguf-cpu.json and .md (needs requirements-gguf.txt)

The adapter is trained as `tests/test_gguf.py` trains its real-model one (`train_and_merge`, shared): the medical
smoke YAML on the real model with a 16-bit base (4-bit steps take minutes on a CPU). Each export's `gguf_check.json`
is kept whole, with each GGUF's size.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
RESULTS = REPO_ROOT / "bench" / "results"

from bench.train_throughput import machine, write_results  # noqa: E402

# A short LoRA run on the real model: the medical smoke data, a 16-bit base, 128-token rows
REAL_RUN_ARGS = ("--config", "recipes/configs/medical_smoke.yaml", "--load_in_4bit", "false", "--max_steps", "2",
                 "--learning_rate", "2e-4", "--per_device_train_batch_size", "2", "--max_length", "128",
                 "--eval_strategy", "no", "--save_strategy", "no", "--eval_after_training", "false")
QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")


def run(*command: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def train_and_merge(model: Path, root: Path) -> tuple[Path, Path]:
    """The medical recipe's short run on `model` into root/adapter, merged by recipes/merge.py into root/merged."""
    run("recipes/sft_medical.py", *REAL_RUN_ARGS, "--model_name_or_path", str(model),
        "--output_dir", str(root / "adapter"))
    run("recipes/merge.py", "--adapter", str(root / "adapter"), "--output_dir", str(root / "merged"))
    return root / "adapter", root / "merged"


def export(adapter: Path, merged: Path, output_dir: Path, quantization: str) -> dict:
    """`recipes/export_gguf.py` with --lora_adapter from the merge: its gguf_check.json."""
    run("recipes/export_gguf.py", "--adapter", str(adapter), "--output_dir", str(output_dir),
        "--quantization", quantization, "--lora_adapter", "--merged", str(merged))
    return json.loads((output_dir / "gguf_check.json").read_text())


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# GGUF parity: llama.cpp against the merged transformers model", "",
             f"`{results['command']}` on {m['cpu']} ({m['cpu_cores']} cores). Model: {results['model']}, "
             f"LoRA trained by `recipes/sft_medical.py {' '.join(REAL_RUN_ARGS)}`, merged by `recipes/merge.py`. "
             f"{results['prompts']} chat prompts with the run's system prompt; every position of each prompt "
             "compared.", "",
             "| quantization | file | size | max \\|logit diff\\| | top-1 agreement | top-1 at decisive positions | "
             "mean KL | greedy identical |", "|---|---|---|---|---|---|---|---|"]
    for quantization, record in results["exports"].items():
        for check in record["checks"]:
            file = check["file"] + (f" + {check['lora']}" if check.get("lora") else "")
            greedy = (f"{check['greedy_identical']}/{check['greedy_prompts']}" if "greedy_identical" in check
                      else "not compared")
            lines.append(f"| {quantization} | {file} | {record['sizes'][check['file']] / 2**20:.1f} MiB | "
                         f"{check['max_logit_difference']:.3f} | {check['top1_agreement']:.3f} | "
                         f"{check['decisive_top1_agreement']:.3f} | {check['mean_kl']:.3g} | {greedy} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(RESULTS / "gguf-cpu.json"))
    args = parser.parse_args(argv)
    from lora_recipes.real_model import PACKAGE, build

    results = {"command": "python bench/gguf_parity.py", "machine": machine("cpu"),
               "model": f"SmolLM2-135M-Instruct ({PACKAGE})", "exports": {}}
    with tempfile.TemporaryDirectory(prefix="gguf-parity-") as tmp:
        adapter, merged = train_and_merge(build(), Path(tmp))
        for quantization in QUANTIZATIONS:
            output_dir = Path(tmp) / quantization
            record = export(adapter, merged, output_dir, quantization)
            record["adapter"] = "adapter"  # not this run's temporary folder
            record["sizes"] = {p.name: p.stat().st_size for p in output_dir.glob("*.gguf")}
            results["exports"][quantization], results["prompts"] = record, record["prompts"]
            print(f"{quantization}: {record['checks']}", flush=True)
    write_results(Path(args.output), results, markdown(results))


if __name__ == "__main__":
    main()
