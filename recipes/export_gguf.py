"""Export a fine-tuned adapter as GGUF for llama.cpp and Ollama, checked against the merged transformers model.

Offline demo (after the medical smoke run of the README):
    python recipes/export_gguf.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-gguf \
        --quantization q8_0
    ollama create medical -f outputs/medical-smoke-gguf/Modelfile
    llama-cli -m outputs/medical-smoke-gguf/model-q8_0.gguf

Also the adapter alone as a GGUF LoRA (llama.cpp `--lora`, Ollama `ADAPTER`), with the base it applies to:
    python recipes/export_gguf.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-gguf \
        --quantization f16 --lora_adapter

The GGUF is made from the verified dequant-then-merge model of `recipes/merge.py`, by llama.cpp's own converter
and quantiser (from the pinned llama-cpp-python: the converters' source is fetched once by pip and cached, the
bindings compile llama.cpp). Then llama.cpp loads it and, on chat prompts with the run's system prompt, the export
checks: the prompt tokens llama.cpp builds from the GGUF's chat template are transformers' tokens; the logits are
within the tolerance of the quantisation; for f16, the top token is transformers' wherever transformers' choice is
decisive, and greedy answers are identical up to a near tie of transformers' top two logits (where the two may part,
reported). The results go to gguf_check.json.
"""

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from lora_recipes import gguf  # noqa: E402
from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402
from lora_recipes.inference import (  # noqa: E402
    RUN_CARD,
    conversation,
    conversation_logits,
    from_pretrained,
    load_base,
    load_tokenizer,
    parse_flags,
    read_adapter,
    read_json,
)
from lora_recipes.run_card import write_json  # noqa: E402
from lora_recipes.templates import end_of_turn_token, has_generation_markers  # noqa: E402
from recipes.merge import CHECK_PROMPTS, MergeArguments  # noqa: E402
from recipes.merge import main as merge  # noqa: E402

# What a GGUF must meet, by quantisation. f16: its logits are transformers' up to f16 rounding of the weights and
# llama.cpp's f16 arithmetic (measured up to 0.19 over every prompt position on SmolLM2-135M, whose logits reach
# 30: f16 keeps 11 significant bits), the same top token at every decisive position, and the same greedy answers
# up to a near tie. q8_0: the top token nearly always the same and a small KL (each export: gguf_check.json).
# q4_k_m: reported only.
BOUNDS = {
    "f16": {"max_logit_difference": 0.25, "min_decisive_top1_agreement": 1.0},
    "q8_0": {"min_top1_agreement": 0.9, "max_mean_kl": 0.05},
    "q4_k_m": {},
}
# With every logit within the f16 bound b of transformers', the top token can change only where transformers' top
# two logits are within 2b: there either choice is right (a near tie), and a greedy answer may take the other path
TIE_MARGIN = 2 * BOUNDS["f16"]["max_logit_difference"]
GREEDY_TOKENS = 20  # the greedy answers compared for f16


@dataclass
class ExportArguments:
    adapter: str = field(metadata={"help": "Adapter folder written by a recipe (with run_card.json), or one of "
                                           "its checkpoint-N folders."})
    output_dir: str = field(metadata={"help": "Where the GGUF files and the Modelfile go."})
    quantization: Literal["f16", "q8_0", "q4_k_m"] = field(default="q8_0", metadata={
        "help": "f16: as good as the merged model, 2 bytes a weight; q8_0: about 1 byte a weight, nearly the same "
                "answers; q4_k_m: about 0.6 byte a weight, for small machines, measurably worse."})
    lora_adapter: bool = field(default=False, metadata={
        "help": "Also write the adapter alone as a GGUF LoRA (adapter-f16.gguf), the base it applies to "
                "(base-<quantization>.gguf: the weights it was trained against) and Modelfile.adapter."})
    merged: str | None = field(default=None, metadata={
        "help": "A folder recipes/merge.py wrote for this adapter: use it instead of merging again."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model to use instead of the one in run_card.json (it moved, or a local copy)."})


def to_gguf(converters: Path, model_dir: Path, output_dir: Path, name: str, quantization: str) -> tuple[Path, dict]:
    """`model_dir` as `name-<quantization>.gguf` (f16 by the converter, then llama.cpp's quantiser); the seconds."""
    f16 = output_dir / f"{name}-f16.gguf"
    seconds = {"convert": gguf.convert_model(converters, model_dir, f16)}
    if quantization == "f16":
        return f16, seconds
    target = output_dir / f"{name}-{quantization}.gguf"
    seconds["quantize"] = gguf.quantize(f16, target, quantization)
    f16.unlink()
    return target, seconds


def failures(result: dict, quantization: str) -> list[str]:
    """What in a check's `result` breaks the bounds of `quantization` (empty: the file may be used)."""
    bounds = BOUNDS[quantization]
    failed = []
    if result["max_logit_difference"] > bounds.get("max_logit_difference", float("inf")):
        failed.append(f"max |logit difference| {result['max_logit_difference']:.4g} > "
                      f"{bounds['max_logit_difference']}")
    if result["decisive_top1_agreement"] < bounds.get("min_decisive_top1_agreement", 0):
        failed.append(f"top-1 agreement {result['decisive_top1_agreement']:.4f} at the {result['decisive_positions']} "
                      f"decisive positions (lead > {result['tie_margin']:.3g}) < "
                      f"{bounds['min_decisive_top1_agreement']}")
    if result["top1_agreement"] < bounds.get("min_top1_agreement", 0):
        failed.append(f"top-1 agreement {result['top1_agreement']:.3f} < {bounds['min_top1_agreement']}")
    if result["mean_kl"] > bounds.get("max_mean_kl", float("inf")):
        failed.append(f"mean KL {result['mean_kl']:.4g} > {bounds['max_mean_kl']}")
    for prompt, greedy in enumerate(result.get("greedy", [])):
        if not greedy["accepted"]:
            lead = "no transformers token there" if greedy["margin"] is None else \
                f"transformers' lead {greedy['margin']:.3g} > {result['tie_margin']:.3g}"
            failed.append(f"greedy answer {prompt + 1} parts from transformers' at token {greedy['diverged_at']}, "
                          f"not at a near tie ({lead})")
    return failed


def summary(result: dict) -> str:
    """The check's figures in one line."""
    line = (f"max |logit difference| {result['max_logit_difference']:.4g}, top-1 agreement "
            f"{result['top1_agreement']:.4f} ({result['decisive_top1_agreement']:.4f} at "
            f"{result['decisive_positions']} decisive positions; {result['near_ties']} near ties "
            f"(lead <= {result['tie_margin']:.3g}), {result['near_tie_flips']} flipped), mean KL "
            f"{result['mean_kl']:.3g} over {result['positions']} positions")
    if "greedy" in result:
        parted = [f"answer {i + 1} at token {g['diverged_at']} (lead {g['margin']:.3g})"
                  for i, g in enumerate(result["greedy"]) if not g["identical"] and g["accepted"]]
        line += (f", greedy identical {result['greedy_identical']}/{result['greedy_prompts']}"
                 + (f" (parted at a near tie: {', '.join(parted)})" if parted else ""))
    return line


def check(path: Path, reference: list, chats: list, prompt_ids: list, quantization: str, expected_answers=None,
          lora: Path | None = None) -> dict:
    """Load a GGUF with llama.cpp and compare it with transformers (see the module docstring); `expected_answers`:
    transformers' greedy answers with their per-token leads (`gguf.transformers_greedy`)."""
    with gguf.GGUFModel(path, lora=lora) as model:
        for chat, ids in zip(chats, prompt_ids, strict=True):
            if model.chat_prompt_ids(chat) != ids:
                raise RecipeError(f"{path}: the prompt llama.cpp builds from the GGUF's chat template differs from "
                                  f"transformers' for {chat[-1]['content']!r}: do not use this file")
        result = {"file": path.name, "quantization": quantization, "lora": lora.name if lora else None,
                  **gguf.compare_logits(reference, [model.logits(ids) for ids in prompt_ids], TIE_MARGIN)}
        if expected_answers is not None:
            result["greedy"] = [gguf.compare_greedy(tokens, margins, model.greedy(ids, GREEDY_TOKENS), TIE_MARGIN)
                                for ids, (tokens, margins) in zip(prompt_ids, expected_answers, strict=True)]
            result["greedy_identical"] = sum(g["identical"] for g in result["greedy"])
            result["greedy_prompts"] = len(result["greedy"])
    print(f"gguf check {path.name}{' + ' + lora.name if lora else ''}: {summary(result)}")
    failed = failures(result, quantization)
    if failed:
        raise RecipeError(f"{path} differs from the merged model: {'; '.join(failed)}: do not use it")
    return result


def main(args: ExportArguments) -> dict:
    """Merge (or reuse a merge), convert, quantise, check, write the Modelfile; returns the check record."""
    import torch

    # 1. The adapter's run card, a converter and runtime that can do this architecture: fail now, not after a merge
    adapter = read_adapter(args.adapter, base_model=args.base_model)
    output_dir = Path(args.output_dir)
    if output_dir.resolve() == adapter.path.resolve():
        raise RecipeError("--output_dir is the adapter folder: choose another folder for the GGUF files")
    converters = gguf.converter_dir()
    from transformers import AutoConfig

    gguf.check_architecture(AutoConfig.from_pretrained(adapter.base_model, revision=adapter.model_args.model_revision,
                                                       trust_remote_code=adapter.run_card["trust_remote_code"]),
                            converters)
    gguf.llama_cpp()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        # 2. The verified dequant-then-merge model (recipes/merge.py), reused with --merged
        merged_dir = Path(args.merged) if args.merged else Path(tmp) / "merged"
        if args.merged:
            if read_json(merged_dir / RUN_CARD).get("merge", {}).get("adapter") is None:
                raise RecipeError(f"{merged_dir / RUN_CARD}: no 'merge' record: --merged takes a folder "
                                  "recipes/merge.py wrote")
        else:
            merge(MergeArguments(adapter=str(adapter.path), output_dir=str(merged_dir),
                                 base_model=args.base_model))
        tokenizer = load_tokenizer(merged_dir)
        if has_generation_markers(tokenizer.chat_template):  # a merge from before merge.py wrote the plain one
            raise RecipeError(f"{merged_dir}: its chat template still has the training tags ({{% generation %}}), "
                              "which llama.cpp and Ollama reject: merge again with recipes/merge.py")
        system_prompt = adapter.system_prompt
        # The Modelfile's template is checked before any conversion: a template Ollama cannot take fails fast
        template = gguf.turn_template(tokenizer, system_prompt)

        # 3. What the GGUF must reproduce: the merged model's logits and greedy answers on the merge check prompts
        chats = [conversation(p, system_prompt) for p in CHECK_PROMPTS]
        prompt_ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                      ["input_ids"] for c in chats]
        model = from_pretrained(str(merged_dir), dtype="auto")
        reference = conversation_logits(model, tokenizer, chats)
        answers = [gguf.transformers_greedy(model, tokenizer, ids, GREEDY_TOKENS, model.generation_config.eos_token_id)
                   for ids in prompt_ids]
        del model

        # 4. Convert and quantise with llama.cpp, then check the file with llama.cpp
        model_file, seconds = to_gguf(converters, merged_dir, output_dir, "model", args.quantization)
        checks = [check(model_file, reference, chats, prompt_ids, args.quantization,
                        answers if args.quantization == "f16" else None)]

        # 5. The adapter alone, on the base it was trained against (dequantised, as merge.py merges into)
        adapter_files = None
        if args.lora_adapter:
            base = load_base(adapter, quantized=adapter.quantized)
            base = base.dequantize() if adapter.quantized else base
            base = base.to(getattr(torch, read_json(merged_dir / RUN_CARD)["merge"]["dtype"]))
            base.save_pretrained(Path(tmp) / "base")
            tokenizer.save_pretrained(Path(tmp) / "base")
            del base
            base_file, base_seconds = to_gguf(converters, Path(tmp) / "base", output_dir, "base", args.quantization)
            lora_file = output_dir / "adapter-f16.gguf"
            seconds.update({f"base_{k}": v for k, v in base_seconds.items()})
            seconds["convert_lora"] = gguf.convert_lora(converters, adapter.path, Path(tmp) / "base", lora_file)
            checks.append(check(base_file, reference, chats, prompt_ids, args.quantization,
                                answers if args.quantization == "f16" else None, lora=lora_file))
            adapter_files = (base_file.name, lora_file.name)

    # 6. Ollama Modelfiles: the training chat template as a Go template, its end-of-turn token, the system prompt
    stop = end_of_turn_token(tokenizer)
    (output_dir / "Modelfile").write_text(gguf.modelfile(model_file.name, template, stop, system_prompt),
                                          encoding="utf-8")
    if adapter_files:
        (output_dir / "Modelfile.adapter").write_text(
            gguf.modelfile(adapter_files[0], template, stop, system_prompt, adapter_file=adapter_files[1]),
            encoding="utf-8")
    record = {"adapter": str(adapter.path), "converter": gguf.LLAMA_CPP_PYTHON, "quantization": args.quantization,
              "bounds": BOUNDS[args.quantization], "tie_margin": TIE_MARGIN, "prompts": len(chats), "checks": checks,
              "seconds": seconds}
    write_json(output_dir / "gguf_check.json", record)
    print(f"GGUF export in {output_dir}: {', '.join(sorted(p.name for p in output_dir.iterdir()))}")
    return record


@exit_on_recipe_error
def run(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags((ExportArguments,), argv)
    return main(args)


if __name__ == "__main__":
    run()
