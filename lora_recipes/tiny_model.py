"""Build the tiny offline model used by the smoke configs, the tests and the notebooks.

A byte-level BPE tokenizer trained on the bundled synthetic samples, a ChatML template with
`{% generation %}` markers, and a randomly initialised Llama-family model of a few hundred KB. The build is
deterministic (fixed seeds, sorted inputs), so the committed copy in `data/tiny-llama/` can be checked
against a fresh build.

    python -m lora_recipes.tiny_model                       # rewrites data/tiny-llama/
    python -m lora_recipes.tiny_model --output_dir /tmp/tiny
"""

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "data" / "samples"
TINY_MODEL_DIR = REPO_ROOT / "data" / "tiny-llama"
CHATML_TEMPLATE = Path(__file__).resolve().parent / "chat_templates" / "chatml.jinja"

PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1024  # small enough for a few hundred KB, large enough that samples are ~4 bytes per token
EMBEDDING_STD = 0.15  # small enough for a few hundred KB, large enough that samples are ~4 bytes per token


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def sample_texts() -> list[str]:
    """Every string in every bundled sample file (.jsonl, and the PhraseBank-format .txt), in a fixed order."""
    from .data import read_file

    texts = []
    for path in sorted([*SAMPLES_DIR.glob("*/*.jsonl"), *SAMPLES_DIR.glob("*/*.txt")]):
        texts.extend(_strings(read_file(path)))
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample_texts(), trainer)
    # pad differs from EOS, so padding never hides the end-of-turn token from the loss
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHATML_TEMPLATE.read_text(encoding="utf-8"),
        model_max_length=512,
    )


def build(output_dir: Path = TINY_MODEL_DIR) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real Llama and Qwen models
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # With the default 0.02 init, the tied output embeddings are too small for any logit to stand out, and a
    # frozen-base adapter could never lower the loss much: give them the scale a trained model has.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_STD)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=64
    )
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=TINY_MODEL_DIR)
    print(f"Tiny model written to {build(parser.parse_args().output_dir)}")
