"""Tokenizer and base model loading: the chat template that masks the loss, the EOS/pad check, quantisation."""

from pathlib import Path

from .distributed import launch_strategy
from .errors import RecipeError
from .templates import end_of_turn_token_id, training_chat_template

# Distinct pad tokens that popular families ship without setting `pad_token` (Llama 3 has no pad token).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>", "<unk>")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _hub_error(what: str, name: str, error: Exception) -> RecipeError:
    problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).is_absolute() or name.startswith((".", "/")) or Path(name).exists():
        hint = "check the local path" if Path(name).exists() else "no such local folder"
    else:
        hint = ("offline or unreachable Hub? Pass a local folder with --model_name_or_path, or run the offline demo "
                "with a *_smoke.yaml config")
    return RecipeError(f"{what} '{name}': could not be loaded ({problem[:200]}); {hint}")


def load_tokenizer(model_args, training_args):
    """The tokenizer, with a chat template whose `{% generation %}` markers cover each assistant turn and its
    end-of-turn token, and that takes a system prompt (see lora_recipes/templates.py)."""
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _hub_error("tokenizer", name, e) from None

    if training_args.chat_template_path:
        tokenizer.chat_template = Path(training_args.chat_template_path).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise RecipeError(f"tokenizer '{name}' has no chat template: use an instruct model, or pass "
                          "--chat_template_path FILE.jinja (lora_recipes/chat_templates/chatml.jinja is an example)")
    tokenizer.chat_template, notes = training_chat_template(tokenizer, name, training_args.assistant_only_loss)
    if training_args.process_index == 0:
        print("".join(f"note: {note}\n" for note in notes), end="")

    # A pad token distinct from EOS and from the end-of-turn token keeps padding and stopping apart in logs,
    # generation and masks (a template trained on whole sequences need not have turns to end)
    stops = {tokenizer.eos_token_id}
    if training_args.assistant_only_loss:
        stops.add(end_of_turn_token_id(tokenizer))
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stops:
        vocab = tokenizer.get_vocab()
        for candidate in PAD_CANDIDATES:
            if candidate in vocab and vocab[candidate] not in stops:
                tokenizer.pad_token = candidate
                break
    return tokenizer


def quantization_config(model_args):
    """BitsAndBytesConfig for 4-bit NF4 or 8-bit, or None for plain LoRA."""
    from trl import get_quantization_config

    return get_quantization_config(model_args)


def describe_quantization(model_args) -> str:
    """How the base is loaded, in words: for reports and model cards, and the key that adapters on one base share."""
    if model_args.load_in_4bit:
        nested = ", double quantisation" if model_args.use_bnb_nested_quant else ""
        return f"4-bit {model_args.bnb_4bit_quant_type.upper()}{nested}, compute dtype {model_args.dtype}"
    if model_args.load_in_8bit:
        return "8-bit LLM.int8"
    return f"none: plain LoRA on {model_args.dtype} weights"


def load_model(model_args, training_args):
    """The base model, quantised as configured, one device per process; weights from safetensors only."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    quant = quantization_config(model_args)
    # Quantised weights cannot be moved after loading: alone or under DDP, each process loads the whole model onto its
    # own GPU (its local rank, the same numbering on every machine). FSDP and DeepSpeed place and shard the weights
    # themselves (ZeRO-3 refuses a device_map); bitsandbytes then quantises on the GPU accelerate gave this process.
    device_map = None
    if (quant is not None and torch.cuda.is_available() and not training_args.use_cpu
            and launch_strategy(training_args) in ("single", "ddp")):
        device_map = {"": PartialState().local_process_index}
    name = model_args.model_name_or_path
    refuse_pickled_weights(Path(name))
    try:
        return AutoModelForCausalLM.from_pretrained(
            name,
            revision=model_args.model_revision,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
            quantization_config=quant,
            device_map=device_map,
            trust_remote_code=training_args.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise _hub_error("model", name, e) from None


def refuse_pickled_weights(folder: Path) -> None:
    """A local model folder with weights only as pickles is refused: unpickling can run code, safetensors cannot."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise RecipeError(f"model '{folder}': weights only as pickles ({', '.join(pickles)}); the recipes load "
                          "safetensors only (a pickle can run code): convert them with a trusted tool first")
