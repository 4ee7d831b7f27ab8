"""The medical recipe with test-only probes, for the multi-process tests in tests/test_distributed.py:

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/distributed_probes.py [PROBES] RECIPE ARGS

Every rank writes `adapter-rank{N}.sha256` into output_dir at the end of training (the digest of its own trainable
weights: ranks that trained in step hold identical adapters). `--kill_after_checkpoint N` SIGKILLs every rank once
checkpoint-N is complete, as a preempted machine would; `--slow_evaluation S` makes the end-of-training evaluation
start S seconds late on the rank that runs it, as a long generation evaluation would; `--collective_timeout S` gives
the process group a timeout of S seconds once training ends, as `--ddp_timeout S` does on GPUs (transformers passes
ddp_timeout to the process group only for GPU launches: on CPU gloo keeps its 30 minutes). `--record_rows` makes every
rank write `rows-rank{N}.txt`: the token ids of each row it trained on (its attended tokens), one row per line.
"""

import argparse
import hashlib
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from data import medical  # noqa: E402
from lora_recipes import sft  # noqa: E402
from lora_recipes.config import parse_args  # noqa: E402
from lora_recipes.reliability import is_complete  # noqa: E402


class AdapterDigest(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        (Path(args.output_dir) / f"adapter-rank{args.process_index}.sha256").write_text(digest.hexdigest())


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{self.step}"
        deadline = time.monotonic() + 120  # rank 0 writes the checkpoint; the others may get here first
        while not is_complete(checkpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


class CollectiveTimeout(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_end(self, args, state, control, **kwargs):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.seconds))


def record_rows():
    """Every batch a rank trains on, appended to `rows-rank{N}.txt` in output_dir, one row's token ids per line."""
    from trl import SFTTrainer

    training_step = SFTTrainer.training_step

    def recording(self, model, inputs, *args, **kwargs):
        with (Path(self.args.output_dir) / f"rows-rank{self.args.process_index}.txt").open("a") as f:
            for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True):
                f.write(" ".join(str(i) for i, m in zip(ids, mask, strict=True) if m) + "\n")
        return training_step(self, model, inputs, *args, **kwargs)

    SFTTrainer.training_step = recording


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--kill_after_checkpoint", type=int)
    parser.add_argument("--slow_evaluation", type=float)
    parser.add_argument("--collective_timeout", type=float)
    parser.add_argument("--record_rows", action="store_true")
    probes, recipe_argv = parser.parse_known_args()
    if probes.record_rows:
        record_rows()
    callbacks = [AdapterDigest()]
    if probes.kill_after_checkpoint is not None:
        callbacks.append(KillAfterCheckpoint(probes.kill_after_checkpoint))
    if probes.collective_timeout is not None:
        callbacks.append(CollectiveTimeout(probes.collective_timeout))
    if probes.slow_evaluation is not None:
        evaluate = sft.evaluate_after_training

        def slow_evaluation(*args, **kwargs):
            time.sleep(probes.slow_evaluation)
            return evaluate(*args, **kwargs)

        sft.evaluate_after_training = slow_evaluation
    sft.exit_on_recipe_error(sft.main)(medical, *parse_args(REPO_ROOT / "recipes" / "configs" / "medical.yaml",
                                                            recipe_argv), callbacks=callbacks)


if __name__ == "__main__":
    main()
