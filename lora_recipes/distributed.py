"""Several processes: which engine the launcher chose, which combinations it cannot train, data prepared once.

The recipes never read `accelerate_configs/`: `accelerate launch --config_file ...` (or torchrun) puts its choice in
the environment of every process, and `launch_strategy` reads it from there. `strategy_problems` turns the
combinations that break in every peer tracker into one-line reasons with the alternative, before anything loads.

    strategy  launched by                                  environment read here
    single    python, or accelerate launch (1 process)     -
    ddp       accelerate_configs/multi_gpu.yaml, torchrun  WORLD_SIZE > 1; any multi-process launch on CPU
    fsdp      accelerate_configs/fsdp_qlora.yaml           ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_STATE_DICT_TYPE
    zero2/3   accelerate_configs/deepspeed_zero*.yaml      ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE,
                                                           ..._ZERO3_SAVE_16BIT_MODEL, ..._CONFIG_FILE (or --deepspeed)
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from .data import PreparedData, SourceReport
from .errors import RecipeError

FLOAT_STORAGE = ("bfloat16", "float16", "float32")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _deepspeed_json(training_args) -> dict:
    """The DeepSpeed JSON when the launch names one (accelerate's deepspeed_config_file, or --deepspeed); else {}."""
    source = training_args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if isinstance(source, dict):
        return source
    if source == "none":
        return {}
    try:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"{source}: the DeepSpeed config cannot be read ({e})") from None


def launch_strategy(training_args) -> str:
    """'single', 'ddp', 'fsdp' or 'zero1'/'zero2'/'zero3', as launched; safe before torch.distributed starts."""
    processes = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"
    if training_args.use_cpu or _env_true("ACCELERATE_USE_CPU"):
        return processes  # accelerate turns FSDP and DeepSpeed on for GPUs only: on CPU they run as plain DDP
    if _env_true("ACCELERATE_USE_DEEPSPEED") or training_args.deepspeed:
        ds = _deepspeed_json(training_args)
        # accelerate's DeepSpeedPlugin defaults to stage 2 when neither the config nor a JSON names one
        stage = ds.get("zero_optimization", {}).get("stage", 0) if ds else os.environ.get(
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return f"zero{stage}"
    if _env_true("ACCELERATE_USE_FSDP") or training_args.fsdp:
        return "fsdp"
    return processes


def _zero3_gathers_16bit_on_save(training_args) -> bool:
    zero = _deepspeed_json(training_args).get("zero_optimization")
    if zero is not None:
        return bool(zero.get("stage3_gather_16bit_weights_on_model_save",
                             zero.get("stage3_gather_fp16_weights_on_model_save", False)))
    return _env_true("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")


def _fsdp_saves_full_state_dict(training_args) -> bool:
    if training_args.fsdp:
        state_dict_type = str((training_args.fsdp_config or {}).get("state_dict_type", "FULL_STATE_DICT"))
    else:  # accelerate's FSDP plugin: FULL for FSDP1, SHARDED for FSDP2 unless the config says otherwise
        default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
        state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", default)
    return state_dict_type.upper() in ("FULL_STATE_DICT", "1")


def strategy_problems(training_args, model_args) -> list[str]:
    """Why this quantisation / strategy / settings combination cannot train, one sentence each (empty: it can)."""
    strategy = launch_strategy(training_args)
    problems = []
    sharded = {"fsdp": "FSDP", "zero3": "ZeRO-3"}.get(strategy)
    if sharded and model_args.load_in_8bit:
        problems.append(
            f"8-bit weights cannot be sharded by {sharded} (int8 storage; under ZeRO-3 the loss comes out wrong): use "
            "4-bit with --bnb_4bit_quant_storage bfloat16, or keep 8-bit with DDP (accelerate_configs/multi_gpu.yaml) "
            "or ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)"
        )
    storage = model_args.bnb_4bit_quant_storage
    if sharded and model_args.load_in_4bit and storage not in FLOAT_STORAGE:
        problems.append(
            f"4-bit + {sharded} needs the packed weights in a float dtype: bnb_4bit_quant_storage is "
            f"{storage or 'uint8 (the default)'}, which {sharded} cannot shard (\"Cannot flatten integer dtype "
            "tensors\"): add --bnb_4bit_quant_storage bfloat16 --dtype bfloat16, or use DDP "
            "(accelerate_configs/multi_gpu.yaml)"
        )
    elif sharded and model_args.load_in_4bit and storage != model_args.dtype:
        problems.append(
            f"4-bit + {sharded}: bnb_4bit_quant_storage ({storage}) must equal dtype ({model_args.dtype}) so the "
            f"quantised and the plain weights shard together: set both to bfloat16"
        )
    if strategy == "zero3" and not _zero3_gathers_16bit_on_save(training_args):
        problems.append(
            "ZeRO-3 without 16-bit gathering on save writes an empty LoRA adapter: set zero3_save_16bit_model: true "
            "in the accelerate config (as accelerate_configs/deepspeed_zero3.yaml does), or "
            "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed JSON"
        )
    if strategy == "fsdp" and not _fsdp_saves_full_state_dict(training_args):
        problems.append(
            "FSDP with a sharded state dict saves no PEFT adapter in output_dir: set fsdp_state_dict_type: "
            "FULL_STATE_DICT (as accelerate_configs/fsdp_qlora.yaml does)"
        )
    reentrant = (training_args.activation_checkpointing_kwargs or {}).get("use_reentrant")
    if strategy == "ddp" and training_args.activation_checkpointing and reentrant and \
            training_args.ddp_find_unused_parameters:
        problems.append(
            "reentrant activation checkpointing with ddp_find_unused_parameters true fails under DDP with \"Expected "
            "to mark a variable ready only once\": set activation_checkpointing_kwargs {use_reentrant: false} (or "
            "ddp_find_unused_parameters false: LoRA uses every adapter weight at every step)"
        )
    return problems


def global_batch_warning(config_path: Path, per_device: int, accumulation: int, processes: int) -> str | None:
    """One line when the global batch of this launch differs from the one the YAML is sized for: its
    per_device_train_batch_size x gradient_accumulation_steps on one process (the recipes' YAMLs are written for one
    GPU). More GPUs with the same YAML multiply the batch, which the learning rate and the step count were not set
    for; None when they agree."""
    import yaml
    from trl import SFTConfig

    written = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    defaults = {f.name: f.default for f in fields(SFTConfig)}
    sized = {key: written.get(key, defaults[key]) for key in ("per_device_train_batch_size",
                                                             "gradient_accumulation_steps")}
    intended = sized["per_device_train_batch_size"] * sized["gradient_accumulation_steps"]
    actual = per_device * accumulation * processes
    if actual == intended:
        return None
    advice = ""
    if intended % (per_device * processes) == 0:
        advice = f"; to keep it, pass --gradient_accumulation_steps {intended // (per_device * processes)}"
    elif intended % processes == 0:
        advice = (f"; to keep it, set per_device_train_batch_size x gradient_accumulation_steps = "
                  f"{intended // processes}")
    return (f"warning: global batch {actual} ({per_device} per device x {accumulation} accumulation x {processes} "
            f"processes) differs from the {intended} that {config_path} is sized for "
            f"({sized['per_device_train_batch_size']} x {sized['gradient_accumulation_steps']} x 1 process){advice}")


def _data_cache(training_args) -> Path:
    # one folder per machine, named by its first global rank: hostnames can repeat across containers
    first_rank = training_args.process_index - training_args.local_process_index
    return Path(training_args.output_dir) / "data_cache" / f"node{first_rank}"


def prepare_data_once(training_args, prepare: Callable[[], PreparedData]) -> PreparedData:
    """The data `prepare()` returns, prepared by the first process of each machine only, and the same on every rank.

    That process saves the result under `output_dir/data_cache/`; every process, itself included, then reads that
    copy (memory-mapped: one copy in RAM per machine). Identical datasets on every rank also let TRL tokenise once
    and the other ranks load its cached result. Every run rewrites the cache, so it is never stale.
    """
    from datasets import Dataset

    cache = _data_cache(training_args)
    with training_args.main_process_first(local=True, desc="data preparation"):
        if training_args.local_process_index == 0:
            shutil.rmtree(cache, ignore_errors=True)  # a failed preparation must leave nothing for the others to read
            data = prepare()
            data.train.save_to_disk(cache / "train")
            if data.eval is not None:
                data.eval.save_to_disk(cache / "eval")
            if data.work_dir is not None:  # staged, converted sources (as large as the files): the cache has the rows
                shutil.rmtree(data.work_dir, ignore_errors=True)
            (cache / "sources.json").write_text(json.dumps([asdict(s) for s in data.sources]), encoding="utf-8")
        elif not (cache / "sources.json").is_file():
            raise RecipeError(f"process {training_args.process_index}: the data prepared by the main process is "
                              f"missing from {cache}: see the main process's error")
        sources = json.loads((cache / "sources.json").read_text(encoding="utf-8"))
        return PreparedData(
            train=Dataset.load_from_disk(cache / "train"),
            eval=Dataset.load_from_disk(cache / "eval") if (cache / "eval").is_dir() else None,
            sources=[SourceReport(**s) for s in sources],
        )


def remove_data_cache(training_args) -> None:
    """Drop this machine's data cache once every process is done with it (after training and evaluation)."""
    if training_args.local_process_index != 0:
        return
    cache = _data_cache(training_args)
    shutil.rmtree(cache, ignore_errors=True)
    with contextlib.suppress(OSError):  # other machines sharing output_dir may still hold theirs
        cache.parent.rmdir()
