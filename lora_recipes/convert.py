"""Building blocks for the converters in `data/<domain>.py`: one chat example, a lettered multiple-choice prompt,
and the `messages` schema every domain accepts as is."""

from .data import Schema
from .text import clean_text


def chat(system: str, user: str, assistant: str) -> dict:
    """One training example: the domain's system prompt, one question, one answer."""
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]}


def multiple_choice(question: str, options: dict[str, str]) -> str:
    """The question, then one `A. text` line per option, then the instruction to answer with a letter."""
    lines = [clean_text(question), ""] + [f"{letter}. {clean_text(text)}" for letter, text in options.items()]
    return "\n".join(lines + ["", "Answer with the letter of the correct option."])


def messages_to_messages(example: dict) -> dict:
    """Data already in chat form: a `messages` list of {role, content}."""
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in example["messages"]]}


MESSAGES = Schema("messages", {"messages": list}, messages_to_messages)
