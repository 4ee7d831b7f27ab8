"""The run card: what a run was (resolved config, versions, commit, data counts) and what it measured.

Secrets from the environment (HF_TOKEN, WANDB_API_KEY, anything named like a token, key or password) never
reach it: `redact` replaces their values wherever they appear.
"""

import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
from enum import Enum
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers")
SECRET_NAME = re.compile(r"TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
NOT_SECRET_FIELDS = {"hub_token"}  # TrainingArguments keeps the token itself; the card never does


def secret_env() -> dict[str, str]:
    """Environment variables that look like secrets (named like one, and long enough to be a real one)."""
    return {k: v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}


def secret_values() -> list[str]:
    """The values of `secret_env`, longest first (so a secret containing another is replaced whole)."""
    return sorted(set(secret_env().values()), key=len, reverse=True)


def redact(obj, secrets: list[str] | None = None):
    """A copy of `obj` (JSON-like) with every secret value replaced by '<redacted>'."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, "<redacted>")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return config_dict(value)
    return str(value)


def config_dict(args) -> dict:
    """The init fields of a config dataclass as JSON values, with the Hub token dropped."""
    return {
        f.name: _jsonable(getattr(args, f.name))
        for f in dataclasses.fields(args)
        if f.init and f.name not in NOT_SECRET_FIELDS
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The repository's commit, with '-dirty' when tracked files have local changes; None outside a git clone."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def write_json(path: Path, payload: dict) -> Path:
    """Write JSON with secrets redacted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(redact(_jsonable(payload)), indent=2) + "\n", encoding="utf-8")
    return path
