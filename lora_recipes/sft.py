"""The supervised fine-tuning flow that every domain recipe runs, top to bottom.

A recipe script (`recipes/sft_<domain>.py`) passes its data module and its default YAML; everything below is
shared, so a fix here reaches every domain.
"""

import os
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from .config import DataArguments, parse_args
from .data import TokenBudget, prepare_data
from .errors import RecipeError, exit_on_recipe_error
from .model import load_model, load_tokenizer
from .reliability import KeepAdapterDtypesOnResume, StopOnNonFiniteLoss, failures_in_one_line, resume_point
from .run_card import config_dict, git_commit, package_versions, write_json


def main(domain: ModuleType, data_args: DataArguments, training_args, model_args):
    """Train one adapter; returns the SFTTrainer (its model is the trained adapter on the base)."""
    from trl import SFTTrainer, get_peft_config

    # 0. Output dir: a finished run is never overwritten unless asked; an unfinished one resumes from its last
    #    complete checkpoint
    resume_from = resume_point(data_args, training_args, model_args)

    # 1. Logging must never stop at an interactive wandb login
    configure_wandb(training_args.report_to)

    # 2. Tokenizer, with a chat template that puts only the assistant turns (and their EOS) in the loss
    tokenizer = load_tokenizer(model_args, training_args)

    # 3. Data: each source converted to chat messages, validated, deduplicated and split; the main process
    #    prepares it first and the other ranks reuse the cache; rows are measured in tokens as SFTTrainer will cut them
    refused = sorted(set(data_args.dataset_name) & set(domain.EVAL_ONLY))
    if refused:
        raise RecipeError(f"{', '.join(refused)} is evaluation-only and is never trained on")
    with training_args.main_process_first(desc="data preparation"):
        data = prepare_data(
            data_args.dataset_name,
            domain.SCHEMAS,
            eval_fraction=data_args.eval_fraction,
            seed=training_args.seed,
            max_rows_per_source=data_args.max_rows_per_source,
            num_proc=training_args.dataset_num_proc,
            eval_sources=data_args.eval_dataset_name,
            budget=None if training_args.max_length is None else TokenBudget(
                tokenizer, training_args.max_length, keep_end=training_args.truncation_mode == "keep_end",
                assistant_only_loss=training_args.assistant_only_loss),
        )
    if data.eval is None and training_args.eval_strategy != "no":
        raise RecipeError("the eval split is empty: raise eval_fraction, add data, or set eval_strategy 'no'")
    if training_args.process_index == 0:
        print(data.summary())

    # 4. Base model (4-bit NF4 by default) and the LoRA adapter SFTTrainer puts on it
    model = load_model(model_args, training_args)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[StopOnNonFiniteLoss(), KeepAdapterDtypesOnResume()],
    )
    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * training_args.world_size)
    trainer.accelerator.print(
        f"global batch = {training_args.per_device_train_batch_size} per device x "
        f"{training_args.gradient_accumulation_steps} accumulation x {training_args.world_size} processes "
        f"= {global_batch} sequences/step; trainable parameters: {trainable_summary(trainer.model)}"
    )

    # 5. Train (from the resume point); a NaN/inf loss stops it, out of memory ends in one line of advice
    with failures_in_one_line(trainer):
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())

    # 6. Save the adapter and tokenizer (with its chat template), the loss history and the run card
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_json(Path(training_args.output_dir) / "run_card.json", {
            "recipe": Path(sys.argv[0]).name,
            "base_model": model_args.model_name_or_path,
            "trust_remote_code": training_args.trust_remote_code,
            "resumed_from": resume_from,
            "global_batch_size": global_batch,
            "data": [asdict(s) for s in data.sources],
            "metrics": metrics,
            "config": {
                "data": config_dict(data_args),
                "model": config_dict(model_args),
                "training": config_dict(training_args),
            },
            "versions": package_versions(),
            "git_commit": git_commit(),
        })
    trainer.accelerator.print(f"Adapter, tokenizer and run card saved to {training_args.output_dir}")
    trainer.accelerator.end_training()
    return trainer


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def configure_wandb(report_to) -> None:
    """With no API key or stored login, wandb logs offline (sync later with `wandb sync`) instead of prompting."""
    if "wandb" not in (report_to or []) or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    print("wandb: no API key or login found, logging offline to ./wandb (upload later with `wandb sync`)")


@exit_on_recipe_error
def run(domain: ModuleType, default_config: Path):
    """Entry point of a recipe script: parse `--config` and CLI flags, then train."""
    return main(domain, *parse_args(default_config))
