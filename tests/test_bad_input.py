"""Bad input, the way a user meets it: the medical recipe with the smoke config and one bad input each.

Every case must end in exactly one `error: ...` line naming the file, the row or line and the field where there is
one, a non-zero exit and no traceback. Most cases call the recipe's entry point in this process (a subprocess costs
seconds of start-up each); two run end to end under `accelerate launch --quiet` to prove the same from outside.
"""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_SECRETS, REPO_ROOT, SAMPLES, TINY_MODEL, run_recipe, run_recipe_in_process
from safetensors.torch import load_file

from data import medical
from lora_recipes.data import TokenBudget, prepare_data
from lora_recipes.model import load_tokenizer

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
MEDQA = json.loads((SAMPLES / "medical" / "medqa.jsonl").read_text().splitlines()[0])
MEDMCQA = json.loads((SAMPLES / "medical" / "medmcqa.jsonl").read_text().splitlines()[0])
FLASHCARD = {"input": "What is the first-line treatment for gout flares?", "output": "Colchicine or an NSAID."}
LONG_ANSWER = " ".join(["levothyroxine replacement with serum TSH monitoring every six weeks"] * 60)


def jsonl(*rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def model_folder(tmp_path, drop=(), pickled=False):
    """A copy of the tiny model without some files, or with its weights only as a pickle."""
    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder, ignore=shutil.ignore_patterns(*drop, *(["*.safetensors"] if pickled else [])))
    if pickled:
        torch.save(load_file(TINY_MODEL / "model.safetensors"), folder / "pytorch_model.bin")
    return str(folder)


# Each case: (id, builds the extra command-line arguments in tmp_path, regex the one error line must match)
CASES = [
    ("malformed-json-line",
     lambda t: ["--dataset_name", write(t / "cases.jsonl", jsonl(FLASHCARD) + '{"input": "What is X?", "output": \n')],
     r"cases\.jsonl: line 2: invalid JSON"),
    ("json-array-cut-short",
     lambda t: ["--dataset_name", write(t / "cases.json", json.dumps([FLASHCARD, FLASHCARD])[:-20])],
     r"cases\.json: line 1: invalid JSON .*is the array cut short\?"),
    ("null-field",
     lambda t: ["--dataset_name", write(t / "medqa.jsonl", jsonl(MEDQA, {**MEDQA, "answer_idx": None}))],
     r"medqa\.jsonl: row 2: field 'answer_idx': expected str, got null"),
    ("missing-field",
     lambda t: ["--dataset_name", write(t / "medqa.jsonl", jsonl(MEDQA, {k: v for k, v in MEDQA.items()
                                                                       if k != "answer_idx"}))],
     r"medqa\.jsonl: row 2: field 'answer_idx': missing"),
    ("options-list-not-dict",
     lambda t: ["--dataset_name", write(t / "medqa.jsonl", jsonl({**MEDQA, "options": ["a", "b", "c", "d"]}))],
     r"medqa\.jsonl: row 1: field 'options': expected dict, got list"),
    ("label-out-of-range",
     lambda t: ["--dataset_name", write(t / "medmcqa.jsonl", jsonl(MEDMCQA, {**MEDMCQA, "id": "x", "cop": 7}))],
     r"medmcqa\.jsonl: row 2: field 'cop': expected 0-3 \(or -1 for unlabelled\), got 7"),
    ("label-wrong-type",
     lambda t: ["--dataset_name", write(t / "medmcqa.jsonl", jsonl({**MEDMCQA, "cop": "2"}))],
     r"medmcqa\.jsonl: row 1: field 'cop': expected int, got str"),
    ("empty-file",
     lambda t: ["--dataset_name", write(t / "empty.jsonl", "\n\n")],
     r"empty\.jsonl: the file has no rows"),
    ("every-row-longer-than-max-length",
     lambda t: ["--dataset_name", write(t / "long.jsonl", jsonl(*({"input": f"Question {i}?", "output": LONG_ANSWER}
                                                                  for i in range(5))))],
     r"long\.jsonl: every row is longer than max_length=512 tokens \(the shortest has \d+\): raise --max_length"),
    ("non-utf8-bytes",
     lambda t: ["--dataset_name", write(t / "latin.jsonl", jsonl(FLASHCARD).encode() + jsonl(
         {"input": "caf\xe9 au lait spots?", "output": "NF1."}).encode("latin-1"))],
     r"latin\.jsonl: line 2: bytes that are not UTF-8"),
    ("csv-unexpected-header",
     lambda t: ["--dataset_name", write(t / "cases.csv", "prompt,response\nWhat is X?,X is Y.\n")],
     r"cases\.csv: unknown schema, columns \['prompt', 'response'\]\. Supported schemas: medqa"),
    ("parquet-unexpected-columns",
     lambda t: ["--dataset_name", parquet(t / "cases.parquet", [{"text": "What is X?", "label": 1}])],
     r"cases\.parquet: unknown schema, columns \['label', 'text'\]"),
    ("duplicate-only-source",
     lambda t: ["--dataset_name", str(SAMPLES / "medical" / "flashcards.jsonl"), write(
         t / "again.jsonl", (SAMPLES / "medical" / "flashcards.jsonl").read_text())],
     r"again\.jsonl: no row left to train on \(dropped: 80 duplicate\)"),
    ("eval-set-identical-to-train-set",
     lambda t: ["--dataset_name", str(SAMPLES / "medical" / "medqa.jsonl"), "--eval_dataset_name",
                str(SAMPLES / "medical" / "medqa.jsonl")],
     r"medqa\.jsonl: named both to train on and to evaluate on; evaluate on another split \(@SPLIT\) or file"),
    ("split-named-with-a-colon",
     lambda t: ["--eval_dataset_name", "GBaker/MedQA-USMLE-4-options:default:test"],
     r"GBaker/MedQA-USMLE-4-options:default:test: name the split with '@': "
     r"GBaker/MedQA-USMLE-4-options:default@test \(sources are ID, ID:CONFIG, ID@SPLIT or ID:CONFIG@SPLIT"),
    ("unsupported-file-type",
     lambda t: ["--dataset_name", write(t / "cases.xlsx", "What is X? X is Y.\n")],
     r"cases\.xlsx: unsupported file type '\.xlsx'"),
    ("missing-local-model-folder",
     lambda t: ["--model_name_or_path", str(t / "no-such-model")],
     r"tokenizer '.*no-such-model': could not be loaded .*no such local folder"),
    ("base-model-without-chat-template",
     lambda t: ["--model_name_or_path", model_folder(t, drop=["chat_template.jinja"])],
     r"tokenizer '.*model' has no chat template: use an instruct model, or pass --chat_template_path"),
    ("pickled-weights-only",
     lambda t: ["--model_name_or_path", model_folder(t, pickled=True)],
     r"model '.*model': weights only as pickles \(pytorch_model\.bin\); the recipes load safetensors only"),
    ("unknown-yaml-key",
     lambda t: ["--config", write(t / "typo.yaml", SMOKE.read_text() + "lora_rank: 8\n")],
     r"typo\.yaml \+ command line: Unknown arguments from config file: \['--lora_rank'"),
    ("mistyped-flag",
     lambda t: ["--learning_rat", "1e-4"],
     r"medical_smoke\.yaml \+ command line: Some specified arguments are not used .*'--learning_rat'"),
    ("flag-value-of-the-wrong-type", lambda t: ["--lora_r", "sixteen"],
     r"medical_smoke\.yaml \+ command line: argument --lora_r/--lora-r: invalid int value: 'sixteen'"),
    ("lora-r-zero", lambda t: ["--lora_r", "0"], r"lora_r must be > 0, got 0"),
    ("negative-learning-rate", lambda t: ["--learning_rate=-1e-4"], r"learning_rate must be > 0, got -0\.0001"),
    ("4bit-and-8bit", lambda t: ["--load_in_8bit", "true"], r"8 bit and 4 bit"),
    ("hub-token-argument",
     lambda t: ["--hub_token", "hf_abcdefghijklmnop"],
     r"hub_token: keep the token in the HF_TOKEN environment variable"),
    ("secret-in-an-argument",
     lambda t: ["--run_name", f"run-{FAKE_SECRETS['HF_TOKEN']}"],
     r"run_name holds the value of the environment variable HF_TOKEN: secrets stay in the environment"),
    ("resume-from-a-missing-checkpoint",
     lambda t: ["--resume_from_checkpoint", str(t / "checkpoint-7")],
     r"--resume_from_checkpoint .*checkpoint-7: not a complete checkpoint folder"),
]


def the_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def test_there_are_at_least_15_distinct_cases():
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("build, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_file_row_and_field(tmp_path, monkeypatch, capsys, build, expected):
    args = ["--config", str(SMOKE), "--output_dir", str(tmp_path / "out"), *build(tmp_path)]
    if "--config" in args[2:]:  # the case brings its own config
        args = args[2:]
    code, _, err = run_recipe_in_process(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err
    line = the_error_line(err)
    assert re.search(expected, line), line
    assert FAKE_SECRETS["HF_TOKEN"] not in err
    assert not (tmp_path / "out" / "run_card.json").exists()


@pytest.mark.parametrize("case_id", ["every-row-longer-than-max-length", "pickled-weights-only"])
def test_bad_input_end_to_end_under_accelerate_launch(tmp_path, case_id):
    _, build, expected = next(case for case in CASES if case[0] == case_id)
    proc = run_recipe("recipes/sft_medical.py", "--config", str(SMOKE), "--output_dir", str(tmp_path / "out"),
                      *build(tmp_path), quiet=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # 1: the launcher's status for any failure
    assert re.search(expected, the_error_line(proc.stderr))


def test_rows_cut_by_max_length_are_counted_and_answerless_ones_dropped(tmp_path):
    """Rows the user allowed (longer than max_length) are truncated and counted; rows truncation would leave without
    an answer are dropped with their reason, never silently (TRL drops them without a word)."""
    from trl import ModelConfig, SFTConfig

    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(TINY_MODEL)),
                               SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, use_cpu=True))
    long_question = {"input": " ".join(["Which thyroid test comes first?"] * 80), "output": "Serum TSH."}
    long_answer = {"input": "Which thyroid test comes first?", "output": LONG_ANSWER}
    rows = [FLASHCARD, long_question, long_answer, {**FLASHCARD, "input": "And for pseudogout?"}]
    path = write(tmp_path / "mixed.jsonl", jsonl(*rows))
    data = prepare_data([path], medical.SCHEMAS, eval_fraction=0.0,
                        budget=TokenBudget(tokenizer, 256, assistant_only_loss=True))
    report = data.sources[0]
    # the long question pushes its answer past token 256: dropped; the long answer is cut but still trains
    assert report.dropped == {"answer cut off by max_length": 1}
    assert report.truncated == 2 and report.kept == 3 and len(data.train) == 3
    assert f"{path}: 2 rows longer than max_length are truncated" in data.summary()
    assert [m["messages"][1]["content"] for m in data.train] == [
        FLASHCARD["input"], long_answer["input"], "And for pseudogout?"]
