"""Run one of llama.cpp's converter scripts from the llama-cpp-python sdist (a subprocess of `lora_recipes.gguf`).

    python -m lora_recipes.llama_cpp_convert CONVERTER_DIR convert_hf_to_gguf.py MODEL_DIR --outfile F --outtype f16
    python -m lora_recipes.llama_cpp_convert CONVERTER_DIR --supports LlamaForCausalLM

The scripts run unchanged, with one addition: llama.cpp recognises a byte-level BPE pre-tokenizer by hashing the
tokens of a test string, so a tokenizer trained from scratch (the tiny offline model) is never recognised, even when
it splits text exactly as GPT-2 does. Such a tokenizer gets llama.cpp's "gpt-2" pre-tokenizer when its
tokenizer.json says so (GPT-2's split and nothing else); any other unrecognised one still fails.
`lora_recipes.gguf` then checks that llama.cpp tokenizes the chat prompts exactly as transformers does.
"""

import json
import runpy
import sys
from pathlib import Path

# tokenizer.json of a tokenizer that splits text exactly as GPT-2: byte-level with GPT-2's regex, no prefix space,
# no normalizer. llama.cpp's "gpt-2" pre-tokenizer is that regex.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
UNSUPPORTED_EXIT = 3  # --supports: the architecture has no converter


def gpt2_split(model_dir: Path) -> bool:
    """Whether the model's tokenizer.json pre-tokenizes exactly as GPT-2 (see the module docstring)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    return (tokenizer.get("normalizer") is None and tokenizer["model"].get("type") == "BPE"
            and all(pre.get(k) == v for k, v in GPT2_PRE_TOKENIZER.items()))


def recognise_gpt2_split(base_module) -> None:
    """Wrap llama.cpp's pre-tokenizer detection: 'gpt-2' for an unrecognised tokenizer that splits as GPT-2."""
    detect = base_module.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return detect(self, tokenizer)
        except NotImplementedError:
            if not gpt2_split(self.dir_model):
                raise
            base_module.logger.warning("BPE pre-tokenizer not in llama.cpp's list; tokenizer.json splits text "
                                       "as GPT-2 does: using llama.cpp's 'gpt-2' pre-tokenizer")
            return "gpt-2"

    base_module.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter_dir, script, *args = argv
    converter_dir = Path(converter_dir)
    # The sdist's own gguf-py and conversion package, ahead of any installed `gguf`, as its scripts expect
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    import conversion
    from conversion import base

    if script == "--supports":
        sys.exit(0 if args[0] in conversion.TEXT_MODEL_MAP else UNSUPPORTED_EXIT)
    recognise_gpt2_split(base)
    sys.argv = [str(converter_dir / script), *args]
    runpy.run_path(str(converter_dir / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
