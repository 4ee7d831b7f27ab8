"""Every YAML parses against the pinned dataclasses; impossible settings fail early, in one line."""

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError

YAMLS = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


def test_there_are_yamls_to_check():
    assert len(YAMLS) >= 2


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses_against_pinned_dataclasses(path):
    # use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU
    data_args, training_args, model_args = parse_args(path, ["--config", str(path), "--use_cpu", "true"])
    assert data_args.dataset_name and model_args.model_name_or_path
    assert model_args.use_peft and training_args.assistant_only_loss


def test_real_defaults_are_4bit_qlora():
    medical_yaml = REPO_ROOT / "recipes" / "configs" / "medical.yaml"
    data_args, training_args, model_args = parse_args(medical_yaml, ["--use_cpu", "true"])
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_bnb_nested_quant
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.0)
    assert model_args.lora_target_modules == "all-linear"
    assert training_args.activation_checkpointing and training_args.gradient_checkpointing_kwargs == {
        "use_reentrant": False}
    assert training_args.ddp_find_unused_parameters is False
    assert training_args.lr_scheduler_type.value == "cosine" and training_args.warmup_steps > 0
    assert training_args.eval_strategy.value == "steps" and data_args.eval_fraction > 0


def test_cli_overrides_yaml():
    _, training_args, model_args = parse_args(SMOKE, ["--lora_r", "8", "--learning_rate", "1e-4", "--use_dora",
                                                      "true", "--use_rslora", "true"])
    assert (model_args.lora_r, training_args.learning_rate, model_args.use_dora, model_args.use_rslora) == (
        8, 1e-4, True, True)


@pytest.mark.parametrize("override, message", [
    (["--load_in_8bit", "true"], "8 bit and 4 bit"),
    (["--lora_r", "0"], "lora_r must be > 0"),
    (["--learning_rate", "-1"], "learning_rate must be > 0"),
    (["--use_peft", "false"], "set use_peft true"),
    (["--eval_fraction", "1.5"], "eval_fraction must be in"),
    (["--lorar", "8"], "not used by the HfArgumentParser"),
])
def test_impossible_settings_fail_before_loading(override, message):
    with pytest.raises(RecipeError, match=message):
        parse_args(SMOKE, override)


def test_unknown_yaml_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\nlora_rank: 8\n")
    with pytest.raises(RecipeError, match="Unknown arguments from config file: \\['--lora_rank'"):
        parse_args(bad, ["--config", str(bad)])


@pytest.mark.parametrize("args, message", [
    (["--lora_r", "-2"], "lora_r must be > 0"),
    (["--model_name_or_path", "/nonexistent/model"], "could not be loaded"),
    (["--dataset_name", "missing.jsonl"], "no such local file"),
])
def test_recipe_exits_with_one_line_and_no_traceback(args, message):
    proc = subprocess.run([sys.executable, "recipes/sft_medical.py", "--config", str(SMOKE), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_the_scripts_examples_read_the_folders_the_recipes_write():
    """Every `outputs/...` folder an example passes to --adapter or --model_name_or_path is the output_dir of a YAML or
    of another example: a user copying the commands in order finds each folder there."""
    import yaml

    docstrings = {path.name: ast.get_docstring(ast.parse(path.read_text())) or ""
                  for path in sorted((REPO_ROOT / "recipes").glob("*.py"))}
    written = {yaml.safe_load(path.read_text())["output_dir"] for path in (REPO_ROOT / "recipes" / "configs").glob(
        "*.yaml")}
    written |= {folder for text in docstrings.values() for folder in re.findall(r"--output_dir (outputs/\S+)", text)}
    read = [(name, folder) for name, text in docstrings.items()
            for folder in re.findall(r"--(?:adapter|model_name_or_path) (?:\w+=)?(outputs/[^\s/]+)", text)]
    assert len(read) >= 8
    assert [(name, folder) for name, folder in read if folder not in written] == []
