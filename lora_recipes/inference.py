"""Use a trained adapter: load it on the base it was trained on, serve several adapters on one base, generate.

The base model is loaded the way training loaded it (quantisation, dtype, attention, from `run_card.json`), so
inference sees the weights the adapter was trained against. Several adapters trained on the same base are PEFT
named adapters on one copy of it; each request picks one.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError
from .model import _hub_error, describe_quantization, quantization_config

RUN_CARD = "run_card.json"


@dataclass
class GenerationArguments:
    """How answers are generated; every setting has a flag of the same name."""

    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer, in tokens."})
    greedy: bool = field(default=False, metadata={"help": "Always take the most likely token (deterministic); "
                                                          "temperature and top_p are then unused."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature: lower is more conservative."})
    top_p: float = field(default=0.9, metadata={"help": "Sample from the smallest token set with this much "
                                                        "probability (nucleus sampling)."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Above 1 discourages repeated tokens; a "
                                                                      "mild value keeps quoted terms usable."})
    seed: int = field(default=0, metadata={"help": "Sampling seed, set before each generation call, so an answer "
                                                   "does not depend on the requests before it."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System prompt for every conversation. Default: the one the adapter was trained with "
                "(run_card.json), none for a model without a run card."})

    def __post_init__(self):
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"temperature must be > 0 (or use --greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if problems:
            raise RecipeError("; ".join(problems))


def parse_flags(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Command-line flags into the dataclasses; an unknown flag or a bad value is a one-line error."""
    from transformers import HfArgumentParser

    try:
        return HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)
    except ValueError as e:
        raise RecipeError(str(e).strip().splitlines()[0]) from None


@dataclass
class TrainedAdapter:
    """An adapter folder, with how its base model was loaded in training (`run_card.json`)."""

    name: str
    path: Path
    run_card: dict
    model_args: "trl.ModelConfig"  # noqa: F821
    base_model: str

    @property
    def quantized(self) -> bool:
        return self.model_args.load_in_4bit or self.model_args.load_in_8bit

    @property
    def quantization(self) -> str:
        """What the base looked like in training, in words (also the key that adapters on one base must share)."""
        return describe_quantization(self.model_args)

    @property
    def system_prompt(self) -> str | None:
        return self.run_card.get("system_prompt")


def find_run_card(folder: Path) -> Path:
    """The run card of an adapter folder; a `checkpoint-N` folder uses the one its run wrote next to it."""
    candidates = [folder / RUN_CARD]
    if folder.name.startswith("checkpoint-"):
        candidates.append(folder.parent / RUN_CARD)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RecipeError(f"{folder / RUN_CARD}: not found. It records the base model and the quantisation the "
                      "adapter was trained with; the recipes write it when training ends (for a checkpoint, "
                      "next to the checkpoint folders)")


def read_json(path: Path) -> dict:
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise RecipeError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def read_adapter(path: str | Path, name: str | None = None, base_model: str | None = None) -> TrainedAdapter:
    """Check an adapter folder and read how it was trained. `base_model` replaces the base in the run card."""
    from trl import ModelConfig

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise RecipeError(f"{folder}: no adapter_model.safetensors (weights are loaded from safetensors only)")
    card_path = find_run_card(folder)
    card = read_json(card_path)
    try:
        model_args = ModelConfig(**card["config"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f"{card_path}: field 'config.model' does not describe a TRL ModelConfig ({e})") from None
    return TrainedAdapter(name=name or folder.name, path=folder, run_card=card, model_args=model_args,
                          base_model=base_model or card["base_model"])


def read_adapters(specs: list[str], base_model: str | None = None) -> list[TrainedAdapter]:
    """`NAME=DIR` or `DIR` (named after the folder) for each `--adapter`; names must be unique."""
    adapters = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = None, spec
        elif not name or not path:
            raise RecipeError(f"--adapter {spec}: expected NAME=DIR or DIR")
        adapters.append(read_adapter(path, name, base_model))
    names = [a.name for a in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"--adapter: the name {', '.join(duplicates)} is used twice: give each NAME=DIR a "
                          "different name")
    return adapters


def check_adapter(name: str | None, loaded: list[str]) -> None:
    if name is not None and name not in loaded:
        raise RecipeError(f"unknown adapter '{name}' (loaded: {', '.join(loaded) or 'none: this is a merged model'})")


def model_system_prompt(folder: str) -> str | None:
    """The training system prompt of a merged model folder (its run card), None for any other model."""
    path = Path(folder) / RUN_CARD
    return read_json(path).get("system_prompt") if path.is_file() else None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def from_pretrained(name: str, **kwargs):
    """A causal LM on this machine's device, weights from safetensors only, a one-line error if it cannot load."""
    from transformers import AutoModelForCausalLM

    device_map = {"": 0} if device() == "cuda" else None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, device_map=device_map, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error("model", name, e) from None
    return model.eval()


def load_base(adapter: TrainedAdapter, quantized: bool = True, dtype: str | None = None):
    """The adapter's base model: quantised as in training (`quantized`), or its original weights in `dtype`."""
    args = adapter.model_args
    return from_pretrained(
        adapter.base_model,
        revision=args.model_revision,
        dtype=args.dtype if quantized or dtype is None else dtype,
        attn_implementation=args.attn_implementation,
        quantization_config=quantization_config(args) if quantized else None,
        trust_remote_code=adapter.run_card["trust_remote_code"],
    )


def load_adapters(adapters: list[TrainedAdapter]):
    """One base, loaded as in training, with every adapter on it as a named PEFT adapter (the first one active)."""
    from peft import PeftModel

    first = adapters[0]
    for other in adapters[1:]:
        if (other.base_model, other.quantization) != (first.base_model, first.quantization):
            raise RecipeError(
                f"adapters '{first.name}' and '{other.name}' were trained on different bases ({first.base_model}, "
                f"quantisation {first.quantization} vs {other.base_model}, quantisation {other.quantization}): "
                "serve them separately")
    model = PeftModel.from_pretrained(load_base(first), first.path, adapter_name=first.name)
    for other in adapters[1:]:
        model.load_adapter(other.path, adapter_name=other.name)
    model.set_adapter(first.name)
    return model.eval()


def load_tokenizer(folder: Path, others: list[Path] = ()):
    """The tokenizer saved with a model or adapter (its chat template is the one used in training)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise RecipeError(f"{folder}: the tokenizer has no chat template")
    for other in others:
        if AutoTokenizer.from_pretrained(other).chat_template != tokenizer.chat_template:
            raise RecipeError(f"{other} and {folder} were trained with different chat templates: serve them "
                              "separately")
    return tokenizer


# `{% generation %}` / `{% endgeneration %}` with their whitespace control (`-` strips, `+` keeps)
GENERATION_TAG = re.compile(r"\{%([-+]?)\s*(?:end)?generation\s*([-+]?)%\}")


def plain_chat_template(template: str) -> str:
    """`template` without its `{% generation %}` tags, rendering the same text.

    The tags are a transformers extension (they mark the assistant tokens for the training loss); renderers outside
    transformers (TGI's minijinja, llama.cpp, Ollama) may reject them. A removed tag keeps its effect on the
    whitespace around it as transformers renders templates: `-` strips, otherwise `lstrip_blocks` takes the indent
    of a tag alone on its line and `trim_blocks` the newline after it.
    """
    pieces = GENERATION_TAG.split(template)  # text, (left, right, text) per tag
    plain = pieces[0]
    for left, right, text in zip(pieces[1::3], pieces[2::3], pieces[3::3], strict=True):
        if left == "-":
            plain = plain.rstrip()
        elif not left:
            plain = re.sub(r"(^|\n)[ \t]*\Z", r"\1", plain)
        if right == "-":
            text = text.lstrip()
        elif not right:
            text = text.removeprefix("\n")
        plain += text
    return plain


def eos_token_ids(tokenizer, generation_config) -> list[int]:
    """The end-of-turn token of the chat template first, then the tokenizer's EOS and any other stop token the model
    declares.

    The end-of-turn token is often not EOS: a base model on a ChatML template (EOS `<|endoftext|>`) learns to end its
    turn with `<|im_end|>`, and without it as a stop token answers run to the budget, inventing further turns.
    """
    from .templates import end_of_turn_token_id

    end_of_turn = end_of_turn_token_id(tokenizer)
    # Only a token of the added vocabulary: a template whose turns end in plain content must not stop on a word
    ids = [end_of_turn] if end_of_turn in tokenizer.get_added_vocab().values() else []
    declared = generation_config.eos_token_id if generation_config is not None else None
    for token_id in [tokenizer.eos_token_id, *(declared if isinstance(declared, list) else [declared])]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


# Every setting that changes which token is picked, at its "off" value. transformers takes each setting a
# GenerationConfig leaves unset from the model's own generation_config.json, and instruct models ship sampling
# settings there (Qwen2.5-Instruct: repetition penalty, top_k, top_p, temperature): a setting not given here would
# apply although nothing asked for it. (Settings that are only "off" when unset, such as
# suppress_tokens or forced_eos_token_id, belong to encoder-decoder and speech models.)
# min_new_tokens 0 also replaces any min_length (transformers sets min_length = prompt length + min_new_tokens).
DECODING_OFF = {"num_beams": 1, "num_return_sequences": 1, "min_new_tokens": 0, "repetition_penalty": 1.0,
                "no_repeat_ngram_size": 0, "guidance_scale": 1.0, "renormalize_logits": False,
                "remove_invalid_values": False}
SAMPLING_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0}  # used only when sampling (and set only then: greedy would warn about them)


def explicit_generation_config(model, tokenizer, max_new_tokens: int, greedy: bool = True, **settings):
    """A GenerationConfig with `settings` and every other setting off (nothing from the model's own), stopping at
    the chat template's end of turn and padding with the tokenizer's pad token."""
    from transformers import GenerationConfig

    return GenerationConfig(**{**DECODING_OFF, **({} if greedy else SAMPLING_OFF), **settings},
                            max_new_tokens=max_new_tokens, do_sample=not greedy,
                            eos_token_id=eos_token_ids(tokenizer, model.generation_config),
                            pad_token_id=tokenizer.pad_token_id)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` after the system prompt, unless they bring their own system turn or there is no prompt.

    Without one, some templates insert their own default (Qwen2.5: "You are Qwen, created by Alibaba Cloud...").
    """
    if not system_prompt or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def conversation(prompt: str, system_prompt: str | None) -> list[dict]:
    """A first user turn, after the system prompt when there is one."""
    return with_system_prompt([{"role": "user", "content": prompt}], system_prompt)


def conversation_logits(model, tokenizer, conversations: list[list[dict]]) -> list["torch.Tensor"]:  # noqa: F821
    """Float32 CPU logits of each conversation (one at a time: no padding in the comparison)."""
    import torch

    results = []
    for messages in conversations:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        with torch.no_grad():
            results.append(model(**inputs).logits.float().cpu())
    return results


def max_difference(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@dataclass
class Answer:
    text: str
    token_ids: list[int]  # the generated tokens, ending with the stop token when finish_reason is "eos"
    finish_reason: str  # "eos": the model ended its turn; "length": max_new_tokens was reached


@dataclass
class Request:
    messages: list[dict]
    adapter: str | None = None


class ChatModel:
    """A model ready to answer: a merged model, or one base with one or more named adapters."""

    def __init__(self, model, tokenizer, system_prompts: dict[str | None, str | None]):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
        self.system_prompts = system_prompts  # adapter name (None: merged model) -> its training system prompt
        self.adapters = [name for name in system_prompts if name is not None]

    @classmethod
    def load(cls, adapters: list[TrainedAdapter], model_name_or_path: str | None = None):
        """One base with named adapters (`read_adapters`), or else a standalone (merged) model."""
        if adapters:
            tokenizer = load_tokenizer(adapters[0].path, [a.path for a in adapters[1:]])
            return cls(load_adapters(adapters), tokenizer, {a.name: a.system_prompt for a in adapters})
        return cls(from_pretrained(model_name_or_path, dtype="auto"), load_tokenizer(model_name_or_path),
                   {None: model_system_prompt(model_name_or_path)})

    def system_prompt(self, adapter: str | None, args: GenerationArguments) -> str | None:
        """The system prompt of `args`, else the one `adapter` (or the merged model) was trained with."""
        return args.system_prompt or self.system_prompts[adapter]

    def generation_config(self, args: GenerationArguments):
        """Every setting from `args` (nothing inherited), stopping at the chat template's end-of-turn token."""
        sampling = {} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p}
        return explicit_generation_config(self.model, self.tokenizer, args.max_new_tokens, args.greedy,
                                 repetition_penalty=args.repetition_penalty, **sampling)

    def generate(self, conversations: list[list[dict]], args: GenerationArguments, adapter: str | None = None,
                 streamer=None) -> list[Answer]:
        """Answers to a batch of conversations, all with one adapter; `streamer` prints tokens as they come."""
        import torch

        check_adapter(adapter, self.adapters)
        if adapter is not None:
            self.model.set_adapter(adapter)
        config = self.generation_config(args)
        inputs = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                                    return_tensors="pt", return_dict=True).to(self.model.device)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=config, streamer=streamer)
        answers = []
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            stop = next((i for i, token in enumerate(row) if token in config.eos_token_id), None)
            ids = row if stop is None else row[:stop + 1]  # after EOS a batch row holds only padding
            answers.append(Answer(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids,
                                  finish_reason="length" if stop is None else "eos"))
        return answers

    def answer(self, requests: list[Request], args: GenerationArguments, batch_size: int) -> list[Answer]:
        """Answers in request order; requests are batched per adapter, so the base is never reloaded."""
        answers: list[Answer | None] = [None] * len(requests)
        for adapter in dict.fromkeys(r.adapter for r in requests):
            indices = [i for i, r in enumerate(requests) if r.adapter == adapter]
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                for i, answer in zip(batch, self.generate([requests[i].messages for i in batch], args, adapter),
                                     strict=True):
                    answers[i] = answer
        return answers
