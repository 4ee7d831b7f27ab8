"""The medical recipe end to end on the tiny model, through the real 4-bit bitsandbytes path."""

import json

import pytest
import torch
from conftest import REPO_ROOT, TINY_MODEL, log_history
from safetensors.torch import load_file

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.sft import main

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


def logged_losses(output_dir):
    return [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]


def test_demo_as_a_user_runs_it(medical_smoke_run):
    output_dir, proc = medical_smoke_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "run_card.json",
                 "tokenizer.json", "chat_template.jinja"):
        assert (output_dir / name).is_file(), name
    losses = logged_losses(output_dir)
    assert len(losses) >= 4 and losses[0] > losses[-1] + 1.0, losses  # first logged loss clearly above the last
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 30  # the CLI override beat the YAML's max_steps
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert "global batch = 8 per device x 1 accumulation x 1 processes = 8" in proc.stdout
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]


def test_adapter_holds_only_lora_weights_for_all_linear_layers(medical_smoke_run):
    output_dir, _ = medical_smoke_run
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    projections = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(output_dir / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert len(weights) == 2 * 7 * 2  # A and B, 7 projections, 2 layers


def test_run_card_records_config_versions_data_and_metrics(medical_smoke_run):
    output_dir, _ = medical_smoke_run
    card = json.loads((output_dir / "run_card.json").read_text())
    assert card["base_model"] == "data/tiny-llama"
    assert card["config"]["model"]["load_in_4bit"] is True
    assert card["config"]["training"]["max_steps"] == 30
    assert card["versions"]["trl"] == "1.16.0" and card["versions"]["bitsandbytes"] == "0.50.2"
    assert card["git_commit"] is None or len(card["git_commit"]) >= 40
    by_source = {entry["source"].rsplit("/", 1)[-1]: entry for entry in card["data"]}
    assert by_source["medmcqa.jsonl"]["dropped"]["unlabelled (cop = -1)"] == 3
    assert by_source["flashcards.jsonl"]["dropped"]["duplicate"] > 0
    assert card["metrics"]["train_loss"] > 0 and "eval_loss" in card["metrics"]
    assert "hub_token" not in card["config"]["training"]


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """The same recipe in-process, so the trained in-memory model can be compared with what was saved."""
    output_dir = tmp_path_factory.mktemp("medical-inproc")
    args = parse_args(SMOKE, ["--output_dir", str(output_dir), "--max_steps", "20", "--eval_strategy", "no",
                              "--save_strategy", "no", "--eval_fraction", "0.1"])
    trainer = main(medical, *args)
    return trainer, output_dir, args


def load_4bit_base():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, quantization_config=quant, dtype=torch.float32)


def test_base_is_4bit_and_unchanged_lora_trained(in_process_run):
    trainer, _, _ = in_process_run
    model = trainer.model
    fresh = load_4bit_base()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    trained_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                    for k, v in model.state_dict().items() if "lora_" not in k}
    for name, value in fresh.state_dict().items():
        assert torch.equal(trained_base[name].cpu(), value), f"base weight {name} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    assert all(p.abs().sum() > 0 for p in lora_b)  # PEFT starts B at zero: non-zero means trained


def test_saved_adapter_reloads_with_the_same_logits(in_process_run):
    from peft import PeftModel

    trainer, output_dir, _ = in_process_run
    tokenizer = trainer.processing_class
    messages = [{"role": "user", "content": "Which test confirms hypothyroidism?"},
                {"role": "assistant", "content": "Serum TSH confirms the diagnosis."}]
    inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    in_memory = trainer.model.eval()
    reloaded = PeftModel.from_pretrained(load_4bit_base(), output_dir).eval()
    # TRL trains QLoRA adapters in bf16 (QLoRA paper); PEFT reloads them upcast to fp32: compute as in training
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    with torch.no_grad():
        expected = in_memory(**inputs).logits
        actual = reloaded(**inputs).logits
        base = reloaded.get_base_model()
        with reloaded.disable_adapter():
            without_adapter = base(**inputs).logits
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()
    assert (without_adapter - expected).abs().max() > 1e-2  # the adapter matters


def test_in_process_loss_went_down(in_process_run):
    _, output_dir, _ = in_process_run
    losses = logged_losses(output_dir)
    assert losses[0] > losses[-1] + 1.0, losses
