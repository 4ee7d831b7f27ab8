"""Shared fixtures: everything offline, the tiny bundled model, and one smoke training run per session."""

import os

# Before any Hugging Face import: never reach for the network, never prompt for a wandb login.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO_ROOT / "data" / "tiny-llama"
SAMPLES = REPO_ROOT / "data" / "samples"


def run_recipe(script: str, *args: str, cwd: Path = REPO_ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a recipe the way a user does (`accelerate launch recipes/...`), capturing its output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="session")
def medical_smoke_run(tmp_path_factory):
    """The medical offline demo, launched as the README says, with CLI overrides: (output_dir, process)."""
    output_dir = tmp_path_factory.mktemp("medical-smoke")
    proc = run_recipe("recipes/sft_medical.py", "--config", "recipes/configs/medical_smoke.yaml",
                      "--output_dir", str(output_dir), "--max_steps", "30", "--save_steps", "15",
                      "--eval_steps", "15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, proc
