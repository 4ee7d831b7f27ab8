"""Build the tiny offline model used by the smoke configs, the tests and the notebooks.

A byte-level BPE tokenizer trained on the bundled synthetic samples, a ChatML template with
`{% generation %}` markers, and a randomly initialised Llama-family model of a few hundred KB. The build is
deterministic (fixed seeds, sorted inputs), so the committed copy in `data/tiny-llama/` can be checked
against a fresh build.

One tiny model per tokenizer family of the shipped model configs (`--family NAME`) carries that family's
published chat template and special tokens: the tests run the assistant mask, EOS, evaluation and training over
all of them, built on the fly.

    python -m lora_recipes.tiny_model                       # rewrites data/tiny-llama/
    python -m lora_recipes.tiny_model --output_dir /tmp/tiny
    python -m lora_recipes.tiny_model --family gemma2 --output_dir /tmp/tiny-gemma2
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .templates import CHAT_TEMPLATES, CHATML_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "data" / "samples"
TINY_MODEL_DIR = REPO_ROOT / "data" / "tiny-llama"
FAMILY_TEMPLATES = CHAT_TEMPLATES / "families"

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


def _save_model(tokenizer, output_dir: Path, model_type: str = "llama", **config) -> Path:
    """A random-init model of `model_type` sized for tests, with the tokenizer's special tokens, saved with it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real Llama and Qwen models
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # With the default 0.02 init, the tied output embeddings are too small for any logit to stand out, and a
    # frozen-base adapter could never lower the loss much: give them the scale a trained model has.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64,
    )
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def build(output_dir: Path = TINY_MODEL_DIR) -> Path:
    return _save_model(build_tokenizer(), output_dir)


# Pre-tokenizer patterns of the byte-level BPE families, as their tokenizer.json files publish them
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Family:
    """A tokenizer family as its instruct models ship: tokenizer kind, special tokens, chat template, model type."""

    template: str  # TRL's stored copy of the published template (`trl.chat_template_utils.<name>_chat_template`),
    #                or a file under lora_recipes/chat_templates/families/
    model_type: str
    special_tokens: tuple[str, ...]
    eos: str
    end_of_turn: str  # the token an assistant turn ends with, known from the family's format
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    pattern: str | None = None  # byte-level BPE with this regex; None: SentencePiece-style BPE with byte fallback
    dummy_prefix: bool = True  # SentencePiece: a "▁" before the first word (Gemma has none)
    config: tuple[tuple[str, object], ...] = ()

    def chat_template(self) -> str:
        import trl.chat_template_utils

        if self.template.endswith(".jinja"):
            return (FAMILY_TEMPLATES / self.template).read_text(encoding="utf-8")
        return getattr(trl.chat_template_utils, f"{self.template}_chat_template")


LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>")
SENTENCEPIECE_SPECIAL = ("<unk>", "<s>", "</s>")
FAMILIES = {
    # Meta-Llama-3-8B-Instruct as first released: BOS written by the template, EOS <|end_of_text|> while turns end
    # on <|eot_id|>, no pad token
    "llama3": Family("llama3", "llama", LLAMA3_SPECIAL[:5], eos="<|end_of_text|>", end_of_turn="<|eot_id|>",
                     bos="<|begin_of_text|>", pattern=LLAMA3_PATTERN),
    # Llama-3.1-8B-Instruct: a system header with dates in every chat, a pad token, no TRL training variant
    "llama3_1": Family("llama3_1", "llama", LLAMA3_SPECIAL, eos="<|eot_id|>", end_of_turn="<|eot_id|>",
                       bos="<|begin_of_text|>", pad="<|finetune_right_pad_id|>", pattern=LLAMA3_PATTERN),
    # Qwen2-7B-Instruct: plain ChatML with a default system prompt, EOS <|im_end|>, pad <|endoftext|>
    "qwen2": Family("qwen2-7b-instruct.jinja", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    eos="<|im_end|>", end_of_turn="<|im_end|>", pad="<|endoftext|>", pattern=QWEN2_PATTERN),
    # Qwen2.5-Instruct: ChatML with tools and a default system prompt (TRL has its training variant)
    "qwen2_5": Family("qwen2_5", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      eos="<|im_end|>", end_of_turn="<|im_end|>", pad="<|endoftext|>", pattern=QWEN2_PATTERN),
    # Phi-3-mini-4k-instruct: SentencePiece, turns end on <|end|>, EOS <|endoftext|> closes the chat, no BOS in the
    # template
    "phi3": Family("phi3", "phi3", (*SENTENCEPIECE_SPECIAL, "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                                   "<|user|>"),
                   eos="<|endoftext|>", end_of_turn="<|end|>", bos="<s>", pad="<|endoftext|>", unk="<unk>"),
    # Mistral-7B-Instruct-v0.3: SentencePiece, [INST] control tokens, turns end on EOS </s>, system prompt written
    # only before the last user turn, no generation markers and no TRL training variant
    "mistral": Family("mistral-7b-instruct-v0.3.jinja", "mistral",
                      (*SENTENCEPIECE_SPECIAL, "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                       "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                      eos="</s>", end_of_turn="</s>", bos="<s>", unk="<unk>", config=(("head_dim", 16),)),
    # Gemma-2-it: SentencePiece without a dummy prefix, <start_of_turn>/<end_of_turn>, no system role
    "gemma2": Family("gemma", "gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>",
                                         "<end_of_turn>"),
                     eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>", pad="<pad>", unk="<unk>",
                     dummy_prefix=False,
                     config=(("head_dim", 16), ("query_pre_attn_scalar", 16), ("sliding_window", 64))),
}


def _byte_fallback(tokenizer):
    """`tokenizer` (a trained BPE) with the 256 byte tokens <0x00>..<0xFF> after its special tokens, as SentencePiece
    models have them: a character never seen in training is spelled in bytes, never <unk>."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials = len(state["added_tokens"])
    ordered = sorted(vocab, key=vocab.get)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    state["model"]["vocab"] = {t: i for i, t in enumerate(ordered[:specials] + bytes_ + ordered[specials:])}
    state["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(state))


def build_family_tokenizer(family: Family):
    """The family's kind of tokenizer, trained on the bundled samples, with its special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family.pattern:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=family.unk, fuse_unk=True))
        prepend = "first" if family.dummy_prefix else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
        tokenizer.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme=prepend),
                                               decoders.ByteFallback(), decoders.Fuse()])
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(family.special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(sample_texts(), trainer)
    if not family.pattern:
        tokenizer = _byte_fallback(tokenizer)
    if family.bos:  # every family with a BOS token adds it to plain text; chat templates write it themselves or not
        bos_id = tokenizer.token_to_id(family.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        chat_template=family.chat_template(),
        model_max_length=512,
    )


def build_family(name: str, output_dir: Path) -> Path:
    """A tiny model of tokenizer family `name` (a key of FAMILIES) in `output_dir`."""
    family = FAMILIES[name]
    return _save_model(build_family_tokenizer(family), output_dir, family.model_type, **dict(family.config))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--family", choices=sorted(FAMILIES), help="a tokenizer family instead of data/tiny-llama")
    args = parser.parse_args()
    if args.family and args.output_dir == TINY_MODEL_DIR:
        parser.error("--family needs --output_dir: data/tiny-llama is the bundled model")
    built = build_family(args.family, args.output_dir) if args.family else build(args.output_dir)
    print(f"Tiny model written to {built}")
