"""Legal and finance converters and their sources: HTML, unanswered questions, graded labels, repeats, the
by-ticker split, the latin-1 PhraseBank text format, and validation errors that name the row."""

import json

import pytest
from conftest import REPO_ROOT, SAMPLES

from data import finance, legal
from lora_recipes.config import parse_args
from lora_recipes.data import DropRow, FieldError, prepare_data
from lora_recipes.errors import RecipeError
from lora_recipes.sft import main
from lora_recipes.text import clean_text, html_to_text

CASE_HOLD = {
    "context": "The statute applies. See Doe v. Roe, 1 F.3d 2 (9th Cir. 1990) (<HOLDING>). Affirmed.",
    "endings": ["holding one", "holding two", "holding  three ", "holding four", "holding five"],
    "label": 2,
}
LAW_SE = {
    "question_id": 7, "question_title": "Can my landlord keep the deposit?",
    "question_body": "<p>My landlord kept it &amp; won't say why.</p><script>alert(1)</script>",
    "answers": [
        {"answer_id": 1, "body": "<p>Low-scored answer.</p>", "score": 2},
        {"answer_id": 2, "body": "<p>Top answer: <b>no</b>.</p><ul><li>Write to them.</li></ul>", "score": 9},
        {"answer_id": 3, "body": "<p>Tied top answer, listed later.</p>", "score": 9},
    ],
    "score": 4, "tags": ["landlord", "united-kingdom"], "link": "https://x", "license": "CC BY-SA 4.0",
}
FINGPT = {"input": "Shares rose 5% after results.", "output": "moderately positive",
          "instruction": "What is the sentiment of this news? Please choose an answer from {strong negative/...}."}
FIN_QA = {"question": "What was revenue?", "answer": "$5 million.", "context": "Revenue was $5 million.",
          "ticker": "ACME", "filing": "2023_10K"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_case_hold_lettered_holdings_and_answer():
    system, user, assistant = (m["content"] for m in legal.case_hold_to_messages(CASE_HOLD)["messages"])
    assert "not legal advice" in system and "jurisdiction" in system
    assert user.startswith("The statute applies. See Doe v. Roe, 1 F.3d 2 (9th Cir. 1990) [HOLDING]. Affirmed.")
    assert "<" not in user
    assert [line for line in user.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ", "E. ")] == [
        "A. holding one", "B. holding two", "C. holding three", "D. holding four", "E. holding five"]
    assert assistant == "C. holding three"


@pytest.mark.parametrize("change, field", [
    ({"label": 5}, "label"), ({"endings": ["only", "four", "end", "ings"]}, "endings"),
    ({"context": "No placeholder here."}, "context"),
])
def test_case_hold_invalid_values_name_the_field(change, field):
    with pytest.raises(FieldError, match=f"field '{field}'"):
        legal.case_hold_to_messages({**CASE_HOLD, **change})


def test_law_stackexchange_html_becomes_text_and_the_top_answer_is_the_target():
    _, user, assistant = (m["content"] for m in legal.law_stackexchange_to_messages(LAW_SE)["messages"])
    assert user == ("Can my landlord keep the deposit?\n\nMy landlord kept it & won't say why.\n\n"
                    "Tags: landlord, united-kingdom")
    assert assistant == "Top answer: no.\n\n- Write to them."  # the first of the two answers scored 9
    for text in (user, assistant):
        assert "<" not in text and "&amp;" not in text and "alert" not in text


def test_html_entities_are_decoded_once():
    body = "<p>Write &amp;lt;br&amp;gt; for a line break; x &lt; y &amp;&amp; y &gt; z.</p>"
    _, user, _ = (m["content"] for m in legal.law_stackexchange_to_messages({**LAW_SE, "question_body": body})[
        "messages"])
    assert user.split("\n\n")[1] == "Write &lt;br&gt; for a line break; x < y && y > z."
    assert html_to_text("&amp;lt;br&amp;gt;") == "&lt;br&gt;"


def test_plain_text_is_never_parsed_as_html():
    assert clean_text("if x<y and y>z then") == "if x<y and y>z then"
    assert clean_text("AT&amp;T  &lt;b&gt; ") == "AT&amp;T &lt;b&gt;"
    text = "Guidance: margin <5% and growth >10% for R&D <b>units</b>."
    _, user, _ = (m["content"] for m in finance.fingpt_sentiment_to_messages({**FINGPT, "input": text})["messages"])
    assert user.endswith("\n\n" + text)
    ending = "holding that <a> and <b> are distinct"
    assert legal.case_hold_to_messages({**CASE_HOLD, "endings": [ending] * 5})["messages"][2]["content"] == (
        f"C. {ending}")


@pytest.mark.parametrize("answers", [[], [{"answer_id": 1, "body": "<p> </p>", "score": 3}]])
def test_law_stackexchange_without_an_answer_is_dropped(answers):
    with pytest.raises(DropRow, match="no answers"):
        legal.law_stackexchange_to_messages({**LAW_SE, "answers": answers})


@pytest.mark.parametrize("label, expected", [
    ("positive", "positive"), ("Negative", "negative"), ("neutral", "neutral"),
    ("strong positive", "positive"), ("strongly negative", "negative"), ("moderately positive", "positive"),
    ("moderately negative", "negative"), ("mildly positive", "neutral"), ("mildly negative", "neutral"),
])
def test_fingpt_graded_labels_are_normalised(label, expected):
    _, user, assistant = (m["content"] for m in finance.fingpt_sentiment_to_messages(
        {**FINGPT, "output": label})["messages"])
    assert assistant == expected
    assert user == f"{finance.SENTIMENT_QUESTION}\n\nShares rose 5% after results."  # the 7-class instruction is gone


@pytest.mark.parametrize("label", ["bullish", "very positive", "mildly neutral", ""])
def test_fingpt_unknown_labels_are_errors(label):
    with pytest.raises(FieldError, match="field 'output': unknown sentiment"):
        finance.fingpt_sentiment_to_messages({**FINGPT, "output": label})


def test_phrasebank_word_and_hub_class_id_labels():
    assert finance.phrasebank_to_messages({"sentence": "Profit fell .", "label": "negative"})["messages"][2][
        "content"] == "negative"
    assert finance.phrasebank_to_messages({"sentence": "Profit fell .", "label": 2})["messages"][2][
        "content"] == "positive"
    with pytest.raises(FieldError, match="field 'label': expected 0-2"):
        finance.phrasebank_to_messages({"sentence": "x", "label": 3})


def test_financial_qa_names_company_and_filing():
    _, user, assistant = (m["content"] for m in finance.financial_qa_to_messages(FIN_QA)["messages"])
    assert user == "From the ACME 2023_10K filing:\nRevenue was $5 million.\n\nQuestion: What was revenue?"
    assert assistant == "$5 million."
    with pytest.raises(DropRow):
        finance.financial_qa_to_messages({**FIN_QA, "answer": "  "})


def test_latin1_phrasebank_file_is_parsed(tmp_path):
    path = tmp_path / "Sentences_AllAgree.txt"
    path.write_bytes("Päivä Oyj profit rose to £ 5 mn .@positive\r\nMail ir@x.example .@neutral\r\n\r\n"
                     "Sales fell .@negative\r\n".encode("latin-1"))
    data = prepare_data([str(path)], finance.SCHEMAS, eval_fraction=0.0)
    assert data.sources[0].schema == "phrasebank" and data.sources[0].read == 3
    pairs = [(m["messages"][1]["content"].split("\n\n")[1], m["messages"][2]["content"]) for m in data.train]
    assert pairs == [("Päivä Oyj profit rose to £ 5 mn .", "positive"), ("Mail ir@x.example .", "neutral"),
                     ("Sales fell .", "negative")]


def test_phrasebank_sample_is_latin1_and_marked_synthetic():
    raw = (SAMPLES / "finance" / "Sentences_AllAgree.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the sample exercises the latin-1 fallback, as the real files do
    lines = raw.decode("latin-1").splitlines()
    assert lines and all("SYNTHETIC" in line and line.rpartition("@")[2] in finance.SENTIMENTS for line in lines)


def test_phrasebank_line_without_label_names_the_line(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("Good .@positive\nno label on this line\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"phrases.txt: line 2: expected 'sentence@label'"):
        prepare_data([str(path)], finance.SCHEMAS)


@pytest.mark.parametrize("schemas, rows, expected", [
    (legal.SCHEMAS, [CASE_HOLD, {**CASE_HOLD, "endings": "a b c d e"}],
     r"row 2: field 'endings': expected list, got str"),
    (legal.SCHEMAS, [CASE_HOLD, CASE_HOLD, {**CASE_HOLD, "label": 7}], r"row 3: field 'label': expected 0-4, got 7"),
    (legal.SCHEMAS, [LAW_SE, {**LAW_SE, "answers": [{"body": "<p>x</p>", "score": "high"}]}],
     r"row 2: field 'answers\[0\].score': expected an integer"),
    (legal.SCHEMAS, [{**LAW_SE, "tags": "landlord"}], r"row 1: field 'tags': expected a list of strings"),
    (finance.SCHEMAS, [FINGPT, {**FINGPT, "output": "bullish"}],
     r"row 2: field 'output': unknown sentiment 'bullish'"),
    (finance.SCHEMAS, [FIN_QA, {**FIN_QA, "ticker": 123}], r"row 2: field 'ticker': expected str, got int"),
])
def test_validation_errors_name_file_row_and_field(tmp_path, schemas, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecipeError, match=expected) as error:
        prepare_data([str(path)], schemas)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_columns_no_converter_reads_may_mix_types(tmp_path):
    rows = [LAW_SE, {**LAW_SE, "question_title": "Another question?", "score": "4", "question_id": "q-8",
                     "answers": [{"answer_id": "a1", "body": "<p>Yes.</p>", "score": 1, "extra": [1, 2]}]}]
    data = prepare_data([str(write_jsonl(tmp_path / "mixed.jsonl", rows))], legal.SCHEMAS, eval_fraction=0.0)
    assert len(data.train) == 2 and data.train[1]["messages"][2]["content"] == "Yes."


def test_schemas_are_detected_in_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([CASE_HOLD, {**CASE_HOLD, "label": 0}]), tmp_path / "case_hold.parquet")
    pacsv.write_csv(pa.Table.from_pylist([FINGPT, {**FINGPT, "input": "Sales fell."}]), tmp_path / "fingpt.csv")
    assert prepare_data([str(tmp_path / "case_hold.parquet")], legal.SCHEMAS, eval_fraction=0.0).sources[0].schema == (
        "case_hold")
    data = prepare_data([str(tmp_path / "fingpt.csv")], finance.SCHEMAS, eval_fraction=0.0)
    assert data.sources[0].schema == "fingpt_sentiment" and len(data.train) == 2


def test_legal_samples_drop_unanswered_questions_and_repeats():
    raw = read_jsonl(SAMPLES / "legal" / "law_stackexchange.jsonl")
    unanswered = sum(not any(html_to_text(a["body"]) for a in row["answers"]) for row in raw)
    answered_ids = [row["question_id"] for row in raw if any(html_to_text(a["body"]) for a in row["answers"])]
    data = prepare_data([str(SAMPLES / "legal" / name) for name in ("case_hold.jsonl", "law_stackexchange.jsonl")],
                        legal.SCHEMAS, eval_fraction=0.1, seed=42)
    case_hold, law_se = data.sources
    assert (case_hold.schema, law_se.schema) == ("case_hold", "law_stackexchange")
    assert unanswered > 0 and law_se.dropped["no answers"] == unanswered
    assert law_se.dropped["duplicate"] == len(answered_ids) - len(set(answered_ids)) > 0
    for example in data.train:
        assert not any("<" in m["content"] and ">" in m["content"] for m in example["messages"][1:])


def test_finance_samples_dedup_within_and_across_sources():
    fingpt = read_jsonl(SAMPLES / "finance" / "fingpt_sentiment.jsonl")
    graded = {row["output"] for row in fingpt} - set(finance.SENTIMENTS)
    assert {"mildly negative", "moderately positive", "strong positive"} <= graded  # the samples exercise grades
    data = prepare_data([str(SAMPLES / "finance" / name) for name in
                         ("fingpt_sentiment.jsonl", "financial_qa_10k.jsonl", "Sentences_AllAgree.txt")],
                        finance.SCHEMAS, eval_fraction=0.1, seed=42)
    sentiment, qa, phrasebank = data.sources
    unique_inputs = {(row["input"], row["output"]) for row in fingpt}
    assert sentiment.dropped == {"duplicate": len(fingpt) - len(unique_inputs)}
    assert sentiment.dropped["duplicate"] > len(unique_inputs)  # heavy duplication, as in the real set
    assert qa.dropped == {"empty question or answer": 1}
    assert phrasebank.dropped == {"duplicate": 3}  # the three sentences that are also in the FinGPT sample
    labels = {example["messages"][2]["content"] for example in data.train if finance.SENTIMENT_QUESTION in
              example["messages"][1]["content"]}
    assert labels == set(finance.SENTIMENTS)


def test_financial_qa_eval_split_is_held_out_by_ticker():
    data = prepare_data([str(SAMPLES / "finance" / "financial_qa_10k.jsonl")], finance.SCHEMAS, eval_fraction=0.3,
                        seed=42)

    def tickers(dataset):
        return {example["messages"][1]["content"].split()[2] for example in dataset}

    train, held_out = tickers(data.train), tickers(data.eval)
    assert train and held_out and not train & held_out
    assert train | held_out == {row["ticker"] for row in read_jsonl(SAMPLES / "finance" / "financial_qa_10k.jsonl")}


def test_a_sentence_with_conflicting_labels_stays_on_one_side(tmp_path):
    """FinGPT has the same sentence graded ('mildly positive' -> neutral) and plain ('positive'): both are kept, on
    the same side of the split."""
    rows = [{**FINGPT, "input": f"Company {i} shares moved {i}% after results.", "output": label}
            for i in range(100) for label in ("positive", "mildly positive")]
    data = prepare_data([str(write_jsonl(tmp_path / "fingpt.jsonl", rows))], finance.SCHEMAS, eval_fraction=0.3)

    assert data.sources[0].kept == 200 and len(data.eval) >= 30
    in_train = {m[1]["content"] for m in data.train["messages"]}
    assert sum(m[1]["content"] in in_train for m in data.eval["messages"]) == 0


def test_a_source_of_few_groups_has_a_group_on_each_side(tmp_path):
    """40 questions over 4 tickers: at eval_fraction 0.1 every ticker often hashes into train, at 0.9 into eval."""
    rows = [{**FIN_QA, "question": f"What was revenue in quarter {q}?", "ticker": ticker}
            for ticker in ("AAA", "BBB", "CCC", "DDD") for q in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)

    def tickers(dataset):
        return {example["messages"][1]["content"].split()[2] for example in dataset or []}

    notes = 0
    for eval_fraction in (0.1, 0.9):
        for seed in range(6):
            data = prepare_data([str(path)], finance.SCHEMAS, eval_fraction=eval_fraction, seed=seed)
            train, held_out = tickers(data.train), tickers(data.eval)
            assert train and held_out and not train & held_out and train | held_out == {"AAA", "BBB", "CCC", "DDD"}
            report = data.sources[0]
            assert (report.groups, report.eval_groups, report.eval) == (4, len(held_out), 10 * len(held_out))
            assert f"split by group, {len(held_out)} of 4 groups in eval" in data.summary()
            notes += bool(report.split_note)
            if report.split_note:
                assert report.split_note in data.summary() and len(held_out) in (1, 3)
    assert notes  # the guarantee was needed on some of these seeds


def test_case_hold_evaluation_splits_are_refused(tmp_path):
    args = parse_args(REPO_ROOT / "recipes" / "configs" / "legal_smoke.yaml",
                      ["--output_dir", str(tmp_path), "--dataset_name", "coastalcph/lex_glue:case_hold@test"])
    with pytest.raises(RecipeError, match=r"case_hold@test: evaluation-only \(coastalcph/lex_glue:case_hold@test\)"):
        main(legal, *args)
    args[0].dataset_name = ["coastalcph/lex_glue:case_hold:test"]  # a split named with ':' is not taken as a config
    with pytest.raises(RecipeError, match=r"name the split with '@': coastalcph/lex_glue:case_hold@test"):
        main(legal, *args)


@pytest.mark.parametrize("domain, sources", [
    (legal, ["coastalcph/lex_glue:case_hold", "ymoslem/Law-StackExchange"]),
    (finance, ["FinGPT/fingpt-sentiment-train", "virattt/financial-qa-10K"]),
])
def test_real_defaults_read_the_hub_sources_in_4bit(domain, sources):
    name = domain.__name__.rsplit(".", 1)[1]
    data_args, training_args, model_args = parse_args(REPO_ROOT / "recipes" / "configs" / f"{name}.yaml",
                                                      ["--use_cpu", "true"])
    assert data_args.dataset_name == sources and not set(sources) & set(domain.EVAL_ONLY)
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.lora_r == 16
    assert training_args.assistant_only_loss and training_args.max_length >= 1024
