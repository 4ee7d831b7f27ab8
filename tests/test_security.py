"""Security: no secret reaches any output, trust_remote_code only when asked, safetensors only, no dataset code."""

import ast
import json
import os
import pickle
import shutil

import pytest
from conftest import FAKE_SECRETS, REPO_ROOT, TINY_MODEL, TouchOnUnpickle

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.data import load_hub_train_split, prepare_data
from lora_recipes.errors import RecipeError
from lora_recipes.model import load_model
from lora_recipes.run_card import write_json
from lora_recipes.sft import main

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


def test_no_secret_from_the_environment_reaches_any_output(medical_smoke_run):
    output_dir, proc = medical_smoke_run
    # the smoke run had the fake secrets in its environment (conftest), so a leak would show
    assert all(os.environ[name] == value for name, value in FAKE_SECRETS.items())
    searched = {p.relative_to(output_dir).as_posix(): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    assert {"run_card.json", "trainer_state.json", "checkpoint-15/training_args.bin", "checkpoint-30/optimizer.pt",
            "checkpoint-30/trainer_state.json", "adapter_config.json", "tokenizer_config.json"} <= set(searched)
    searched["stdout"], searched["stderr"] = proc.stdout.encode(), proc.stderr.encode()
    leaks = [(name, secret) for name, content in searched.items() for secret in FAKE_SECRETS
             if FAKE_SECRETS[secret].encode() in content]
    assert not leaks


def test_the_run_card_writer_redacts_secrets_from_the_environment(tmp_path):
    path = write_json(tmp_path / "card.json", {"note": f"token={FAKE_SECRETS['HF_TOKEN']}",
                                               "nested": [{"key": FAKE_SECRETS["WANDB_API_KEY"]}]})
    assert json.loads(path.read_text()) == {"note": "token=<redacted>", "nested": [{"key": "<redacted>"}]}


def test_trust_remote_code_is_off_by_default(medical_smoke_run):
    output_dir, _ = medical_smoke_run
    assert json.loads((output_dir / "run_card.json").read_text())["trust_remote_code"] is False
    _, training_args, _ = parse_args(SMOKE, [])
    assert training_args.trust_remote_code is False


def test_trust_remote_code_when_given_reaches_the_loaders_and_the_run_card(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs.get("trust_remote_code")
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    args = parse_args(SMOKE, ["--output_dir", str(tmp_path), "--trust_remote_code", "true", "--max_steps", "1",
                              "--eval_strategy", "no", "--save_strategy", "no"])
    main(medical, *args)
    assert seen == {"AutoTokenizer": True, "AutoModelForCausalLM": True}
    assert json.loads((tmp_path / "run_card.json").read_text())["trust_remote_code"] is True


def test_model_weights_are_read_from_safetensors_never_from_a_pickle_beside_them(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    _, training_args, model_args = parse_args(SMOKE, ["--model_name_or_path", str(folder)])
    model = load_model(model_args, training_args)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not marker.exists()


def test_no_dataset_loader_is_given_trust_remote_code():
    calls = []
    for path in [*(REPO_ROOT / "lora_recipes").rglob("*.py"), *(REPO_ROOT / "data").rglob("*.py"),
                 *(REPO_ROOT / "recipes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "load_dataset", "load_dataset_builder"):
                calls.append((path.name, [k.arg for k in node.keywords]))
    assert calls, "expected the Hub loader in lora_recipes/data.py"
    assert all("trust_remote_code" not in keywords for _, keywords in calls), calls


def test_a_dataset_repository_script_never_runs(tmp_path):
    repo = tmp_path / "owner" / "cases"
    repo.mkdir(parents=True)
    marker = tmp_path / "script-ran"
    (repo / "cases.py").write_text(f"open({str(marker)!r}, 'w')\n")
    # the Hub path: datasets refuses repositories with a loading script instead of running it
    with pytest.raises(RecipeError, match="Dataset scripts are no longer supported"):
        load_hub_train_split(str(repo))
    # the local path: only data files are read, a script beside them is ignored
    (repo / "rows.jsonl").write_text(json.dumps({"input": "What is X?", "output": "X is Y."}) + "\n")
    data = prepare_data([str(repo)], medical.SCHEMAS, eval_fraction=0.0)
    assert len(data.train) == 1
    assert not marker.exists()
