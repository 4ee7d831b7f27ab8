"""What survives what: SIGKILL and resume, a finished run kept, NaN/inf stops the run, out of memory gives advice."""

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
from itertools import pairwise

import pytest
import torch
from conftest import (
    REPO_ROOT,
    SMOKE_RUN_ARGS,
    TouchOnUnpickle,
    log_history,
    recipe_command,
    run_recipe,
    run_recipe_in_process,
)
from safetensors.torch import load_file

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.reliability import is_complete, last_checkpoint, out_of_memory_advice, resume_point
from lora_recipes.sft import main

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


def losses_after(output_dir, step):
    return {(e["step"], key): e[key] for e in log_history(output_dir) if e["step"] > step
            for key in ("loss", "eval_loss") if key in e}


def test_sigkilled_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(medical_smoke_run, tmp_path):
    reference_dir, _ = medical_smoke_run
    output_dir = tmp_path / "killed"
    args = (*SMOKE_RUN_ARGS, "--output_dir", str(output_dir))
    # 1. Start the same command as the session's smoke run; SIGKILL the launcher and the trainer once checkpoint-15
    #    is complete, as a crashed or preempted machine would
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(recipe_command("recipes/sft_medical.py", *args), cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not is_complete(output_dir / "checkpoint-15") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert last_checkpoint(output_dir) == output_dir / "checkpoint-15"
    assert not (output_dir / "run_card.json").exists() and not (output_dir / "checkpoint-30").exists()
    # A resume must never unpickle training_args.bin (transformers reads the state files with weights_only=True)
    marker = tmp_path / "unpickled"
    (output_dir / "checkpoint-15" / "training_args.bin").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))

    # 2. Rerun the same command: it resumes on its own and finishes at the same step
    second = run_recipe("recipes/sft_medical.py", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {output_dir / 'checkpoint-15'}" in second.stdout
    assert not marker.exists()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    card = json.loads((output_dir / "run_card.json").read_text())
    assert card["resumed_from"] == str(output_dir / "checkpoint-15")

    # 3. The run after the restart trains the adapter in the same precision (PEFT's reload would upcast it to fp32)
    #    and its losses are those of the uninterrupted run. Not bit-exact here: on CPUs with AVX512-BF16, the
    #    uninterrupted run's eval at step 15 switches bitsandbytes to its packed 4-bit CPU kernel (measured: at most
    #    0.16% apart; 0.6% when the resumed adapter trained in fp32). Without that eval the two are identical.
    dtypes = {w.dtype for w in load_file(output_dir / "adapter_model.safetensors").values()}
    assert dtypes == {w.dtype for w in load_file(reference_dir / "adapter_model.safetensors").values()}
    resumed, reference = losses_after(output_dir, 15), losses_after(reference_dir, 15)
    assert set(resumed) == set(reference) == {(20, "loss"), (25, "loss"), (30, "loss"), (30, "eval_loss")}
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, rel=5e-3), (key, resumed[key], value)


def test_a_cut_short_checkpoint_is_skipped_when_resuming(tmp_path, capsys):
    for step, state in ((5, "{}"), (10, '{"log_history": ['), (12, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    args = parse_args(SMOKE, ["--output_dir", str(tmp_path)])
    assert resume_point(*args) == str(tmp_path / "checkpoint-5")
    assert f"resuming from {tmp_path / 'checkpoint-5'}" in capsys.readouterr().out


def test_a_checkpoint_of_another_lora_shape_is_refused_not_loaded(medical_smoke_run, tmp_path):
    finished, _ = medical_smoke_run
    shutil.copytree(finished / "checkpoint-15", tmp_path / "checkpoint-15")
    with pytest.raises(RecipeError, match=rf"^{tmp_path / 'checkpoint-15'} was trained with lora_r 16, this run has "
                                          "8: rerun with the same settings to resume, or pass --overwrite_output_dir"):
        resume_point(*parse_args(SMOKE, ["--output_dir", str(tmp_path), "--lora_r", "8"]))


def test_a_finished_run_is_refused_before_anything_loads(medical_smoke_run, monkeypatch, capsys):
    output_dir, _ = medical_smoke_run
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    monkeypatch.setattr("lora_recipes.sft.load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
    code, _, err = run_recipe_in_process(monkeypatch, capsys, *SMOKE_RUN_ARGS, "--output_dir", str(output_dir))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {output_dir} holds a finished run (run_card.json): pass --overwrite_output_dir true to replace it, "
        "or choose another --output_dir")
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


def test_overwrite_output_dir_replaces_a_finished_run(medical_smoke_run, tmp_path):
    finished, _ = medical_smoke_run
    output_dir = tmp_path / "again"
    shutil.copytree(finished, output_dir)
    args = parse_args(SMOKE, ["--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--max_steps", "2",
                              "--save_steps", "1", "--eval_strategy", "no"])
    main(medical, *args)
    # the old checkpoint-15 and checkpoint-30 are gone: a later resume can never pick a checkpoint of the old run
    assert [p.name for p in sorted(output_dir.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    card = json.loads((output_dir / "run_card.json").read_text())
    assert card["config"]["training"]["max_steps"] == 2 and card["resumed_from"] is None


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate of 1e30 is a real divergence: step 1 is finite, its update makes the next loss NaN
    proc = run_recipe("recipes/sft_medical.py", "--config", str(SMOKE), "--output_dir", str(tmp_path),
                      "--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "5", "--save_steps", "1",
                      "--eval_strategy", "no", "--logging_steps", "1", quiet=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # the launcher's status for any failure
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: step 2: the training loss is NaN or infinite; training stopped before this update and "
                      f"the last good checkpoint is {tmp_path / 'checkpoint-1'}. Lower learning_rate (now 1e+30) and "
                      "rerun with --overwrite_output_dir true (resuming would restore the old learning rate)"]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (tmp_path / "run_card.json").exists()
    weights = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def fp16_steps(args, batches):
    """Train a Linear layer as the Trainer does under fp16, with StopOnNonFiniteLoss: (skipped, scale, weight) per
    step, and the RecipeError that stopped it (or None).

    The Trainer's sequence (transformers 5.23 `_run_epoch`): accelerator.backward (the scaled loss), clip_grad_norm_
    (which unscales the gradients), on_pre_optimizer_step, AcceleratedOptimizer.step (GradScaler.step + update),
    zero_grad, on_step_end. accelerate gives fp16 a scaler on GPUs only; on CPU the same autocast fp16 and a real
    `GradScaler("cpu")` overflow and skip exactly as they do there. Each batch is (inputs, loss factor).
    """
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    from lora_recipes.reliability import StopOnNonFiniteLoss

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator's state
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), device_placement=False,
                                     scaler=torch.amp.GradScaler("cpu"))
    callback, state, control = StopOnNonFiniteLoss(), TrainerState(), TrainerControl()
    history = []
    try:
        for inputs, factor in batches:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(inputs).float().mean() * factor
            optimizer.scaler.scale(loss).backward()
            optimizer.scaler.unscale_(optimizer.optimizer)
            callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=optimizer)
            optimizer.step()
            model.zero_grad()
            state.global_step += 1
            callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
            history.append((optimizer.step_was_skipped, optimizer.scaler.get_scale(), model.weight.detach().clone()))
    except RecipeError as e:
        return history, e
    return history, None


FP16_MAX = torch.finfo(torch.float16).max
# a mean over 8 rows of 0.5: the bias gradient is the loss scale itself, which overflows fp16 at the initial 2**16
ROWS = torch.full((8, 4), 0.5)


def test_an_fp16_loss_scaler_overflow_does_not_stop_the_run(tmp_path):
    _, training_args, _ = parse_args(SMOKE, ["--output_dir", str(tmp_path)])
    history, stopped = fp16_steps(training_args, [(ROWS, 1.0)] * 6)
    assert stopped is None
    initial_scale = torch.amp.GradScaler("cpu").get_scale()
    assert initial_scale > FP16_MAX  # why the first step overflows
    assert [skipped for skipped, _, _ in history] == [True, False, False, False, False, False]
    assert [scale for _, scale, _ in history] == [initial_scale / 2] * 6
    weights = [weight for _, _, weight in history]
    assert all(not torch.equal(before, after) for before, after in pairwise(weights))  # it trains on


@pytest.mark.parametrize("bad_batch", [
    (torch.full((8, 4), float("nan")), 1.0),  # a NaN loss
    (ROWS, 1e6),  # a finite loss whose gradients overflow fp16 even unscaled: every step skipped
], ids=["nan-loss", "overflow-at-every-scale"])
def test_fp16_stops_when_the_loss_scaler_skips_at_scale_one(tmp_path, bad_batch):
    _, training_args, _ = parse_args(SMOKE, ["--output_dir", str(tmp_path)])
    history, stopped = fp16_steps(training_args, [(ROWS, 1.0)] * 2 + [bad_batch] * 40)
    skipped, scale_before, weight_before = history[1]  # two good batches: one overflow, one update
    assert not skipped
    # the scaler halves its scale at every skipped step; the run stops at the skip that took it below 1
    skips = int(math.log2(scale_before)) + 1
    assert stopped is not None and len(history) == 2 + skips - 1
    assert str(stopped) == (
        f"step {2 + skips}: the training loss is NaN or infinite (the fp16 loss scaler skipped the last {skips} "
        f"updates, down to loss scale 0.5); training stopped before this update and no checkpoint was saved before "
        f"it. Lower learning_rate (now {training_args.learning_rate:g}) and rerun with --overwrite_output_dir true "
        "(resuming would restore the old learning rate)")
    assert all(skipped and torch.equal(weight, weight_before) for skipped, _, weight in history[2:])


def test_out_of_memory_ends_in_one_line_with_a_smaller_batch_keeping_the_global_batch(tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    # No GPU here: the allocator's error is raised where it would be, inside the second training step
    real_step = SFTTrainer.training_step

    def step_that_runs_out_of_memory(self, *args, **kwargs):
        if self.state.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", step_that_runs_out_of_memory)
    code, _, err = run_recipe_in_process(
        monkeypatch, capsys, "--config", str(SMOKE), "--output_dir", str(tmp_path), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--save_steps", "1",
        "--eval_strategy", "no")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: out of memory at step 2 with per_device_train_batch_size 4 x gradient_accumulation_steps 2: rerun "
        "with --per_device_train_batch_size 2 --gradient_accumulation_steps 4 (the same 8 sequences per device per "
        "step) (the rerun resumes from the last checkpoint); activation_checkpointing true and a smaller max_length "
        "also cut activation memory")
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


@pytest.mark.parametrize("batch, accumulation, advice", [
    (6, 1, "--per_device_train_batch_size 3 --gradient_accumulation_steps 2 (the same 6 sequences"),
    (3, 4, "--per_device_train_batch_size 1 --gradient_accumulation_steps 12 (the same 12 sequences"),
    (1, 8, "a 4-bit base (load_in_4bit true) cuts weight memory"),
])
def test_out_of_memory_advice_keeps_the_global_batch(tmp_path, batch, accumulation, advice):
    _, training_args, _ = parse_args(SMOKE, ["--output_dir", str(tmp_path), "--per_device_train_batch_size",
                                             str(batch), "--gradient_accumulation_steps", str(accumulation)])
    assert advice in out_of_memory_advice(training_args, step=7)
