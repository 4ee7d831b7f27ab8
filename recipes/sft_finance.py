"""Fine-tune a financial analysis assistant with QLoRA: sentiment of financial news, questions on 10-K filings.

Real run on a GPU with the Hub sources of recipes/configs/finance.yaml, then the offline CPU demo:
    accelerate launch recipes/sft_finance.py
    accelerate launch recipes/sft_finance.py --config recipes/configs/finance_smoke.yaml \
        --output_dir outputs/finance-smoke

The Financial PhraseBank is script-only on the Hub; download FinancialPhraseBank-v1.0 and add its raw file:
    accelerate launch recipes/sft_finance.py --dataset_name FinGPT/fingpt-sentiment-train virattt/financial-qa-10K \
        FinancialPhraseBank-v1.0/Sentences_AllAgree.txt

Sources, label normalisation and the by-ticker split are in data/finance.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from data import finance  # noqa: E402
from lora_recipes.sft import run  # noqa: E402

if __name__ == "__main__":
    run(finance, default_config=Path(__file__).parent / "configs" / "finance.yaml")
