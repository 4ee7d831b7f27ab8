"""Merge a LoRA adapter into its base model and export a standalone, verified model (safetensors).

Offline demo (after the medical smoke run of the README):
    python recipes/merge.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-merged

Merge into the original full-precision weights instead of the dequantised 4-bit ones, sharded in 2GB files:
    python recipes/merge.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-merged-original \
        --merge_into original --max_shard_size 2GB

Show the model card that would be pushed, push nothing; then push for real (needs a token):
    python recipes/merge.py --adapter outputs/medical-smoke --output_dir outputs/medical-smoke-merged \
        --push_to_hub --dry_run
    python recipes/merge.py --adapter outputs/medical-qwen2.5-1.5b-qlora --output_dir outputs/medical-merged \
        --push_to_hub --hub_model_id you/medical-qwen2.5-1.5b --push adapter

Why the default merges into the dequantised 4-bit weights: a QLoRA adapter was trained against the 4-bit
weights, so the model that training optimised is dequant(W4) + BA. Merging into the original 16-bit W gives
W + BA, which the adapter never saw (a train/inference mismatch); merging into the 4-bit layers re-quantises
W4 + BA and rounds most of the small update BA away. Merging into dequant(W4) reproduces what training saw.
"""

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: no install step

from lora_recipes import model_card  # noqa: E402
from lora_recipes.errors import RecipeError, exit_on_recipe_error  # noqa: E402
from lora_recipes.inference import (  # noqa: E402
    RUN_CARD,
    conversation,
    conversation_logits,
    eos_token_ids,
    from_pretrained,
    load_adapters,
    load_base,
    load_tokenizer,
    max_difference,
    parse_flags,
    plain_chat_template,
    read_adapter,
)
from lora_recipes.run_card import write_json  # noqa: E402

# Chat prompts for the logit check: short, varied, in the domains the recipes cover.
CHECK_PROMPTS = (
    "Which symptoms of a headache mean I should see a doctor the same day?",
    "My landlord kept my deposit without a reason. What are my options?",
    "Should I pay off a credit card at 22% interest before investing in an index fund?",
)
# Largest logit difference accepted, by the dtype of the merged weights: bf16 keeps 8 significant bits, so logits
# near 30 are 0.125 apart, and the 4-bit kernel and a plain matmul round in different places.
TOLERANCE = {"float32": 5e-2, "float16": 1e-1, "bfloat16": 5e-1}
PUSHED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")  # never pickles (training_args.bin)


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "Adapter folder written by a recipe (with run_card.json), or one of "
                                           "its checkpoint-N folders."})
    output_dir: str = field(metadata={"help": "Where the merged model goes."})
    merge_into: Literal["dequantized", "original"] = field(default="dequantized", metadata={
        "help": "dequantized: the weights the adapter was trained against (a 4-bit or 8-bit base, dequantised); "
                "original: the base's full-precision weights. The same for an adapter trained without "
                "quantisation."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model to use instead of the one in run_card.json (it moved, or a local copy)."})
    dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata={
        "help": "dtype of the merged weights. Default: the training dtype."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors file; bigger models are "
                                                                 "split into shards with an index."})
    tolerance: float | None = field(default=None, metadata={
        "help": "Largest logit difference between the merged model and base + adapter that is accepted. "
                f"Default by dtype: {TOLERANCE}."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload to the Hugging Face Hub with a model card."})
    push: Literal["merged", "adapter"] = field(default="merged", metadata={"help": "What --push_to_hub uploads."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Hub repo (USER/NAME or NAME under your account). Default: the folder's name."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    dry_run: bool = field(default=False, metadata={"help": "With --push_to_hub: print the model card and the files "
                                                           "that would be uploaded, upload nothing."})


def main(args: MergeArguments) -> dict:
    """Merge, save, verify and (optionally) push; returns the merge record written into the run card."""
    import torch
    from peft import PeftModel

    # 1. What the adapter was trained on (base, quantisation, dtype: run_card.json); a push that cannot happen
    #    fails now, not after the merge
    adapter = read_adapter(args.adapter, base_model=args.base_model)
    output_dir = Path(args.output_dir)
    if output_dir.resolve() == adapter.path.resolve():
        raise RecipeError("--output_dir is the adapter folder: choose another folder for the merged model")
    if args.push_to_hub and not args.dry_run:
        model_card.check_hub_ready()
    eval_report = model_card.read_eval_report(adapter.path)
    dtype = args.dtype or adapter.model_args.dtype  # "auto": the dtype of the base's files
    tokenizer = load_tokenizer(adapter.path)
    prompts = [conversation(p, adapter.system_prompt) for p in CHECK_PROMPTS]

    # 2. What training saw: the base loaded as in training + the adapter; and the base alone, for scale.
    #    One model in memory at a time: each is deleted once its logits are taken
    trained = load_adapters([adapter])
    trained_logits = conversation_logits(trained, tokenizer, prompts)
    with trained.disable_adapter():
        adapter_effect = max_difference(trained_logits, conversation_logits(trained, tokenizer, prompts))
    del trained

    # 3. Merge into the dequantised weights training saw (default) or into the original weights
    into_dequantized = adapter.quantized and args.merge_into == "dequantized"
    base = load_base(adapter, quantized=into_dequantized, dtype=dtype)
    if into_dequantized:
        base = base.dequantize()
    if dtype != "auto":
        base = base.to(getattr(torch, dtype))
    dtype = str(base.dtype).removeprefix("torch.")
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    model = PeftModel.from_pretrained(base, adapter.path)
    expected, difference_from_training = trained_logits, None
    if adapter.quantized and not into_dequantized:
        expected = conversation_logits(model, tokenizer, prompts)
        difference_from_training = max_difference(expected, trained_logits)
        print(f"merging into the original weights: base + adapter there differs from what training saw "
              f"({adapter.quantization}) by up to {difference_from_training:.4g} in the logits")
    merged = model.merge_and_unload()
    del model, base

    # 4. Save a standalone model: safetensors shards, a generation config that stops at the chat template's
    #    end-of-turn token and pads with a distinct pad token, and the tokenizer with the training chat template
    #    without its {% generation %} tags (same text; renderers outside transformers may reject the tags)
    merged.generation_config.eos_token_id = eos_token_ids(tokenizer, merged.generation_config)
    merged.generation_config.pad_token_id = merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(output_dir, max_shard_size=args.max_shard_size)
    tokenizer.chat_template = plain_chat_template(tokenizer.chat_template)
    tokenizer.save_pretrained(output_dir)
    del merged

    # 5. Verify the files: reload them with plain transformers (no PEFT) and compare with step 2 (or 3)
    reloaded = from_pretrained(str(output_dir), dtype="auto")
    difference = max_difference(conversation_logits(reloaded, tokenizer, prompts), expected)
    del reloaded
    print(f"merge check: max |logit difference| = {difference:.4g} between {output_dir} and base + adapter on "
          f"{len(prompts)} prompts (tolerance {tolerance:.4g}; the adapter moves the logits by up to "
          f"{adapter_effect:.4g})")
    if not difference <= tolerance:
        raise RecipeError(f"the merged model in {output_dir} differs from base + adapter by {difference:.4g} > "
                          f"tolerance {tolerance:.4g}: do not use it (--tolerance sets the limit)")

    # 6. Provenance and model card next to the weights
    if into_dequantized:
        description = (f"The adapter was merged into the dequantised weights of the base it was trained against "
                       f"({adapter.quantization}), so the merged model computes what training optimised.")
    elif adapter.quantized:
        description = (f"The adapter was merged into the base's original weights although it was trained against "
                       f"a {adapter.quantization} base (--merge_into original): a train/inference mismatch that "
                       f"moves the logits by up to {difference_from_training:.4g} from what training saw.")
    else:
        description = "The adapter was merged into the base's original weights, which it was trained against."
    merge = {
        "adapter": str(adapter.path),
        "merge_into": "dequantized" if into_dequantized else "original",
        "description": description,
        "dtype": dtype,
        "max_logit_difference": difference,
        "difference_from_training": difference_from_training,  # --merge_into original of a quantised adapter
        "tolerance": tolerance,
        "adapter_effect": adapter_effect,
        "prompts": len(prompts),
    }
    write_json(output_dir / RUN_CARD, {**adapter.run_card, "merge": merge})
    if eval_report is not None:
        shutil.copy(adapter.path / model_card.EVAL_REPORT, output_dir / model_card.EVAL_REPORT)
    merged_card = model_card.render(adapter, kind="merged", eval_report=eval_report,
                                    merge=merge, name=args.hub_model_id or output_dir.name)
    (output_dir / "README.md").write_text(merged_card, encoding="utf-8")
    print(f"Merged model, tokenizer, generation config, run card and model card saved to {output_dir}")

    # 7. Push the merged model or the adapter, each with its own model card (or show what would be pushed)
    if args.push_to_hub:
        folder = output_dir if args.push == "merged" else adapter.path
        card = merged_card if args.push == "merged" else model_card.render(
            adapter, kind="adapter", eval_report=eval_report,
            name=args.hub_model_id or adapter.path.name)
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PUSHED_SUFFIXES)
        repo_id = args.hub_model_id or folder.name
        if args.dry_run:
            print(f"--dry_run: would push the {args.push} {folder} to {repo_id}: {', '.join(files)} and this "
                  f"README.md:\n\n{card}")
        else:
            print(f"Pushed to {model_card.push(folder, files, card, repo_id, args.private)}")
    return merge


@exit_on_recipe_error
def run(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags((MergeArguments,), argv)
    return main(args)


if __name__ == "__main__":
    run()
