"""The committed tiny model is exactly what the builder makes from the bundled samples, offline."""

import json

from conftest import SAMPLES, TINY_MODEL

from lora_recipes import tiny_model


def test_committed_tiny_model_matches_a_fresh_build(tmp_path):
    built = tiny_model.build(tmp_path / "tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (built / name).read_bytes() == (TINY_MODEL / name).read_bytes(), (
            f"{name} differs: rebuild with `python -m lora_recipes.tiny_model` after changing data/samples")


def test_tiny_model_is_small_llama_with_distinct_pad_and_eos():
    config = json.loads((TINY_MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["pad_token_id"] != config["eos_token_id"]
    assert (TINY_MODEL / "model.safetensors").stat().st_size < 1_000_000
    assert "{% generation %}" in (TINY_MODEL / "chat_template.jinja").read_text().replace("-", "")


def test_samples_are_marked_synthetic():
    files = sorted(SAMPLES.glob("*/*.jsonl"))
    assert files
    for path in files:
        for line in path.read_text().splitlines():
            assert "synthetic" in line.lower(), f"{path}: every sample row carries the SYNTHETIC marker"
