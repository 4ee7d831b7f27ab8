"""Chat templates for training: where the assistant turns are, the token they end with, and the system prompt.

The loss covers the assistant turns only (`assistant_only_loss`), which TRL finds through the template's
`{% generation %}` markers. A template without them gets them, in this order: TRL's training variant of the same
template, the bundled ChatML template when the model's renders exactly like it, or markers derived from the template
itself (`chat_templates/assistant_spans.jinja`). A template without a system role gets the system prompt folded into
the first user turn (`chat_templates/fold_system.jinja`). The result is the tokenizer's template, saved with the
adapter, so training, evaluation and chat all render the same conversations the same way.
"""

import json
from pathlib import Path

from .errors import RecipeError

CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
CHATML_TEMPLATE = CHAT_TEMPLATES / "chatml.jinja"
ASSISTANT_SPANS_TEMPLATE = CHAT_TEMPLATES / "assistant_spans.jinja"
FOLD_SYSTEM_TEMPLATE = CHAT_TEMPLATES / "fold_system.jinja"
DEFAULT_SYSTEM_TEMPLATE = CHAT_TEMPLATES / "default_system.jinja"
CHATML_SYSTEM = ("<|im_start|>system\n", "<|im_end|>\n")

SYSTEM, USER, ANSWER = "Probe system prompt.", "Probe question?", "Probe answer."
# A conversation with every role, the assistant turn followed by another turn: some templates end an assistant turn
# only when a turn follows it.
PROBE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": "Probe follow-up?"},
]
# Conversations a template must render the same way as another to count as it, and be split into turns on
TWO_EXCHANGES = [*PROBE, {"role": "assistant", "content": "Second probe answer."}]
PROBES = (PROBE[:3], PROBE, TWO_EXCHANGES, PROBE[1:3], TWO_EXCHANGES[1:])
FIX = ("pass --chat_template_path FILE.jinja with {% generation %} markers around the assistant turns and their "
       "end-of-turn token (see lora_recipes/chat_templates/chatml.jinja), or set assistant_only_loss false")


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has_generation_markers

    return trl_has_generation_markers(template)


def derive_assistant_spans(template: str) -> str:
    """`template` wrapped so that `{% generation %}` marks each assistant turn as the template itself renders it."""
    return ASSISTANT_SPANS_TEMPLATE.read_text(encoding="utf-8").replace("MODEL_TEMPLATE", template, 1)


def fold_system_prompt(template: str) -> str:
    """`template` behind a prelude that moves the system prompt into the first user turn."""
    return FOLD_SYSTEM_TEMPLATE.read_text(encoding="utf-8") + template


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)


def keeps_system_prompt(tokenizer, template: str) -> bool:
    """Whether `template` writes the system prompt into a prompt and into a conversation that ends with an answer."""
    from jinja2 import TemplateError

    try:
        return all(SYSTEM in _render(tokenizer, template, PROBE[:n], add_generation_prompt=n == 2) for n in (2, 3))
    except TemplateError:
        return False


def chatml_template(tokenizer, template: str) -> str | None:
    """The bundled ChatML training template (with the model's default system prompt, if it writes one) when it
    renders every probe exactly as `template` does; None for any other template."""
    from jinja2 import TemplateError

    try:
        without_system = _render(tokenizer, template, PROBE[1:2], add_generation_prompt=True)
    except TemplateError:
        return None
    chatml = CHATML_TEMPLATE.read_text(encoding="utf-8")
    opening, closing = CHATML_SYSTEM
    if without_system.startswith(opening) and closing in without_system:
        default = without_system[len(opening):without_system.index(closing)]
        # a JSON string is a valid Jinja string literal
        prelude = DEFAULT_SYSTEM_TEMPLATE.read_text(encoding="utf-8").replace("DEFAULT_SYSTEM_PROMPT",
                                                                               json.dumps(default))
        chatml = prelude + chatml
    try:
        same = all(_render(tokenizer, template, chat, gen) == _render(tokenizer, chatml, chat, gen)
                   for chat in (*PROBES, PROBE[1:2]) for gen in (False, True))
    except TemplateError:
        return None
    return chatml if same else None


def training_chat_template(tokenizer, name: str, assistant_only_loss: bool,
                           template: str | None = None) -> tuple[str, list[str]]:
    """(the template to train with, one line per change made to the model's template, by default the tokenizer's).

    Raises RecipeError when the template cannot mark the assistant turns and their end-of-turn token.
    """
    from trl.chat_template_utils import get_training_chat_template

    template = template or tokenizer.chat_template
    notes = []
    fold = not keeps_system_prompt(tokenizer, template)
    if assistant_only_loss and not has_generation_markers(template):
        chatml = None
        try:
            # TRL recognises a template by its exact text
            marked = get_training_chat_template(_with_template(tokenizer, template))
        except ValueError:
            marked = chatml = chatml_template(tokenizer, template)
        if chatml is not None:
            default = "the model's default system prompt kept" if chatml != CHATML_TEMPLATE.read_text(
                encoding="utf-8") else "the model writes no default system prompt either"
            notes.append(f"the chat template of '{name}' is ChatML without {{% generation %}} markers: training with "
                         f"lora_recipes/chat_templates/chatml.jinja ({default})")
        elif marked is None:
            marked = derive_assistant_spans(template)
            notes.append(f"the chat template of '{name}' has no {{% generation %}} markers and TRL has no training "
                         "variant of it: the assistant turns are derived from the template itself "
                         "(lora_recipes/chat_templates/assistant_spans.jinja)")
        template = marked
    if fold:
        template = fold_system_prompt(template)
        notes.append(f"the chat template of '{name}' has no system role (or drops the system prompt): the system "
                     "prompt is folded into the first user turn")
    if assistant_only_loss:
        check_assistant_mask(tokenizer, template, name)
    return template, notes


def _with_template(tokenizer, template: str):
    if template == tokenizer.chat_template:
        return tokenizer
    from copy import copy

    other = copy(tokenizer)
    other.chat_template = template
    return other


def check_assistant_mask(tokenizer, template: str, name: str) -> None:
    """Refuse, in one line, a training template whose mask misses the assistant turns or their end-of-turn token."""
    from jinja2 import TemplateError
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    for chat in PROBES:
        try:
            ids, mask = assistant_mask(tokenizer, chat, template)
        except TemplateError as e:
            raise RecipeError(f"the chat template of '{name}' cannot be split into turns ({e}): {FIX}") from None
        turn = tokenizer.decode([i for i, keep in zip(ids, mask, strict=True) if keep])
        if ANSWER not in turn or USER in turn:
            raise RecipeError(f"the assistant mask of the chat template of '{name}' is not exactly the assistant "
                              f"turns (masked: {turn[:80]!r}): {FIX}")
    if not is_chat_template_stop_token_trained(tokenizer, template):
        raise RecipeError(f"the chat template of '{name}' leaves the end-of-turn token out of the assistant mask "
                          f"(no special token ends an assistant turn), so the model would never learn to stop: {FIX}")


def assistant_mask(tokenizer, messages: list[dict], chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, assistant mask) of `messages`, as SFTTrainer computes them with `assistant_only_loss`; a template
    without markers is split into turns by `derive_assistant_spans`."""
    template = chat_template or tokenizer.chat_template
    if not has_generation_markers(template):
        template = derive_assistant_spans(template)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=template)
    return out["input_ids"], out["assistant_masks"]


def end_of_turn_token_id(tokenizer, chat_template: str | None = None) -> int:
    """The token an assistant turn ends with: the last non-blank token of the assistant mask of a probe chat.

    Often not `eos_token`: `<|im_end|>` for ChatML (eos `<|endoftext|>`), `<|eot_id|>` for Llama 3, `<|end|>` for
    Phi-3, `<end_of_turn>` for Gemma, `</s>` for Mistral. A template without markers is read as it trains.
    """
    template = chat_template or tokenizer.chat_template
    if not has_generation_markers(template):
        template, _ = training_chat_template(tokenizer, "the tokenizer", True, template)
    elif not keeps_system_prompt(tokenizer, template):
        template = fold_system_prompt(template)
    ids, mask = assistant_mask(tokenizer, PROBE, template)
    for token_id in reversed([token_id for token_id, keep in zip(ids, mask, strict=True) if keep]):
        if tokenizer.decode([token_id]).strip():
            return token_id
    raise RecipeError("the chat template's assistant mask is empty: it has no assistant turns to end")


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> str:
    """The end-of-turn token as text (see `end_of_turn_token_id`)."""
    return tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer, chat_template))
