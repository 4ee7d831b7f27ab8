"""Fine-tune a legal research assistant with QLoRA on CaseHOLD holdings and Law Stack Exchange answers.

    accelerate launch recipes/sft_legal.py
    accelerate launch recipes/sft_legal.py --config recipes/configs/legal_smoke.yaml --output_dir outputs/legal-smoke

The first command is the real run (GPU, Hugging Face Hub, recipes/configs/legal.yaml); the second is the offline
demo on CPU with the tiny bundled model and synthetic samples. Check what the data looks like before training,
with only the tokenizer loaded:

    accelerate launch recipes/sft_legal.py --data_card_only true --output_dir outputs/legal-data

The assistant learns to say that it gives legal information, not advice, and that answers depend on the
jurisdiction (data/legal.py); CaseHOLD's validation and test splits are refused as training data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from data import legal  # noqa: E402
from lora_recipes.sft import run  # noqa: E402

if __name__ == "__main__":
    run(legal, default_config=Path(__file__).parent / "configs" / "legal.yaml")
