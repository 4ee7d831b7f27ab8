"""What a recipe does before its first optimizer step, beyond what a bare TRL SFTTrainer does: its checks, the data
card's numbers and one token-length pass whose ids SFTTrainer trains on; nothing it can do after training (the card's
histogram: matplotlib is imported after the last step). The timings are in bench/ (`--launch`)."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

# the recipe in a fresh process (modules imported by other tests must not count), its first step probed
PROBE = """
import json, sys
from pathlib import Path
from transformers import TrainerCallback
from data import medical
from lora_recipes.config import parse_args
from lora_recipes.sft import main

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            out = Path(args.output_dir)
            print("probe: " + json.dumps({"matplotlib": [m for m in sys.modules if m.split(".")[0] == "matplotlib"],
                                          "card": sorted(p.name for p in out.glob("data_card*"))}))

main(medical, *parse_args(Path("recipes/configs/medical_smoke.yaml"), sys.argv[1:]), callbacks=[FirstStep()])
"""


def test_nothing_that_can_wait_runs_before_the_first_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", PROBE, "--output_dir", str(out), "--max_steps", "1",
                           "--eval_strategy", "no", "--save_strategy", "no", "--eval_after_training", "false",
                           "--report_to", "none"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("probe: ")]
    at_first_step = json.loads(line.removeprefix("probe: "))
    assert at_first_step == {"matplotlib": [], "card": ["data_card.json", "data_card.md"]}
    assert (out / "data_card_lengths.png").stat().st_size > 5_000  # drawn after training
