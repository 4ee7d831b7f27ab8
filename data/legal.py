"""Legal sources -> chat messages.

CaseHOLD (`coastalcph/lex_glue:case_hold`) teaches the model to pick the holding a court cited; Law Stack Exchange
(`ymoslem/Law-StackExchange`) teaches it to answer people's legal questions in prose. A training source reads the
Hub's train split unless it names another; CaseHOLD's validation and test splits are listed in EVAL_ONLY and refused
as training sources.
CaseHOLD is plain text; Law Stack Exchange bodies are HTML (`html_to_text`).
"""

from lora_recipes.convert import MESSAGES, chat, multiple_choice
from lora_recipes.data import DropRow, FieldError, Schema
from lora_recipes.evaluation import EvalSet
from lora_recipes.text import clean_text, html_to_text

SYSTEM_PROMPT = (
    "You are a legal research assistant. Explain the law clearly and cite the rule you rely on. This is general "
    "legal information, not legal advice: the answer depends on the jurisdiction and the facts, so for a decision "
    "that matters, consult a lawyer licensed where you are."
)
EVAL_ONLY = ("coastalcph/lex_glue:case_hold@validation", "coastalcph/lex_glue:case_hold@test")
EVAL_SETS = [EvalSet("case_hold", "coastalcph/lex_glue:case_hold", "test")]  # 3,600 holdings, 5 options each
HOLDING = "(<HOLDING>)"
BLANK = "[HOLDING]"  # how the prompt shows the placeholder, and its question names it
LETTERS = "ABCDE"


def case_hold_to_messages(example: dict) -> dict:
    """coastalcph/lex_glue case_hold: context with a (<HOLDING>) placeholder, 5 candidate endings, label 0-4."""
    context, endings, label = example["context"], example["endings"], example["label"]
    if HOLDING not in context:
        raise FieldError("context", f"no {HOLDING} placeholder to fill")
    if len(endings) != len(LETTERS) or not all(isinstance(e, str) for e in endings):
        raise FieldError("endings", f"expected {len(LETTERS)} strings, got {len(endings)} items")
    if not 0 <= label < len(LETTERS):
        raise FieldError("label", f"expected 0-{len(LETTERS) - 1}, got {label}")
    question = f"{context.replace(HOLDING, BLANK)}\n\nWhich holding belongs where the citing text says {BLANK}?"
    letter = LETTERS[label]
    return chat(SYSTEM_PROMPT, multiple_choice(question, dict(zip(LETTERS, endings, strict=True))),
                f"{letter}. {clean_text(endings[label])}")


def _answer_text(answer, index: int) -> tuple[int, str]:
    """(score, clean body) of one Law Stack Exchange answer, validated."""
    if not isinstance(answer, dict) or not isinstance(answer.get("body"), str):
        raise FieldError(f"answers[{index}].body", "expected a string")
    score = answer.get("score")
    if not isinstance(score, int) or isinstance(score, bool):
        raise FieldError(f"answers[{index}].score", "expected an integer")
    return score, html_to_text(answer["body"])


def law_stackexchange_to_messages(example: dict) -> dict:
    """ymoslem/Law-StackExchange: question title (text), HTML question body and answers [{answer_id, body, score}];
    the top-scored answer is the target (the first of equal scores), and a question with no answer to learn from is
    dropped."""
    answers = [_answer_text(answer, i) for i, answer in enumerate(example["answers"])]
    answers = [(score, body) for score, body in answers if body]
    if not answers:
        raise DropRow("no answers")
    question = "\n\n".join(part for part in (clean_text(example["question_title"]),
                                             html_to_text(example["question_body"])) if part)
    if not question:
        raise DropRow("empty question")
    tags = example.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise FieldError("tags", "expected a list of strings")
    if tags:  # the tags often name the jurisdiction, which the answer depends on
        question += f"\n\nTags: {', '.join(tags)}"
    return chat(SYSTEM_PROMPT, question, max(answers, key=lambda answer: answer[0])[1])


SCHEMAS = [
    Schema("case_hold", {"context": str, "endings": list, "label": int}, case_hold_to_messages,
           task="multiple_choice"),
    Schema("law_stackexchange", {"question_title": str, "question_body": str, "answers": list},
           law_stackexchange_to_messages, task="open"),
    MESSAGES,
]
