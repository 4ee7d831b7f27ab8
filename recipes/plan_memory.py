"""Will it fit? The peak memory of a LoRA / QLoRA run, term by term, before launching it (offline, no weights).

    python recipes/plan_memory.py --model Qwen/Qwen2.5-1.5B-Instruct --quant 4bit --lora_r 16 --max_length 2048 \
        --per_device_train_batch_size 4 --gpu_memory 24GB
    python recipes/plan_memory.py --model meta-llama/Llama-3.1-70B-Instruct --quant 4bit --gpu_memory 80GB \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8
    python recipes/plan_memory.py --model meta-llama/Llama-3.1-70B-Instruct --quant 4bit --gpu_memory 24GB \
        --num_processes 8 --strategy fsdp                                    # accelerate_configs/fsdp_qlora.yaml
    python recipes/plan_memory.py --model path/to/config.json --quant none     # any config.json or local model folder

`--model` takes a config.json, a local model folder, or a Hub id that matches a config shipped in
data/model_configs/ (Llama 3.1 8B/70B, Qwen2.5 0.5B/1.5B/7B, Mistral 7B, Phi-3-mini, Gemma 2 9B). With
`--gpu_memory` it also prints the largest per-device batch, and the gradient accumulation that keeps the same
sequences per step, that fits that GPU. Every recipe prints the same plan for its own settings with `--dry_run true`.
The arithmetic is lora_recipes/memory.py; tests/test_memory.py checks it against measured training steps.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402
from lora_recipes.memory import STRATEGIES, Setup, architecture, parse_memory, report  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    def flag(text: str) -> bool:
        return text.lower() in ("true", "1", "yes")

    defaults = Setup()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="config.json, local model folder, or Hub id of a shipped config")
    p.add_argument("--quant", choices=("4bit", "8bit", "none"), default=defaults.quant)
    p.add_argument("--use_bnb_nested_quant", type=flag, default=defaults.double_quant, help="4-bit double quant")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=defaults.dtype)
    p.add_argument("--bf16", type=flag, help="bf16 autocast, as the GPU recipes train (default: on CUDA, off on CPU)")
    p.add_argument("--lora_r", type=int, default=defaults.lora_r)
    p.add_argument("--lora_dropout", type=float, default=defaults.lora_dropout)
    p.add_argument("--lora_target_modules", nargs="+", default=[defaults.lora_target_modules])
    p.add_argument("--max_length", type=int, default=defaults.max_length)
    p.add_argument("--per_device_train_batch_size", type=int, default=defaults.per_device_train_batch_size)
    p.add_argument("--gradient_accumulation_steps", type=int, default=defaults.gradient_accumulation_steps)
    p.add_argument("--num_processes", type=int, default=defaults.world_size)
    p.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy,
                   help="how the processes split the model: ddp (multi_gpu.yaml), fsdp (fsdp_qlora.yaml), zero0-3 "
                        "(deepspeed_zero*.yaml)")
    p.add_argument("--activation_checkpointing", type=flag, default=defaults.activation_checkpointing)
    p.add_argument("--optim", default=defaults.optim)
    p.add_argument("--attn_implementation", default=defaults.attn_implementation)
    p.add_argument("--device", choices=("cuda", "cpu"), default=defaults.device)
    p.add_argument("--gpu_memory", help="target GPU memory, e.g. 24GB, 80GB (binary units, as GPUs are sold)")
    return p.parse_args(argv)


@exit_on_recipe_error
def main(argv=None) -> None:
    args = parse(argv)
    for name in ("lora_r", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_processes"):
        if getattr(args, name) <= 0:
            raise RecipeError(f"{name} must be > 0, got {getattr(args, name)}")
    bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    targets = args.lora_target_modules
    setup = Setup(
        quant=args.quant,
        double_quant=args.use_bnb_nested_quant,
        dtype=args.dtype,
        mixed_precision="bf16" if bf16 else None,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
        lora_target_modules=targets[0] if targets == ["all-linear"] else targets,
        max_length=args.max_length,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=args.num_processes,
        strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing,
        optim=args.optim,
        attn_implementation=args.attn_implementation,
        device=args.device,
    )
    budget = parse_memory(args.gpu_memory) if args.gpu_memory else None
    print(report(architecture(args.model), setup, budget))


if __name__ == "__main__":
    main()
