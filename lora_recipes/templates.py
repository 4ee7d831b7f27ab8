"""Chat templates for training: the end-of-turn token, and where the assistant turns are.

The loss covers the assistant turns only (`assistant_only_loss`), which TRL finds through the template's
`{% generation %}` markers. Templates that have none get them here: from TRL's training variants, from the bundled
ChatML template, or derived from the template itself (`lora_recipes/chat_templates/assistant_spans.jinja`).
"""

from pathlib import Path

CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
ASSISTANT_SPANS_TEMPLATE = CHAT_TEMPLATES / "assistant_spans.jinja"

# A conversation with every role, the assistant turn followed by another turn: some templates end an assistant turn
# only when a turn follows it.
PROBE = [
    {"role": "system", "content": "Probe system prompt."},
    {"role": "user", "content": "Probe question?"},
    {"role": "assistant", "content": "Probe answer."},
    {"role": "user", "content": "Probe follow-up?"},
]


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has_generation_markers

    return trl_has_generation_markers(template)


def derive_assistant_spans(template: str) -> str:
    """`template` wrapped so that `{% generation %}` marks each assistant turn as the template itself renders it."""
    return ASSISTANT_SPANS_TEMPLATE.read_text(encoding="utf-8").replace("MODEL_TEMPLATE", template, 1)


def assistant_mask(tokenizer, messages: list[dict], chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, assistant mask) of `messages`, as SFTTrainer computes them with `assistant_only_loss`."""
    template = chat_template or tokenizer.chat_template
    if not has_generation_markers(template):
        template = derive_assistant_spans(template)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=template)
    return out["input_ids"], out["assistant_masks"]


def end_of_turn_token_id(tokenizer, chat_template: str | None = None) -> int:
    """The token an assistant turn ends with: the last non-blank token of the assistant mask of a probe chat.

    Often not `eos_token`: `<|im_end|>` for ChatML (eos `<|endoftext|>`), `<|eot_id|>` for Llama 3, `<|end|>` for
    Phi-3, `<end_of_turn>` for Gemma, `</s>` for Mistral.
    """
    ids, mask = assistant_mask(tokenizer, PROBE, chat_template)
    masked = [token_id for token_id, keep in zip(ids, mask, strict=True) if keep]
    for token_id in reversed(masked):
        if tokenizer.decode([token_id]).strip():
            return token_id
    raise ValueError("the chat template's assistant mask is empty")


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> str:
    """The end-of-turn token as text (see `end_of_turn_token_id`)."""
    return tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer, chat_template))
