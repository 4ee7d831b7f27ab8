"""Trainable-parameter fraction of LoRA on real architectures, computed on the meta device from their configs."""

import json

import pytest
from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "data" / "model_configs"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expected_lora_params(cfg: dict, r: int) -> int:
    """r * (in + out) for every attention and MLP projection, counted by hand from the config."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    h, kv, ffn = cfg["hidden_size"], cfg["num_key_value_heads"] * head_dim, cfg["intermediate_size"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ffn), (h, ffn), (ffn, h)]
    return cfg["num_hidden_layers"] * sum(r * (i + o) for i, o in shapes)


@pytest.mark.parametrize("name, low, high", [
    ("llama-3.1-8b.json", 0.45, 0.6),  # ~0.52%: r=16 on all linear layers of an 8B model
    ("qwen2.5-1.5b-instruct.json", 1.0, 1.3),
])
def test_lora_fraction_on_meta_device(name, low, high):
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((CONFIGS / name).read_text())
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == expected_lora_params(cfg, 16)
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == set(LINEAR)
    assert low < 100 * trainable / total < high, 100 * trainable / total
