"""Fine-tune a medical assistant with QLoRA: 4-bit NF4 base + LoRA adapter, loss on the assistant turns only.

Real run (GPU, Hugging Face Hub; defaults in recipes/configs/medical.yaml):
    accelerate launch recipes/sft_medical.py

Offline demo (CPU, no network, tiny bundled model and synthetic samples; times in bench/results/demo-cpu.md):
    accelerate launch recipes/sft_medical.py --config recipes/configs/medical_smoke.yaml \
        --output_dir outputs/medical-smoke

Several GPUs (DDP, one process per GPU, the global batch kept at 16; FSDP, DeepSpeed and SLURM:
docs/distributed.md), your own data, any YAML setting:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 recipes/sft_medical.py \
        --gradient_accumulation_steps 1 --dataset_name my_cases.jsonl GBaker/MedQA-USMLE-4-options --lora_r 32 \
        --output_dir outputs/medical-r32

Data: MedQA-USMLE (train), MedMCQA (train) and the medalpaca flashcards, converted by data/medical.py.
The flow (tokenizer, data, 4-bit model + LoRA, train, save) is lora_recipes/sft.py, shared by every domain.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from data import medical  # noqa: E402
from lora_recipes.sft import run  # noqa: E402

if __name__ == "__main__":
    run(medical, default_config=Path(__file__).parent / "configs" / "medical.yaml")
