"""Measure real training steps: peak memory, throughput and padding of the recipe's trainer or a bare TRL one.

`tests/test_memory.py` compares the planner (`lora_recipes/memory.py`) with the peaks measured here, and
`bench/train_throughput.py` runs the recipe and a bare TRL `SFTTrainer` side by side through it. A run trains
either through the recipe's own flow (`lora_recipes.sft.main`, the YAML and its overrides) or through a bare
`SFTTrainer` with TRL's defaults on the same model, data, adapter shape (rank, targets), batch and seed:

    python -m lora_recipes.measure '{"kind": "recipe", "domain": "medical", "config": "recipes/configs/medical.yaml",
                                     "args": ["--model_name_or_path", "...", ...], "warmup": 2, "rounds": 3,
                                     "steps_per_round": 1, "gate": false, "threads": 1, "track_tensors": false}'

prints its events as JSON lines (`measure: {...}`), with `"launch": true` only the first optimizer step's (timing a
launch); `measure_here(spec)` runs one in this process instead.

Memory, all reset when training starts, so that loading does not count: on CUDA the allocator's peak
(`max_memory_allocated`); on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the process
after its imports, and with `track_tensors` the peak of live tensor bytes (a dispatch mode that adds up every
storage an op creates until it is freed: the CPU counterpart of `max_memory_allocated`, what the planner models).
Time: wall clock (`time.perf_counter`) and CPU time (`time.process_time`) per round of optimizer steps, with the
non-padding tokens the round trained. With `"gate": true` the worker waits for a line on stdin before each round, so
that a parent can interleave several workers and time each one alone.
"""

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Resident memory on Linux
# ---------------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def release_free_memory() -> int:
    """Collect garbage and hand freed heap pages back to the OS; returns the resident bytes after."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def tensor_peak_tracker():
    """A TorchDispatchMode that adds up the bytes of live tensor storages and keeps their peak: the CPU analogue of
    CUDA's `max_memory_allocated` (what the planner models, without the allocator's and the runtime's overheads)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class TensorPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.storages: dict[int, weakref.ref] = {}

        def track(self, tensor) -> None:
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self.storages or tensor.device.type == "meta":
                return
            nbytes = storage.nbytes()

            def freed(_, key=key, nbytes=nbytes):
                self.storages.pop(key, None)
                self.live -= nbytes

            self.storages[key] = weakref.ref(storage, freed)
            self.live += nbytes
            self.peak = max(self.peak, self.live)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.track(leaf)
            return out

    return TensorPeak()


def model_tensors(model):
    """Parameters, buffers and bitsandbytes quantisation constants: everything the weights hold."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            yield from (t for t in (state.absmax, state.code) if t is not None)
            if state.nested:
                yield from (state.state2.absmax, state.state2.code)


# ---------------------------------------------------------------------------------------------------------------
# Random-init models and data of known shape
# ---------------------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def random_model(output_dir: Path, seed: int = 0, **shape) -> Path:
    """A random-init causal LM of `shape` (config.json fields; Llama unless `model_type` says otherwise) saved with
    the tiny model's tokenizer and chat template, so that the recipe loads it like any local model."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tiny_model import TINY_MODEL_DIR

    output_dir = Path(output_dir)
    tokenizer_config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    tokens = {"eos_token_id": tokenizer_config["eos_token_id"], "pad_token_id": tokenizer_config["pad_token_id"],
              "bos_token_id": None}
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **{**tokens, **shape})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, output_dir / name)
    return output_dir


def long_chats(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """`rows` distinct chats whose assistant answer has `words` random words: every one fills max_length."""
    import random

    rng = random.Random(seed)
    vocabulary = [w for w in Path(__file__).read_text().split() if w.isalpha()]
    with Path(path).open("w", encoding="utf-8") as f:
        for i in range(rows):
            answer = " ".join(rng.choice(vocabulary) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# The probe: a TrainerCallback that times steps and reads the peak
# ---------------------------------------------------------------------------------------------------------------
PREFIX = "measure: "  # marks the worker's JSON lines among whatever the trainer prints


def print_event(event: dict) -> None:
    print(PREFIX + json.dumps(event), flush=True)


def make_probe(emit, baseline_rss: int, warmup: int = 0, rounds: int = 1, steps_per_round: int = 1,
               gate: bool = False, track_tensors: bool = False):
    """A TrainerCallback that passes events ({"event": name, ...}) to `emit`: the batches' padding waste, the first
    optimizer step, one "round" per `steps_per_round` steps after `warmup` steps (wall and CPU seconds, non-padding
    tokens), and the memory peak of the whole training."""
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            emit({"event": "batches", **padding_waste(train_dataloader, args.per_device_train_batch_size, args.seed)})
            self.cuda = next(model.parameters()).device.type == "cuda"
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start_rss = release_free_memory()
            reset_peak_rss()
            self.tracker = tensor_peak_tracker() if track_tensors else None
            if self.tracker is not None:
                for tensor in model_tensors(model):
                    self.tracker.track(tensor)
                self.weight_bytes = self.tracker.live
                self.tracker.__enter__()
            if warmup == 0:
                self.start_round(state)

        def start_round(self, state):
            if gate:
                emit({"event": "waiting", "step": state.global_step})
                sys.stdin.readline()
            self.round_start, self.cpu_start = time.perf_counter(), time.process_time()
            self.tokens_start = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            step = state.global_step
            if step == 1:
                emit({"event": "first_step"})
            if step > warmup and (step - warmup) % steps_per_round == 0:
                emit({"event": "round", "seconds": time.perf_counter() - self.round_start,
                      "cpu_seconds": time.process_time() - self.cpu_start,
                      "tokens": state.num_input_tokens_seen - self.tokens_start, "steps": steps_per_round})
            if step >= warmup and (step - warmup) % steps_per_round == 0 and step < warmup + rounds * steps_per_round:
                self.start_round(state)

        def on_train_end(self, args, state, control, **kwargs):
            memory = {"event": "memory", "device": "cuda" if self.cuda else "cpu",
                      "rss_start_bytes": self.start_rss - baseline_rss, "rss_peak_bytes": peak_rss() - baseline_rss}
            if self.tracker is not None:
                self.tracker.__exit__(None, None, None)
                memory.update(tensor_peak_bytes=self.tracker.peak, weight_tensor_bytes=self.weight_bytes)
            if self.cuda:
                memory.update(cuda_peak_bytes=torch.cuda.max_memory_allocated(),
                              cuda_reserved_bytes=torch.cuda.max_memory_reserved())
            emit(memory)

    return Probe()


# ---------------------------------------------------------------------------------------------------------------
# The two trainers
# ---------------------------------------------------------------------------------------------------------------
def padding_waste(train_dataloader, batch_size: int, seed: int) -> dict:
    """Share of the positions that are padding in one shuffled epoch of the trainer's batches (same dataset, collator
    and batch size; padding-free batches have none)."""
    import torch
    from torch.utils.data import DataLoader

    epoch = DataLoader(train_dataloader.dataset, batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), collate_fn=train_dataloader.collate_fn)
    real = positions = batches = 0
    for batch in epoch:
        ids = batch["input_ids"]
        positions += ids.numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        batches += 1
    return {"padding_waste": 1 - real / positions, "tokens_per_batch": real / batches, "batches_per_epoch": batches}


def baseline_trainer(domain, data_args, recipe_args, model_args, callbacks):
    """A bare SFTTrainer with TRL's defaults, on the recipe's model, data, batch and seed, training the same adapter
    (rank and target modules; alpha and dropout are TRL's defaults)."""
    from transformers import AutoTokenizer
    from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

    from .data import prepare_data
    from .model import load_model

    shared = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "seed",
              "use_cpu", "report_to", "save_strategy", "eval_strategy", "include_num_input_tokens_seen",
              "disable_tqdm", "logging_steps")
    args = SFTConfig(**{name: getattr(recipe_args, name) for name in shared})
    data = prepare_data(data_args.dataset_name, domain.SCHEMAS, eval_fraction=data_args.eval_fraction,
                        seed=recipe_args.seed, max_rows_per_source=data_args.max_rows_per_source)
    return SFTTrainer(
        model=load_model(model_args, args),
        args=args,
        train_dataset=data.train,
        processing_class=AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        peft_config=get_peft_config(ModelConfig(use_peft=True, lora_r=model_args.lora_r,
                                                lora_target_modules=model_args.lora_target_modules)),
        callbacks=callbacks,
    )


def first_step_marker(emit):
    """The only probe of a timed launch (`"launch": true`): an event at the first optimizer step, nothing before."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                emit({"event": "first_step"})

    return FirstStep()


def run(spec: dict, emit) -> None:
    """Train as `spec` says (see the module docstring), passing the probe's events to `emit`."""
    import importlib

    import torch
    import trl  # noqa: F401  (imported before the baseline is taken)

    from .config import parse_args

    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    baseline = release_free_memory()
    sys.path.insert(0, str(REPO_ROOT))
    domain = importlib.import_module(f"data.{spec['domain']}")
    data_args, training_args, model_args = parse_args(Path(spec["config"]), spec["args"])
    training_args.include_num_input_tokens_seen = "non_padding"  # the throughput counts real tokens only
    probe = first_step_marker(emit) if spec.get("launch") else make_probe(
        emit, baseline, spec.get("warmup", 0), spec.get("rounds", 1), spec.get("steps_per_round", 1),
        spec.get("gate", False), spec.get("track_tensors", False))
    if spec["kind"] == "recipe":
        from .sft import main  # the bare baseline imports none of the recipe's flow

        main(domain, data_args, training_args, model_args, callbacks=[probe])
    else:
        baseline_trainer(domain, data_args, training_args, model_args, [probe]).train()
    emit({"event": "done"})


def collect(events: list[dict]) -> dict:
    """Events merged into one dict, the rounds as a list."""
    result = {"rounds": []}
    for e in events:
        if e["event"] == "round":
            result["rounds"].append({k: v for k, v in e.items() if k != "event" and not k.startswith("_")})
        else:
            result.update({k: v for k, v in e.items() if k != "event" and not k.startswith("_")})
    return result


def measure_here(spec: dict) -> dict:
    """Measure in this process (the tensor peak does not depend on what the process did before)."""
    events = []
    run(spec, events.append)
    return collect(events)


def start(spec: dict, gate: bool = False) -> subprocess.Popen:
    """A worker process for `spec`, offline, its JSON lines on stdout (stderr goes to a file: `proc.log`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "lora_recipes.measure", json.dumps({**spec, "gate": gate})],
                            cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=log,
                            stdin=subprocess.PIPE if gate else subprocess.DEVNULL)
    proc.log = log
    return proc


def read_events(proc: subprocess.Popen, until: str) -> list[dict]:
    """JSON events from a worker up to and including the first `until` event."""
    events = []
    for line in proc.stdout:
        if line.startswith(PREFIX):
            events.append({**json.loads(line[len(PREFIX):]), "_at": time.perf_counter()})  # when it arrived
            if events[-1]["event"] == until:
                return events
    proc.wait()
    proc.log.seek(0)
    raise RuntimeError(f"measurement worker exited with {proc.returncode} before '{until}':\n"
                       f"{proc.log.read()[-3000:]}")


def measure(spec: dict, timeout: float = 600) -> dict:
    """Measure in a fresh worker process (resident-memory numbers need one)."""
    proc = start(spec)
    try:
        events = read_events(proc, "done")
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return collect(events)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), print_event)
