"""The committed tiny model is exactly what the builder makes from the bundled samples, offline; so is each tokenizer
family's tiny model, with its kind of tokenizer and its special tokens."""

import json

import pytest
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


@pytest.mark.parametrize("family", sorted(tiny_model.FAMILIES))
def test_family_tokenizer_is_its_kind_with_single_token_specials(family, family_models):
    from transformers import AutoTokenizer

    spec = tiny_model.FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(family_models[family])
    state = json.loads((family_models[family] / "tokenizer.json").read_text())
    text = "Which test confirms gout? ☃"  # the snowman is in no sample: byte-level, or SentencePiece byte fallback
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    if spec.pattern:
        assert state["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == spec.pattern
        assert "Ġtest" in pieces and "<0xE2>" not in pieces
    else:
        assert state["pre_tokenizer"]["type"] == "Metaspace" and state["model"]["byte_fallback"]
        assert ["<0xE2>", "<0x98>", "<0x83>"] == pieces[-3:] and spec.unk not in pieces
        assert pieces[0].startswith("▁") == spec.dummy_prefix  # Gemma writes no "▁" before the first word
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    for token in spec.special_tokens:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    # the tokenizer adds its BOS to plain text as the family's does; the chat template decides for chats
    with_specials = tokenizer(text)["input_ids"]
    assert (with_specials[0] == tokenizer.bos_token_id) == (spec.bos is not None)
    config = json.loads((family_models[family] / "config.json").read_text())
    assert config["model_type"] == spec.model_type and config["eos_token_id"] == tokenizer.eos_token_id


def test_family_build_is_deterministic(family_models, tmp_path):
    again = tiny_model.build_family("gemma2", tmp_path / "gemma2")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (family_models["gemma2"] / name).read_bytes(), name
