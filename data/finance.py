"""Finance sources -> chat messages.

Sentiment of financial news and tweets (FinGPT's training mix, and the Financial PhraseBank from its raw text
files) and questions answered from 10-K passages (`virattt/financial-qa-10K`), whose eval split is held out by
ticker so that no company is on both sides (and each side has one). None of these has a public held-out split the
recipe could refuse, so EVAL_ONLY is empty: the held-out split of each run is what it evaluates on.
"""

from lora_recipes.convert import MESSAGES, chat
from lora_recipes.data import DropRow, FieldError, Schema
from lora_recipes.text import clean_text

SYSTEM_PROMPT = (
    "You are a financial analysis assistant. Answer from the text you are given, precisely and with the figures it "
    "states; say so when it does not contain the answer. This is not investment advice."
)
EVAL_ONLY = ()
# No standard finance set loads from the Hub with current `datasets`: the held-out split is scored, sentiment as a
# classification over these labels (the sentiment schemas' task)
SENTIMENTS = ("negative", "neutral", "positive")  # also the order of the Hub phrasebank's class ids 0, 1, 2
# One instruction for every sentiment source: FinGPT's own instructions list seven graded classes on some rows, which
# the normalised label no longer matches, and a shared prompt lets the same sentence deduplicate across sources.
SENTIMENT_QUESTION = "What is the sentiment of this financial text? Answer negative, neutral or positive."
# FinGPT's graded labels (its NWGI news subset), mapped as FinGPT's own NWGI benchmark maps them: strong and
# moderate grades keep their polarity, mild ones count as neutral.
GRADE_KEEPS_POLARITY = {"strong": True, "strongly": True, "moderately": True, "mildly": False}


def normalise_sentiment(label: str, field_name: str) -> str:
    """negative, neutral or positive from a plain or graded label ('Moderately negative' -> 'negative')."""
    words = label.strip().lower().split()
    if len(words) == 1 and words[0] in SENTIMENTS:
        return words[0]
    if len(words) == 2 and words[0] in GRADE_KEEPS_POLARITY and words[1] in ("negative", "positive"):
        return words[1] if GRADE_KEEPS_POLARITY[words[0]] else "neutral"
    raise FieldError(field_name, f"unknown sentiment '{label}' (expected negative, neutral or positive, optionally "
                                 f"graded: {', '.join(GRADE_KEEPS_POLARITY)})")


def _sentiment(text: str, label: str) -> dict:
    text = clean_text(text)
    if not text:
        raise DropRow("empty text")
    return chat(SYSTEM_PROMPT, f"{SENTIMENT_QUESTION}\n\n{text}", label)


def fingpt_sentiment_to_messages(example: dict) -> dict:
    """FinGPT/fingpt-sentiment-train: input (text), output (label, some graded), instruction (replaced, see above).
    The set repeats its sources several times over; the shared deduplication removes and counts the copies."""
    return _sentiment(example["input"], normalise_sentiment(example["output"], "output"))


def phrasebank_to_messages(example: dict) -> dict:
    """takala/financial_phrasebank: sentence, label (a word in the raw `sentence@label` files, 0-2 in Hub exports)."""
    label = example["label"]
    if isinstance(label, int):
        if not 0 <= label < len(SENTIMENTS):
            raise FieldError("label", f"expected 0-{len(SENTIMENTS) - 1}, got {label}")
        label = SENTIMENTS[label]
    return _sentiment(example["sentence"], normalise_sentiment(label, "label"))


def financial_qa_to_messages(example: dict) -> dict:
    """virattt/financial-qa-10K: question, answer, context (a 10-K passage), ticker, filing."""
    question, answer = clean_text(example["question"]), clean_text(example["answer"])
    if not question or not answer:
        raise DropRow("empty question or answer")
    source = f"{example['ticker'].strip()} {example['filing'].strip()} filing"
    user = f"From the {source}:\n{clean_text(example['context'])}\n\nQuestion: {question}"
    return chat(SYSTEM_PROMPT, user, answer)


def ticker(example: dict) -> str:
    """The split key of financial-qa-10K: all of a company's questions land on the same side of the split."""
    return example["ticker"].strip().upper()


SCHEMAS = [
    Schema("fingpt_sentiment", {"input": str, "output": str, "instruction": str}, fingpt_sentiment_to_messages,
           task=SENTIMENTS),
    Schema("phrasebank", {"sentence": str, "label": (str, int)}, phrasebank_to_messages, task=SENTIMENTS),
    Schema("financial_qa", {"question": str, "answer": str, "context": str, "ticker": str, "filing": str},
           financial_qa_to_messages, split_key=ticker, task="open"),
    MESSAGES,
]
