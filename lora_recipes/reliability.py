"""What survives what: a killed run resumes, a finished run is never overwritten, NaN/inf stops, OOM gives advice.

- Killed (SIGKILL, preemption, a crash): rerunning the same command resumes from the last complete `checkpoint-N`
  in `output_dir`. A checkpoint is complete once its `trainer_state.json` (the Trainer writes it last) is whole, so
  a checkpoint cut short by the kill is skipped.
- A finished run (its `run_card.json`, written last by the shared flow, exists) is never overwritten: the next run
  into the same `output_dir` stops before anything loads unless `--overwrite_output_dir true` is given.
- A NaN or infinite loss stops training before that update reaches the weights, so every checkpoint on disk holds
  finite weights from before the failure.
- Out of memory: one line with a smaller per-device batch and more accumulation that keep the global batch.

Checkpoints hold pickles (`training_args.bin`, optimizer, scheduler and RNG state). transformers reads the state
files with `torch.load(weights_only=True)` and never reads `training_args.bin`; the recipe resumes on its own only
from its own `output_dir`, and from elsewhere only when `--resume_from_checkpoint PATH` names it.
"""

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import ProgressCallback, TrainerCallback

from .errors import RecipeError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it after the weights, optimizer and RNG state
FINISHED_MARKER = "run_card.json"  # the shared flow writes it after the final adapter


def checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def is_complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing this checkpoint: its trainer_state.json exists and parses."""
    try:
        json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint; one that a kill cut short is skipped."""
    complete = [p for p in checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def check_resumable(checkpoint: Path, model_args) -> None:
    """A checkpoint resumes only into the adapter it was saved from: same base model and LoRA shape."""
    saved_file = checkpoint / "adapter_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    for key, field_name in (("base_model_name_or_path", "model_name_or_path"), ("r", "lora_r"),
                            ("lora_alpha", "lora_alpha"), ("use_dora", "use_dora"), ("use_rslora", "use_rslora")):
        if key not in saved:
            continue
        was, now = saved[key], getattr(model_args, field_name)
        if key == "base_model_name_or_path" and Path(was).exists() and Path(now).exists():
            same = Path(was).resolve() == Path(now).resolve()  # the same local folder, however it is written
        else:
            same = was == now
        if not same:
            raise RecipeError(f"{checkpoint} was trained with {field_name} {was}, this run has {now}: rerun "
                              "with the same settings to resume, or pass --overwrite_output_dir true to start afresh")


def resume_point(data_args, training_args, model_args) -> str | None:
    """The checkpoint training continues from, or None for a fresh start; refuses to overwrite a finished run.

    `--resume_from_checkpoint PATH` wins; `--resume_from_checkpoint true` means the last checkpoint of output_dir.
    Without it: `--overwrite_output_dir true` starts afresh (removing the old checkpoints and run card, so a later
    resume can never pick a stale one), a finished run is refused, and an unfinished one resumes automatically.
    A checkpoint of another base model or LoRA shape is refused rather than loaded.
    """
    output_dir = Path(training_args.output_dir)
    requested = training_args.resume_from_checkpoint
    if requested and requested.lower() != "true":
        if not is_complete(Path(requested)):
            raise RecipeError(f"--resume_from_checkpoint {requested}: not a complete checkpoint folder (no "
                              f"{COMPLETE_MARKER}); pass a checkpoint-N folder of an earlier run")
        check_resumable(Path(requested), model_args)
        return requested
    if data_args.overwrite_output_dir:
        old = checkpoints(output_dir)
        if training_args.process_index == 0 and (old or (output_dir / FINISHED_MARKER).exists()):
            for path in old:
                shutil.rmtree(path)
            (output_dir / FINISHED_MARKER).unlink(missing_ok=True)
            print(f"overwrite_output_dir: removed the run card and {len(old)} checkpoints of the previous run in "
                  f"{output_dir}")
        return None
    if (output_dir / FINISHED_MARKER).is_file():
        raise RecipeError(f"{output_dir} holds a finished run ({FINISHED_MARKER}): pass --overwrite_output_dir true "
                          "to replace it, or choose another --output_dir")
    last = last_checkpoint(output_dir)
    if requested and last is None:
        raise RecipeError(f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint to resume from")
    if last is None:
        return None
    check_resumable(last, model_args)
    if training_args.process_index == 0:
        print(f"resuming from {last}: {output_dir} holds an unfinished run (--overwrite_output_dir true starts "
              "afresh)")
    return str(last)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop once the loss is NaN or infinite, before a non-finite update reaches the weights.

    The loss reaches no callback (TRL computes it outside the model, and the Trainer hides a NaN loss from its logs,
    `logging_nan_inf_filter`); its gradients do, and a non-finite loss makes them non-finite. After DDP's all-reduce
    every rank sees the same gradients, so every rank stops at the same step.
    - bf16 / fp32: non-finite gradients stop the run before the optimizer step.
    - fp16: non-finite gradients are also the loss scaler's ordinary overflow: the GradScaler skips that update and
      halves its scale, and a finite loss fits again a few halvings later. The run stops when an update is skipped at
      loss scale 1 or below, where nothing is amplified any more, so the loss or its gradients are non-finite by
      themselves (DeepSpeed's fp16 optimizer gives up at the same point, its min_loss_scale 1). From the initial
      scale 2**16 that is 17 skipped steps in a row, and skipped steps leave the weights as they were.
    """

    def __init__(self):
        self.skipped = 0  # fp16: updates the loss scaler skipped in a row

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer.scaler is not None:
            return  # the scaler checks these gradients itself and skips the update: see on_step_end
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads]).all():
            return
        raise RecipeError(non_finite_loss_message(args, state.global_step + 1, ""))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer.scaler is None:
            return
        self.skipped = self.skipped + 1 if optimizer.step_was_skipped else 0
        scale = optimizer.scaler.get_scale()
        if self.skipped and scale < 1:
            raise RecipeError(non_finite_loss_message(
                args, state.global_step, f" (the fp16 loss scaler skipped the last {self.skipped} updates, down to "
                                         f"loss scale {scale:g})"))


def non_finite_loss_message(args, step: int, detail: str) -> str:
    last = last_checkpoint(args.output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    return (f"step {step}: the training loss is NaN or infinite{detail}; training stopped before this update and "
            f"{kept}. Lower learning_rate (now {args.learning_rate:g}) and rerun with --overwrite_output_dir true "
            "(resuming would restore the old learning rate)")


def keep_adapter_dtypes_on_resume(trainer) -> None:
    """A resumed run trains the adapter in the dtypes the run started with, and every rank trains the same adapter.

    TRL trains QLoRA adapters in bf16, but the Trainer reloads a checkpoint's adapter with PEFT's `load_adapter`, which
    replaces it with fp32 copies: the run after a restart would train in another precision than the run before it.
    The dtypes are put back inside the Trainer's checkpoint-loading step. For one process and DDP that step runs in
    `train()` before the optimizer exists and before `accelerator.prepare` wraps the model, so DDP registers the
    restored parameters, and the optimizer state loaded later takes their dtypes (torch casts it on load). Casting
    after the wrap instead (a callback's on_train_begin) silently stops DDP's gradient all-reduce for every cast
    parameter: each rank trains its own adapter, and rank 0 saves one that saw 1/N of the data.
    FSDP loads after the wrap (the Trainer passes the wrapped model) and DeepSpeed loads in its engine; both read
    their own checkpoint format into the existing parameters, so no dtype changes and nothing is touched there.
    """
    load = trainer._load_from_checkpoint

    def load_in_the_same_dtypes(resume_from_checkpoint, model=None):
        if model is not None:  # after the wrap (FSDP): wrapped parameters are never cast
            return load(resume_from_checkpoint, model)
        dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        load(resume_from_checkpoint)
        for name, param in trainer.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    # the Trainer offers no callback between this load and the wrap: its loading step itself is wrapped (pinned stack;
    # tests/test_distributed.py resumes a killed 2-process run and would see the ranks drift apart again)
    trainer._load_from_checkpoint = load_in_the_same_dtypes


@contextmanager
def failures_in_one_line(trainer):
    """Training that stops (NaN/inf) or runs out of memory ends in one `error:` line, after the progress bar's line."""
    try:
        yield
    except (RecipeError, torch.OutOfMemoryError) as e:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                for bar in (callback.prediction_bar, callback.training_bar):
                    if bar is not None:
                        bar.close()
        if isinstance(e, torch.OutOfMemoryError):
            raise RecipeError(out_of_memory_advice(trainer.args, trainer.state.global_step + 1)) from None
        raise


def out_of_memory_advice(training_args, step: int) -> str:
    """One line: where memory ran out, and the smaller per-device batch that keeps the global batch."""
    batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    where = (f"out of memory at step {step} with per_device_train_batch_size {batch} x gradient_accumulation_steps "
             f"{accumulation}")
    also = "activation_checkpointing true and a smaller max_length also cut activation memory"
    if batch == 1:
        return f"{where}: {also}; a 4-bit base (load_in_4bit true) cuts weight memory"
    smaller = batch // 2 if batch % 2 == 0 else 1
    resumes = " (the rerun resumes from the last checkpoint)" if last_checkpoint(training_args.output_dir) else ""
    return (f"{where}: rerun with --per_device_train_batch_size {smaller} --gradient_accumulation_steps "
            f"{batch * accumulation // smaller} (the same {batch * accumulation} sequences per device per step)"
            f"{resumes}; {also}")
