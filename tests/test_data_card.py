"""The data card: counts on a fixture whose numbers are known, token lengths equal to what TRL trains on, the
train/eval overlap check against brute force, and the data-only command with nothing but a tokenizer."""

import json
import shutil

import pytest
from conftest import REPO_ROOT, SAMPLES, TINY_MODEL

from data import finance, legal, medical
from lora_recipes.data import PreparedData, SourceReport, prepare_data
from lora_recipes.data_card import NEAR_DUPLICATE_JACCARD, NGRAM, normalise, question, token_lengths, write_data_card

SYNTHETIC_NOTE = "(SYNTHETIC fixture)"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def law_question(i: int, answers: list[dict]) -> dict:
    return {"question_id": i, "question_title": f"Question number {i} about leases?",
            "question_body": f"<p>Body of question {i} {SYNTHETIC_NOTE}.</p>", "answers": answers,
            "score": 1, "tags": ["landlord"], "link": "x", "license": "CC BY-SA 4.0"}


def chat(user: str, assistant: str = "An answer.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_counts_on_a_fixture_with_known_numbers(tmp_path, tokenizer, capsys):
    bodies = [f"<p>Answer {i}.{' More detail.' * (80 if i < 3 else 0)}</p>" for i in range(6)]  # three long ones
    answered = [law_question(i, [{"answer_id": i, "body": body, "score": i}]) for i, body in enumerate(bodies)]
    unanswered = [law_question(10, []), law_question(11, [{"answer_id": 1, "body": "<p></p>", "score": 5}])]
    law = tmp_path / "law.jsonl"
    law.write_text("".join(json.dumps(r) + "\n" for r in answered + answered[:2] + unanswered))  # 10 rows
    phrases = tmp_path / "phrases.txt"
    phrases.write_bytes("Profit rose .@positive\nSales fell .@negative\nProfit rose .@positive\n"
                        "Costs were flat .@neutral\nMargins grew .@positive\n".encode("latin-1"))  # 5 rows
    from datasets import concatenate_datasets

    legal_data = prepare_data([str(law)], legal.SCHEMAS, eval_fraction=0.0)
    finance_data = prepare_data([str(phrases)], finance.SCHEMAS, eval_fraction=0.0)
    data = PreparedData(train=concatenate_datasets([legal_data.train, finance_data.train]), eval=None,
                        sources=legal_data.sources + finance_data.sources)
    lengths = sorted(token_lengths(data.train, tokenizer, assistant_only_loss=True)["length"])
    assert lengths[-4] + 100 < lengths[-3]  # three long answers
    max_length = lengths[-4]

    card = write_data_card(tmp_path / "out", data, tokenizer, max_length)

    law_card, phrase_card = card["sources"]
    assert (law_card["read"], law_card["kept"], law_card["dropped"], law_card["duplicates"]) == (
        10, 6, {"no answers": 2}, 2)
    assert (phrase_card["read"], phrase_card["kept"], phrase_card["dropped"], phrase_card["duplicates"]) == (
        5, 4, {}, 1)
    assert card["total"] == {"read": 15, "kept": 10, "dropped": {"no answers": 2}, "duplicates": 3, "train": 10,
                             "eval": 0}
    stats = card["token_lengths"]["train"]
    assert (stats["examples"], stats["min"], stats["max"]) == (10, lengths[0], lengths[-1])
    assert (stats["longer_than_max_length"], stats["share_longer_than_max_length"]) == (3, 0.3)
    assert card["overlap"] is None and "eval" not in card["token_lengths"]
    assert card["warnings"] == [f"3 of 10 train examples (30.0%) are longer than max_length {max_length} and will "
                                "be truncated"]
    assert f"warning: data card: {card['warnings'][0]}" in capsys.readouterr().err

    out = tmp_path / "out"
    assert json.loads((out / "data_card.json").read_text()) == card
    markdown = (out / "data_card.md").read_text()
    assert "| **total** | | 15 | 10 | 2 no answers | 3 | 10 | 0 |" in markdown
    assert "| phrases.txt" not in markdown and f"| {phrases} | phrasebank | 5 | 4 | - | 1 | 4 | 0 |" in markdown
    png = (out / "data_card_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_overlap_finds_exact_and_near_duplicate_questions(tmp_path, tokenizer, capsys):
    from datasets import Dataset

    base = "My landlord in Oregon kept the whole security deposit for ordinary wear and tear after three years. "
    train = [base + "Can I sue in small claims court?", "What is the notice period for eviction in Scotland?",
             "Is an oral promise to sell land enforceable in Texas?", "Who owns a photograph posted online?"]
    evaluation = [
        "what is the NOTICE period for eviction in scotland",  # exact after normalising case and punctuation
        base + "Can I sue in the small claims court?",  # one word added: near-duplicate
        base.replace("Oregon", "Ohio").replace("three", "two") + "Should I write a letter first?",  # related, below
        "Does a dog owner pay for a bite to a visitor?", "Can a minor undo a car purchase?",
    ]
    data = PreparedData(train=Dataset.from_list([chat(q) for q in train]),
                        eval=Dataset.from_list([chat(q) for q in evaluation]),
                        sources=[SourceReport("fixture", "messages", 9, 9, {}, 4, 5)])

    card = write_data_card(tmp_path, data, tokenizer, max_length=512)

    overlap = card["overlap"]
    assert (overlap["eval_examples"], overlap["exact"], overlap["near_duplicate"]) == (5, 1, 1)
    kinds = {pair["kind"]: pair for pair in overlap["examples"]}
    assert kinds["exact"]["eval"] == evaluation[0] and kinds["exact"]["train"] == train[1]
    assert kinds["near-duplicate"]["eval"] == evaluation[1] and kinds["near-duplicate"]["train"] == train[0]
    assert kinds["near-duplicate"]["jaccard"] == round(brute_force_jaccard(evaluation[1], train[0]), 3)
    assert brute_force_jaccard(evaluation[2], train[0]) < NEAR_DUPLICATE_JACCARD  # the related one is not counted
    assert "2 of 5 eval examples repeat a training question (1 exact, 1 near-duplicate" in card["warnings"][0]
    assert "warning: data card: 2 of 5 eval examples repeat a training question" in capsys.readouterr().err


def brute_force_jaccard(a: str, b: str) -> float:
    def grams(text):
        raw = normalise(text).encode()
        return {raw[i:i + NGRAM] for i in range(max(1, len(raw) - NGRAM + 1))}

    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


@pytest.mark.parametrize("domain, folder", [(finance, "finance"), (legal, "legal"), (medical, "medical")])
def test_minhash_finds_every_near_duplicate_that_brute_force_finds(tmp_path, tokenizer, domain, folder):
    sources = sorted(str(p) for p in (SAMPLES / folder).iterdir() if p.suffix in (".jsonl", ".txt"))
    data = prepare_data(sources, domain.SCHEMAS, eval_fraction=0.2, seed=1)
    train = [question(m) for m in data.train["messages"]]
    evaluation = [question(m) for m in data.eval["messages"]]
    normalised_train = {normalise(q) for q in train}
    exact = sum(normalise(q) in normalised_train for q in evaluation)
    near = sum(normalise(q) not in normalised_train and
               max(brute_force_jaccard(q, t) for t in train) >= NEAR_DUPLICATE_JACCARD for q in evaluation)

    overlap = write_data_card(tmp_path, data, tokenizer, max_length=512)["overlap"]
    assert (overlap["exact"], overlap["near_duplicate"]) == (exact, near)


def test_token_lengths_are_what_trl_trains_on(tmp_path):
    from trl import SFTTrainer, get_peft_config

    from lora_recipes.config import parse_args
    from lora_recipes.model import load_model, load_tokenizer

    _, training_args, model_args = parse_args(REPO_ROOT / "recipes/configs/legal_smoke.yaml", [
        "--output_dir", str(tmp_path), "--max_length", "300", "--eval_strategy", "no"])
    tokenizer = load_tokenizer(model_args, training_args)
    data = prepare_data([str(SAMPLES / "legal" / name) for name in ("law_stackexchange.jsonl", "case_hold.jsonl")],
                        legal.SCHEMAS, eval_fraction=0.0)
    card = write_data_card(tmp_path, data, tokenizer, max_length=300)
    trainer = SFTTrainer(model=load_model(model_args, training_args), args=training_args, train_dataset=data.train,
                         processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trained = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    measured = token_lengths(data.train, tokenizer, assistant_only_loss=True)
    expected = sorted(min(length, 300) for length, first in zip(measured["length"], measured["first_target"],
                                                                  strict=True) if first < 300)
    assert trained == expected
    stats = card["token_lengths"]["train"]
    assert stats["longer_than_max_length"] == sum(length > 300 for length in measured["length"]) > 0
    assert stats["no_target_within_max_length"] == len(data.train) - len(trained) > 0  # TRL dropped exactly these


def test_no_answer_within_max_length_follows_the_truncation_side(tmp_path, tokenizer):
    """keep_start keeps the first max_length tokens, keep_end the last (TRL's slices); the count of rows left without
    an answer token is the count of masks with no 1 in the slice the run keeps."""
    from datasets import Dataset

    long = " ".join(f"detail {i} of the facts." for i in range(120))
    answer_last = [chat(f"{long} Question {i}?", "The short answer.") for i in range(2)]  # cut by keep_start only
    answer_first = {"messages": [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Yes."},
                                 {"role": "user", "content": long}]}  # cut by keep_end only
    data = PreparedData(train=Dataset.from_list(answer_last + [answer_first]), eval=None,
                        sources=[SourceReport("fixture", "messages", 3, 3, {}, 3, 0)])
    masks = tokenizer.apply_chat_template(list(data.train["messages"]), tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)["assistant_masks"]
    max_length = 100
    assert min(len(mask) for mask in masks) > 2 * max_length

    for keep_end, kept in ((False, slice(None, max_length)), (True, slice(-max_length, None))):
        card = write_data_card(tmp_path / str(keep_end), data, tokenizer, max_length, keep_end=keep_end)
        expected = sum(1 not in mask[kept] for mask in masks)
        assert card["token_lengths"]["train"]["no_target_within_max_length"] == expected
        assert card["truncation_mode"] == ("keep_end" if keep_end else "keep_start")
        assert expected == (1 if keep_end else 2)


def test_the_card_says_when_a_group_was_moved_to_give_each_side_one(tmp_path, tokenizer):
    rows = [{"question": f"What was revenue in quarter {q}?", "answer": "$5 million.", "context": "Revenue rose.",
             "ticker": ticker, "filing": "2023_10K"} for ticker in ("AAA", "BBB", "CCC", "DDD") for q in range(10)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    moved = next(data for seed in range(20)
                 if (data := prepare_data([str(path)], finance.SCHEMAS, eval_fraction=0.1, seed=seed)).sources[0]
                 .split_note)

    card = write_data_card(tmp_path / "out", moved, tokenizer, max_length=512)

    source = card["sources"][0]
    assert (source["groups"], source["eval_groups"], source["eval"]) == (4, 1, 10)
    assert f"{path}: split by group, 1 of 4 groups in eval ({source['split_note']})" in card["warnings"]


def test_data_card_only_needs_just_the_tokenizer(tmp_path):
    from lora_recipes.config import parse_args
    from lora_recipes.sft import main

    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL / name, tokenizer_only / name)
    out = tmp_path / "card"
    args = parse_args(REPO_ROOT / "recipes/configs/finance_smoke.yaml", [
        "--data_card_only", "true", "--model_name_or_path", str(tokenizer_only), "--output_dir", str(out)])

    assert main(finance, *args) is None  # stopped after the card: no model folder to load, no trainer
    assert sorted(p.name for p in out.iterdir()) == ["data_card.json", "data_card.md", "data_card_lengths.png"]
    card = json.loads((out / "data_card.json").read_text())
    assert card["tokenizer"] == str(tokenizer_only)
    by_schema = {source["schema"]: source for source in card["sources"]}
    assert by_schema["fingpt_sentiment"]["duplicates"] > by_schema["fingpt_sentiment"]["kept"]
    assert by_schema["financial_qa"]["dropped"] == {"empty question or answer": 1}
    assert card["total"]["train"] + card["total"]["eval"] == card["total"]["kept"]
