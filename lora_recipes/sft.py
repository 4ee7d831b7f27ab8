"""The supervised fine-tuning flow that every domain recipe runs, top to bottom.

A recipe script (`recipes/sft_<domain>.py`) passes its data module and its default YAML; everything below is
shared, so a fix here reaches every domain.
"""

import gc
import os
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from .config import DataArguments, parse_args
from .data import MIN_ROWS_PER_PROCESS_POOL, prepare_domain, worth_processes
from .data_card import plot_data_card, write_data_card
from .data_stream import stream_data, write_stream_card
from .distributed import launch_strategy, prepare_data_once, remove_data_cache
from .errors import RecipeError, exit_on_recipe_error
from .evaluation import evaluate_after_training
from .model import load_model, load_tokenizer
from .plots import plot_loss_curve
from .reliability import StopOnNonFiniteLoss, failures_in_one_line, keep_adapter_dtypes_on_resume, resume_point
from .run_card import config_dict, git_commit, package_versions, write_json


def main(domain: ModuleType, data_args: DataArguments, training_args, model_args, callbacks=None):
    """Train one adapter; returns the SFTTrainer (its model is the trained adapter on the base), or None when
    `dry_run` or `data_card_only` stops the run early.

    `callbacks` (TrainerCallback list) lets the benchmark and the memory tests time and measure this exact flow.
    """
    from trl import SFTTrainer, get_peft_config

    # 0. --dry_run: print the peak-memory plan for these settings and stop before anything loads
    if data_args.dry_run:
        from .memory import dry_run

        print(dry_run(training_args, model_args))
        return None

    # 1. Output dir: a finished run is never overwritten unless asked; an unfinished one resumes from its last
    #    complete checkpoint
    resume_from = resume_point(data_args, training_args, model_args)

    # 2. Logging must never stop at an interactive wandb login
    configure_wandb(training_args.report_to)

    # 3. Tokenizer, with a chat template that puts only the assistant turns (and their EOS) in the loss
    tokenizer = load_tokenizer(model_args, training_args)

    # 4. Data: each source converted to chat messages, validated, deduplicated and split, and tokenized once, as
    #    SFTTrainer tokenizes: the rows it will cut are counted, and it trains on these token ids without tokenizing
    #    again. The main process of each machine prepares it, every rank reads that copy. The data card (counts, token
    #    lengths, train/eval overlap) is written before any model loads, so a data problem costs seconds, not a GPU
    #    hour. With --streaming true nothing is stored: rows are converted as training reads them, and the card (of
    #    what was read) is written after training
    data = stream_data(data_args.dataset_name, domain.SCHEMAS, data_args.eval_fraction, data_args.streaming_eval_rows,
                       training_args.seed, domain.EVAL_ONLY) if data_args.streaming else prepare_data_once(
        training_args, lambda: prepare_domain(domain, data_args, training_args, tokenizer))
    if data_args.streaming:
        # every rank reads the stream and trains on its own batches of it (accelerate's IterableDatasetShard): with
        # dispatching, rank 0 would concatenate the ranks' batches, which fails for batches padded to their own length
        training_args.accelerator_config.dispatch_batches = False
    elif training_args.process_index == 0:
        print(data.summary())
        # a training run draws the card's histogram after training (step 9): matplotlib would delay the first step
        write_data_card(training_args.output_dir, data, tokenizer, training_args.max_length,
                        training_args.assistant_only_loss, training_args.dataset_num_proc,
                        keep_end=training_args.truncation_mode == "keep_end", plot=data_args.data_card_only)
    if data_args.data_card_only:
        remove_data_cache(training_args)
        return None
    if data.eval is None and training_args.eval_strategy != "no":
        raise RecipeError("the eval split is empty: raise eval_fraction, add data, or set eval_strategy 'no'")

    # SFTTrainer tokenizes with dataset_num_proc processes: only worth starting them for a large dataset (a stream is
    # tokenized as it is read, in this process)
    num_proc = None if data_args.streaming else worth_processes(training_args.dataset_num_proc, len(data.train))
    if num_proc is None and not data_args.streaming and (training_args.dataset_num_proc or 1) > 1 and \
            training_args.process_index == 0:
        print(f"dataset_num_proc {training_args.dataset_num_proc} -> 1 process for {len(data.train):,} rows (worker "
              f"processes pay off from {MIN_ROWS_PER_PROCESS_POOL:,} rows)")
    training_args.dataset_num_proc = num_proc

    # 5. Base model (4-bit NF4 by default) and the LoRA adapter SFTTrainer puts on it
    model = load_model(model_args, training_args)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[StopOnNonFiniteLoss(), *(callbacks or [])],
    )
    keep_adapter_dtypes_on_resume(trainer)
    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * training_args.world_size)
    trainer.accelerator.print(
        f"global batch = {training_args.per_device_train_batch_size} per device x "
        f"{training_args.gradient_accumulation_steps} accumulation x {training_args.world_size} processes "
        f"= {global_batch} sequences/step; trainable parameters: {trainable_summary(trainer.model)}"
    )

    # 6. Train (from the resume point); a NaN/inf loss stops it, out of memory ends in one line of advice
    with failures_in_one_line(trainer):
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())

    # 7. Save the adapter and tokenizer (with its chat template), the loss history and the run card
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_json(Path(training_args.output_dir) / "run_card.json", {
            "recipe": Path(sys.argv[0]).name,
            "base_model": model_args.model_name_or_path,
            "system_prompt": domain.SYSTEM_PROMPT,  # chat.py uses it by default: the prompt the adapter knows
            "trust_remote_code": training_args.trust_remote_code,
            "resumed_from": resume_from,
            "global_batch_size": global_batch,
            "num_processes": training_args.world_size,
            "strategy": launch_strategy(training_args),
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
        if data_args.streaming:
            write_stream_card(training_args.output_dir, data)
    trainer.accelerator.print(f"Adapter, tokenizer and run card saved to {training_args.output_dir}")

    # 8. Every rank leaves together: one still finishing a gloo collective while another exits can deadlock at exit.
    # DDP's wrapper goes first, while the process group and every rank are alive: left to the end of the script, its
    # teardown ran after the group was destroyed and hung there (gloo on CPU, about one run in 40)
    trainer.accelerator.wait_for_everyone()
    if launch_strategy(training_args) == "ddp":
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()
        gc.collect()
        trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()

    # 9. Loss curve and the data card's histogram next to the adapter; base vs adapter on the held-out split and the
    #    standard evaluation sets. Rank 0 evaluates alone, after the process group is gone: the other ranks have exited
    #    instead of waiting for it at a barrier, whose timeout (ddp_timeout, 30 minutes by default) would fail the job
    #    after training succeeded
    if trainer.is_world_process_zero():
        if not data_args.streaming:  # a stream's card counts rows read; it has no lengths to draw
            plot_data_card(training_args.output_dir, data, tokenizer, training_args.max_length,
                           training_args.assistant_only_loss)
        plot_loss_curve(trainer.state.log_history, Path(training_args.output_dir) / "loss_curve.png")
        if data_args.eval_after_training:
            evaluate_after_training(trainer, domain, data.eval, data_args, training_args, model_args)
    remove_data_cache(training_args)  # the evaluation reads the held-out split from it
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
