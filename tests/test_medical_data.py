"""Medical converters and the shared data pipeline: schemas, edge cases, validation errors, dedup, split."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES

from data import medical
from lora_recipes.data import DropRow, FieldError, prepare_data
from lora_recipes.data_card import normalise, overlap, question
from lora_recipes.errors import RecipeError

MEDQA = {
    "question": "A 30-year-old woman has   fatigue.\tWhat is the treatment?",
    "answer": "iron",
    "options": {"D": "zinc", "B": "iron", "A": "rest", "C": "salt"},
    "meta_info": "step1",
    "answer_idx": "B",
    "metamap_phrases": ["fatigue"],
}
MEDMCQA = {
    "id": "x1", "question": "Which test?", "opa": "ECG", "opb": "CT", "opc": "MRI", "opd": "PET", "cop": 2,
    "choice_type": "single", "exp": "MRI is best   & safest.\n\n\n\nSee notes.", "subject_name": "Radiology",
    "topic_name": None,
}
PUBMEDQA = {
    "pubid": 1, "question": "Does X help?",
    "context": {"contexts": ["  Background. ", "Methods."], "labels": ["B", "M"], "meshes": ["X"]},
    "long_answer": "X helped.", "final_decision": "yes",
}
FLASHCARD = {"input": "What is X?", "output": "X is Y.", "instruction": "Answer this question truthfully"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def roles_and_text(example):
    return [(m["role"], m["content"]) for m in example["messages"]]


def test_medqa_options_sorted_and_answer_is_letter_plus_text():
    messages = medical.medqa_to_messages(MEDQA)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    user = messages[1]["content"]
    assert user.index("A. rest") < user.index("B. iron") < user.index("C. salt") < user.index("D. zinc")
    assert user.startswith("A 30-year-old woman has fatigue. What is the treatment?\n")
    assert messages[2]["content"] == "B. iron"


def test_medqa_answer_not_in_options_names_field():
    with pytest.raises(FieldError, match="answer_idx"):
        medical.medqa_to_messages({**MEDQA, "answer_idx": "E"})


@pytest.mark.parametrize("exp", ["", "None", None])
def test_medmcqa_empty_explanations_are_left_out(exp):
    answer = medical.medmcqa_to_messages({**MEDMCQA, "exp": exp})["messages"][2]["content"]
    assert answer == "C. MRI"


def test_medmcqa_explanation_whitespace_is_tidied():
    answer = medical.medmcqa_to_messages(MEDMCQA)["messages"][2]["content"]
    assert answer == "C. MRI\n\nExplanation: MRI is best & safest.\n\nSee notes."


def test_medmcqa_unlabelled_rows_are_dropped_with_reason():
    with pytest.raises(DropRow, match="cop = -1"):
        medical.medmcqa_to_messages({**MEDMCQA, "cop": -1})
    with pytest.raises(FieldError, match="cop"):
        medical.medmcqa_to_messages({**MEDMCQA, "cop": 4})


def test_pubmedqa_context_and_decision():
    messages = medical.pubmedqa_to_messages(PUBMEDQA)["messages"]
    assert messages[1]["content"].startswith("Context:\nBackground.\nMethods.\n\nQuestion: Does X help?")
    assert messages[2]["content"] == "Yes. X helped."
    with pytest.raises(FieldError, match="final_decision"):
        medical.pubmedqa_to_messages({**PUBMEDQA, "final_decision": "perhaps"})


def test_flashcards_ignore_instruction_and_drop_empty():
    assert roles_and_text(medical.flashcards_to_messages(FLASHCARD))[1:] == [
        ("user", "What is X?"), ("assistant", "X is Y.")]
    with pytest.raises(DropRow):
        medical.flashcards_to_messages({**FLASHCARD, "output": "  "})


def test_sample_files_cover_every_source_schema_and_report_counts():
    sources = sorted(str(p) for p in (SAMPLES / "medical").glob("*.jsonl"))
    data = prepare_data(sources, medical.SCHEMAS, eval_fraction=0.1, seed=42)
    by_schema = {s.schema: s for s in data.sources}
    assert set(by_schema) == {"medqa", "medmcqa", "pubmedqa", "flashcards"}
    raw_medmcqa = [json.loads(line) for line in (SAMPLES / "medical" / "medmcqa.jsonl").open()]
    assert by_schema["medmcqa"].dropped["unlabelled (cop = -1)"] == sum(r["cop"] == -1 for r in raw_medmcqa)
    for report in data.sources:  # nothing disappears without a reason
        assert report.read == report.kept + sum(report.dropped.values())
        assert report.kept == report.train + report.eval
    assert len(data.train) + len(data.eval) == sum(s.kept for s in data.sources)


def test_dedup_is_on_content_not_instruction(tmp_path):
    rows = [FLASHCARD, {**FLASHCARD, "instruction": "something else"}, {**FLASHCARD, "input": "what  is x?"},
            {**FLASHCARD, "input": "Another question?"}]
    data = prepare_data([str(write_jsonl(tmp_path / "f.jsonl", rows))], medical.SCHEMAS, eval_fraction=0.0)
    assert data.sources[0].dropped == {"duplicate": 2}
    assert len(data.train) == 2


def test_split_is_deterministic_seeded_and_order_independent(tmp_path):
    rows = [{"input": f"Question {i}?", "output": f"Answer {i}."} for i in range(200)]
    forward = write_jsonl(tmp_path / "a.jsonl", rows)
    backward = write_jsonl(tmp_path / "b.jsonl", rows[::-1])

    def eval_questions(path, seed):
        data = prepare_data([str(path)], medical.SCHEMAS, eval_fraction=0.2, seed=seed)
        return {m["messages"][1]["content"] for m in data.eval}

    first = eval_questions(forward, 42)
    assert first == eval_questions(forward, 42) == eval_questions(backward, 42)
    assert first != eval_questions(forward, 7)
    assert 20 <= len(first) <= 60  # about 20% of 200


def medmcqa_asked_twice(questions: int) -> list[dict]:
    """MedMCQA as it is: each question twice, with a different explanation (so both copies are kept)."""
    return [{**MEDMCQA, "id": f"q{i}-{copy}", "question": f"Which test confirms condition number {i}?",
             "exp": f"Explanation {copy} of question {i}."} for i in range(questions) for copy in range(2)]


def test_a_question_asked_twice_with_other_answers_never_straddles_the_split(tmp_path):
    path = write_jsonl(tmp_path / "medmcqa.jsonl", medmcqa_asked_twice(200))
    data = prepare_data([str(path)], medical.SCHEMAS, eval_fraction=0.2, seed=42)

    assert data.sources[0].kept == 400 and 40 <= len(data.eval) <= 120  # both copies kept, about 20% held out
    train_questions = [question(m) for m in data.train["messages"]]
    eval_questions = [question(m) for m in data.eval["messages"]]
    in_train = {normalise(q) for q in train_questions}
    assert sum(normalise(q) in in_train for q in eval_questions) == 0
    assert overlap(train_questions, eval_questions)["exact"] == 0  # the data card's count


def test_a_training_row_that_asks_an_eval_question_is_dropped(tmp_path):
    asked = medmcqa_asked_twice(35)
    held_out = write_jsonl(tmp_path / "eval.jsonl", asked[0:60:2])
    train = write_jsonl(tmp_path / "train.jsonl", asked[1::2])  # the same 30 questions, other explanations, and 5 more

    data = prepare_data([str(train)], medical.SCHEMAS, eval_sources=[str(held_out)])

    assert data.sources[1].dropped == {"in the eval set": 30}
    assert [question(m) for m in data.train["messages"]] == [medical.medmcqa_to_messages(row)["messages"][1]["content"]
                                                            for row in asked[61::2]]
    assert len(data.eval) == 30


def test_plain_text_sources_keep_angle_brackets_and_ampersands():
    text = "If serum Na<130 and K>5.5 &amp; the patient is drowsy, which test first?"
    user = medical.medqa_to_messages({**MEDQA, "question": text})["messages"][1]["content"]
    assert user.startswith(text + "\n")


def test_all_local_formats_load_the_same_rows(tmp_path):
    rows = [{"input": f"Q{i}?", "output": f"A{i}."} for i in range(5)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "rows.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.csv", "rows.parquet"):
        data = prepare_data([str(tmp_path / name)], medical.SCHEMAS, eval_fraction=0.0)
        assert len(data.train) == 5, name
    folder = prepare_data([str(tmp_path)], medical.SCHEMAS, eval_fraction=0.0)
    assert folder.sources[0].read == 15 and folder.sources[0].dropped == {"duplicate": 10}


def test_messages_schema_passes_through(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    data = prepare_data([str(write_jsonl(tmp_path / "c.jsonl", [chat]))], medical.SCHEMAS, eval_fraction=0.0)
    assert data.train[0]["messages"] == chat["messages"]


@pytest.mark.parametrize("rows, expected", [
    ([MEDQA, {k: v for k, v in MEDQA.items() if k != "answer_idx"}], r"row 2: field 'answer_idx': missing"),
    ([MEDQA, {**MEDQA, "options": ["a", "b"]}], r"row 2: field 'options': expected dict, got list"),
    ([MEDMCQA, MEDMCQA, {**MEDMCQA, "cop": "2"}], r"row 3: field 'cop': expected int, got str"),
    ([MEDMCQA, {**MEDMCQA, "cop": 9}], r"row 2: field 'cop': expected 0-3"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], r"row 1: field 'messages': no assistant turn"),
    ([{"messages": [{"role": "bot", "content": "Hi"}]}], r"row 1: field 'messages\[0\].role'"),
])
def test_validation_errors_name_file_row_and_field(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecipeError, match=expected) as error:
        prepare_data([str(path)], medical.SCHEMAS)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_schema_lists_the_supported_ones(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "response": "y"}])
    with pytest.raises(RecipeError, match=r"unknown schema.*medqa \(question, options, answer_idx\).*flashcards"):
        prepare_data([str(path)], medical.SCHEMAS)


def test_malformed_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FLASHCARD) + "\n{not json\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl: line 2: invalid JSON"):
        prepare_data([str(bad)], medical.SCHEMAS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RecipeError, match=r"empty.jsonl: the file has no rows"):
        prepare_data([str(empty)], medical.SCHEMAS)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(FLASHCARD).encode() + b"\n" + '{"input": "caf\xe9", "output": "x"}'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin.jsonl: line 2: bytes that are not UTF-8"):
        prepare_data([str(latin)], medical.SCHEMAS)
    with pytest.raises(RecipeError, match=r"no such local file"):
        prepare_data([str(tmp_path / "missing.jsonl")], medical.SCHEMAS)
