"""One path for configuration: dataclass defaults -> the recipe's YAML -> CLI flags.

The YAML keys are exactly the field names of `DataArguments` (below), TRL's `SFTConfig` and TRL's `ModelConfig`.
Unknown keys fail loudly, and the cross-field checks run once, before any model or data loads.
"""

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from .distributed import global_batch_warning, strategy_problems
from .errors import RecipeError
from .memory import dry_run_without_gpu
from .run_card import secret_env

# What the YAMLs of `recipes/new_domain.py` hold where the user's own value goes (`YOUR_ORG/YOUR_DATASET`)
PLACEHOLDER = "YOUR_"
# Not in requirements.txt (CI has no GPU for it): the version whose install and config handling were checked here
DEEPSPEED = "deepspeed==0.19.8"


@dataclass
class DataArguments:
    """Where the training data comes from, how it is split, and whether a finished run may be replaced."""

    dataset_name: list[str] | None = field(
        default=None,
        metadata={"help": "Training sources: Hub ids (ID, ID:CONFIG, ID@SPLIT, ID:CONFIG@SPLIT; the train split "
                          "unless named) or local files or folders (.jsonl, .json, .csv, .parquet, sentence@label "
                          ".txt). Several sources form a mixture, each as it is, or with its share after the name: "
                          "'SOURCE weight=W' (give every source a weight: they share their cleaned, deduplicated rows "
                          "in proportion, the total unchanged) or 'SOURCE fraction=F' (F times its rows). Above its "
                          "rows a source is upsampled (rows repeat, the data card says so); applied on each side of "
                          "the train/eval split, seeded."},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of the deduplicated rows held out for eval loss (seeded hash split)."}
    )
    max_rows_per_source: int | None = field(
        default=None, metadata={"help": "Read at most this many rows of each source (quick looks, balancing)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training sources (Hub ids, local files or folders) instead of storing them: "
                          "rows are converted and validated as training reads them, not deduplicated. Needs "
                          "max_steps. The eval split is the first streaming_eval_rows rows whose prompt hashes into "
                          "eval_fraction; training skips every row that hashes there. Under DDP each rank trains on "
                          "its own batches of the stream."},
    )
    streaming_eval_rows: int = field(
        default=200, metadata={"help": "With streaming: how many rows the eval split holds (0: none)."}
    )
    data_card_only: bool = field(
        default=False,
        metadata={"help": "Write the data card (counts, token lengths, train/eval overlap) to output_dir and stop: "
                          "the tokenizer loads, no model does."},
    )
    eval_after_training: bool = field(
        default=True,
        metadata={"help": "After training, compare the base model and the adapter on the held-out split and the "
                          "domain's standard evaluation sets; writes eval_report.json/.md/.png to output_dir."},
    )
    eval_after_training_limit: int | None = field(
        default=None, metadata={"help": "Score at most this many examples per task in the end-of-training evaluation."}
    )
    eval_after_training_standard_sets: bool = field(
        default=True, metadata={"help": "Include the domain's standard evaluation sets (Hub; skipped when out of "
                                        "reach) in the end-of-training evaluation, not only the held-out split."},
    )
    eval_dataset_name: list[str] | None = field(
        default=None,
        metadata={"help": "Eval sources (same forms as dataset_name) instead of a split of dataset_name. A Hub id "
                          "without @SPLIT reads a held-out split: a standard set's own (MedMCQA: validation), else "
                          "test, never train. The same source and split as a training source is refused; training "
                          "rows that ask an eval question are dropped (counted)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished run in output_dir (or start an unfinished one afresh instead of "
                          "resuming it). Off: a finished run is refused, an unfinished one resumes."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the peak-memory plan for these settings (lora_recipes/memory.py) and exit before "
                          "loading the model."},
    )


def parse_args(default_config: Path, argv: list[str] | None = None):
    """Parse `--config FILE` (the recipe's own YAML when not given) and CLI overrides into the three dataclasses."""
    from trl import ModelConfig, SFTConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
    config_path = Path(argv[argv.index("--config") + 1])
    if not config_path.is_file():
        raise RecipeError(f"{config_path}: config file not found")
    refuse_placeholders(config_path, argv)
    # a dry run plans a GPU config on any machine (TrainingArguments refuses bf16 without a GPU; nothing trains)
    gpu_plan = dry_run_without_gpu(argv, config_path)
    # No abbreviations (a typo that is a prefix of a flag must not pass as that flag); argparse's own errors (a value
    # of the wrong type, a missing value) become one line instead of the whole usage text
    parser = TrlParser((DataArguments, SFTConfig, ModelConfig), allow_abbrev=False)

    def one_line_error(message):
        if message.endswith("expected one argument"):
            message += " (give a value that starts with '-' as --flag=VALUE)"
        raise RecipeError(f"{config_path} + command line: {message}")

    parser.error = one_line_error
    try:
        data_args, training_args, model_args = parser.parse_args_and_config(
            [*argv, "--use_cpu", "true"] if gpu_plan else argv, fail_with_unknown_args=True)
    except ValueError as e:  # unknown keys, 4-bit with 8-bit, bad values rejected by the dataclasses
        raise RecipeError(f"{config_path} + command line: {str(e).strip().splitlines()[0]}") from None
    except ImportError as e:  # e.g. a DeepSpeed accelerate config on a machine without deepspeed
        raise RecipeError(f"the launch needs a package that is not installed: {str(e).strip().splitlines()[0]} "
                          f"(DeepSpeed configs: pip install {DEEPSPEED})") from None
    if gpu_plan:
        training_args.use_cpu = False
    check_args(data_args, training_args, model_args)
    warning = global_batch_warning(config_path, training_args.per_device_train_batch_size,
                                   training_args.gradient_accumulation_steps, training_args.world_size)
    if warning and training_args.process_index == 0:
        print(warning)
    return data_args, training_args, model_args


def refuse_placeholders(config_path: Path, argv: list[str]) -> None:
    """A YAML written by recipes/new_domain.py stops here, in one line, while a key still holds a placeholder that the
    command line does not replace (before any other check: on every machine the user sees this first)."""
    import yaml

    given = {arg.split("=")[0] for arg in argv}
    written = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    unfilled = [f"{key} is still the placeholder {value}" for key, value in written.items()
                if PLACEHOLDER in str(value) and f"--{key}" not in given]
    if unfilled:
        raise RecipeError(f"{config_path}: {'; '.join(unfilled)}: set your own (a Hub id or a local file, see "
                          f"docs/new_domain.md) in the YAML or with --{unfilled[0].split()[0]}")


def check_args(data_args: DataArguments, training_args, model_args) -> None:
    """Reject impossible combinations before anything heavy loads."""
    problems = []
    if not data_args.dataset_name:
        problems.append("dataset_name is empty: give at least one Hub id or local file")
    for name in (data_args.dataset_name or []) + (data_args.eval_dataset_name or []):
        if not isinstance(name, str):  # a YAML mapping reaches the dataclass as it is
            problems.append(f"a source is a string, got {name!r}: write 'SOURCE weight=W' or 'SOURCE fraction=F'")
    if data_args.eval_after_training_limit is not None and data_args.eval_after_training_limit <= 0:
        problems.append(f"eval_after_training_limit must be > 0, got {data_args.eval_after_training_limit}")
    if not 0 <= data_args.eval_fraction < 1:
        problems.append(f"eval_fraction must be in [0, 1), got {data_args.eval_fraction}")
    if data_args.eval_fraction == 0 and not data_args.eval_dataset_name and training_args.eval_strategy != "no":
        problems.append("eval_fraction is 0 but eval_strategy is not 'no': there would be nothing to evaluate")
    if data_args.streaming:
        if training_args.max_steps <= 0:
            problems.append("streaming needs max_steps > 0: a stream has no length to count epochs by")
        refused = [name for name, value in (("eval_dataset_name", data_args.eval_dataset_name),
                                            ("max_rows_per_source", data_args.max_rows_per_source),
                                            ("data_card_only", data_args.data_card_only)) if value]
        if refused:
            problems.append(f"streaming: {', '.join(refused)} need(s) the stored data; set streaming false")
        if data_args.streaming_eval_rows < 0:
            problems.append(f"streaming_eval_rows must be >= 0, got {data_args.streaming_eval_rows}")
    if model_args.model_name_or_path is None:
        problems.append("model_name_or_path is not set")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        problems.append("load_in_4bit and load_in_8bit are both set: choose one")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        problems.append("a quantised base cannot be trained directly: set use_peft true (QLoRA)")
    if model_args.use_peft:
        if model_args.lora_r <= 0:
            problems.append(f"lora_r must be > 0, got {model_args.lora_r}")
        if model_args.lora_alpha <= 0:
            problems.append(f"lora_alpha must be > 0, got {model_args.lora_alpha}")
        if not 0 <= model_args.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    if training_args.learning_rate <= 0:
        problems.append(f"learning_rate must be > 0, got {training_args.learning_rate}")
    if training_args.max_length is not None and training_args.max_length <= 0:
        problems.append(f"max_length must be > 0, got {training_args.max_length}")
    if training_args.padding_free and not training_args.packing and training_args.max_length is not None:
        problems.append("padding_free needs packing true or max_length null (TRL)")
    problems += strategy_problems(training_args, model_args)  # quantisation x DDP / FSDP / ZeRO, from the launch
    if training_args.hub_token:
        problems.append("hub_token: keep the token in the HF_TOKEN environment variable or `hf auth login`; an "
                        "argument is pickled into every checkpoint's training_args.bin")
    problems += secrets_in_args(data_args, training_args, model_args)
    if problems:
        raise RecipeError("; ".join(problems))


def secrets_in_args(*configs) -> list[str]:
    """Arguments that hold a secret from the environment: they would reach the run card, logs and checkpoints."""
    secrets = secret_env()
    found = []
    for config in configs:
        for f in fields(config):
            text = str(getattr(config, f.name))
            found += [f"{f.name} holds the value of the environment variable {name}: secrets stay in the environment"
                      for name, value in secrets.items() if value in text and f.name != "hub_token"]
    return found
