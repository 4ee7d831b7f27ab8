"""Medical sources -> chat messages.

One pure function per source schema; loading, validation, deduplication and the split live in
`lora_recipes/data.py`. Evaluation-only sets (MedQA test, MedMCQA validation, PubMedQA pqa_labeled) are never
trained on: a training source reads the Hub's train split unless it names another (`ID@SPLIT`), and the sets listed
in EVAL_ONLY are refused (an entry without @SPLIT: every split). EVAL_SETS are what `recipes/evaluate.py` and the end
of training compare the base model and the adapter on, and the split an eval source naming one of them reads.
"""

from lora_recipes.convert import MESSAGES, chat, multiple_choice
from lora_recipes.data import DropRow, FieldError, Schema
from lora_recipes.evaluation import EvalSet
from lora_recipes.text import clean_text

SYSTEM_PROMPT = (
    "You are a careful medical assistant. Answer accurately and concisely. Your answers are for education and "
    "are not a substitute for professional medical advice."
)
EVAL_ONLY = ("qiaojin/PubMedQA:pqa_labeled",)
EVAL_SETS = [
    EvalSet("medqa", "GBaker/MedQA-USMLE-4-options", "test"),  # 1,273 USMLE questions, 4 options
    EvalSet("medmcqa", "openlifescienceai/medmcqa", "validation"),  # 4,183 questions (the test split has no labels)
    # 1,000 expert-labelled abstracts; `train` is the set's only split, and EVAL_ONLY keeps it out of training
    EvalSet("pubmedqa", "qiaojin/PubMedQA:pqa_labeled", "train"),
]
LETTERS = "ABCD"


def medqa_to_messages(example: dict) -> dict:
    """GBaker/MedQA-USMLE-4-options: question, options {A..D}, answer_idx letter, answer (option text)."""
    options = {letter: example["options"][letter] for letter in sorted(example["options"])}
    if not options or not all(isinstance(v, str) for v in options.values()):
        raise FieldError("options", "expected a mapping of letters to option texts")
    letter = example["answer_idx"].strip()
    if letter not in options:
        raise FieldError("answer_idx", f"'{letter}' is not one of the options {', '.join(options)}")
    answer = f"{letter}. {clean_text(options[letter])}"
    return chat(SYSTEM_PROMPT, multiple_choice(example["question"], options), answer)


def medmcqa_to_messages(example: dict) -> dict:
    """openlifescienceai/medmcqa: question, opa..opd, cop 0-3 (-1 = unlabelled), exp (may be '' or 'None')."""
    if example["cop"] == -1:
        raise DropRow("unlabelled (cop = -1)")
    if not 0 <= example["cop"] <= 3:
        raise FieldError("cop", f"expected 0-3 (or -1 for unlabelled), got {example['cop']}")
    options = dict(zip(LETTERS, (example["opa"], example["opb"], example["opc"], example["opd"]), strict=True))
    letter = LETTERS[example["cop"]]
    answer = f"{letter}. {clean_text(options[letter])}"
    explanation = clean_text(example.get("exp") or "")
    if explanation and explanation != "None":
        answer += f"\n\nExplanation: {explanation}"
    return chat(SYSTEM_PROMPT, multiple_choice(example["question"], options), answer)


def pubmedqa_to_messages(example: dict) -> dict:
    """qiaojin/PubMedQA (pqa_artificial): question, context {contexts, ...}, long_answer, final_decision."""
    decision = example["final_decision"].strip().lower()
    if decision not in ("yes", "no", "maybe"):
        raise FieldError("final_decision", f"expected yes, no or maybe, got '{example['final_decision']}'")
    contexts = example["context"].get("contexts")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise FieldError("context.contexts", "expected a list of strings")
    abstract = "\n".join(clean_text(c) for c in contexts)
    user = f"Context:\n{abstract}\n\nQuestion: {clean_text(example['question'])}\nAnswer yes, no or maybe."
    return chat(SYSTEM_PROMPT, user, f"{decision.capitalize()}. {clean_text(example['long_answer'])}")


def flashcards_to_messages(example: dict) -> dict:
    """medalpaca/medical_meadow_medical_flashcards: input (question), output (answer); instruction is constant."""
    question, answer = clean_text(example["input"]), clean_text(example["output"])
    if not question or not answer:
        raise DropRow("empty question or answer")
    return chat(SYSTEM_PROMPT, question, answer)


SCHEMAS = [
    Schema("medqa", {"question": str, "options": dict, "answer_idx": str}, medqa_to_messages,
           task="multiple_choice"),
    Schema("medmcqa", {"question": str, "opa": str, "opb": str, "opc": str, "opd": str, "cop": int,
                       "exp": (str, type(None))}, medmcqa_to_messages, task="multiple_choice"),
    Schema("pubmedqa", {"question": str, "context": dict, "long_answer": str, "final_decision": str},
           pubmedqa_to_messages, task=("Yes", "No", "Maybe")),
    # open even when an answer starts with Yes or No ("No, because of Reye syndrome.")
    Schema("flashcards", {"input": str, "output": str}, flashcards_to_messages, task="open"),
    MESSAGES,
]
