"""Base vs adapter evaluation: task detection, the scorers, metrics, bootstrap intervals, and the report end to end."""

import importlib.util
import json
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SAMPLES, TINY_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from data import legal, medical
from lora_recipes.config import parse_args
from lora_recipes.data import prepare_data, read_file
from lora_recipes.errors import RecipeError
from lora_recipes.evaluation import (
    EvalArguments,
    base_model_args,
    build_tasks,
    classification_scores,
    compare,
    continuation_logprobs,
    greedy_generations,
    load_for_evaluation,
    named_tasks,
    paired_bootstrap,
    parse_hub_source,
    rouge_l,
    to_item,
    token_f1,
)

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
REAL = REPO_ROOT / "recipes" / "configs" / "medical.yaml"
MEDICAL = SAMPLES / "medical"
LABELS = [("Yes", "No", "Maybe")]
REPORT_KEYS = {"metric", "n", "base", "adapter", "base_ci", "adapter_ci", "delta_ci"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def first_chat(file: str, converter) -> list[dict]:
    return converter(read_file(MEDICAL / file)[0])["messages"]


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def chat_rows(chats: list[list[dict]]) -> list[dict]:
    """Converted rows of data in chat form (`messages` schema: the task is told by the text)."""
    return [{"messages": messages, "schema": "messages"} for messages in chats]


def options_question(n: int = 4) -> str:
    return "Which one?\n\n" + "\n".join(f"{letter}. option {letter.lower()}" for letter in "ABCDE"[:n])


# ---------------------------------------------------------------------------------------------------------------
# Tasks from converted chats
# ---------------------------------------------------------------------------------------------------------------
def test_converter_outputs_become_the_right_tasks():
    row = read_file(MEDICAL / "medqa.jsonl")[0]
    kind, item = to_item(medical.medqa_to_messages(row)["messages"], LABELS)
    assert kind == "multiple_choice" and item.options == ["A.", "B.", "C.", "D."]
    assert item.answer == "ABCD".index(row["answer_idx"])
    assert item.show(item.answer) == f"{row['answer_idx']}. {row['options'][row['answer_idx']]}"
    assert item.prompt[-1]["role"] == "user" and all(m["role"] != "assistant" for m in item.prompt)

    explained = next(r for r in read_file(MEDICAL / "medmcqa.jsonl") if r["exp"] not in ("", "None"))
    kind, item = to_item(medical.medmcqa_to_messages(explained)["messages"], LABELS)
    assert kind == "multiple_choice" and item.answer == explained["cop"] and "Explanation:" in item.reference

    for row in read_file(MEDICAL / "pubmedqa.jsonl")[:6]:
        kind, item = to_item(medical.pubmedqa_to_messages(row)["messages"], LABELS)
        assert kind == "classification" and item.options == ["Yes", "No", "Maybe"]
        assert item.options[item.answer].lower() == row["final_decision"]

    kind, item = to_item(first_chat("flashcards.jsonl", medical.flashcards_to_messages), LABELS)
    assert kind == "open" and item.options == [] and item.reference.endswith("(SYNTHETIC)")


@pytest.mark.parametrize("answer, kind, options, index", [
    ("C", "multiple_choice", ["A", "B", "C", "D"], 2),  # a bare letter: candidates are bare letters
    ("B) option b", "multiple_choice", ["A)", "B)", "C)", "D)"], 1),
    ("A deficiency of iron.", "open", [], -1),  # starts with a capital A, but is not a letter answer
    ("E. option e", "open", [], -1),  # E is not one of the listed options
    ("no, it does not", "classification", ["yes", "no", "maybe"], 1),  # labels take the data's casing
    ("Nothing suggests it.", "open", [], -1),  # `No` only as a whole word
])
def test_answer_formats(answer, kind, options, index):
    found, item = to_item(chat(options_question(), answer), LABELS)
    assert (found, item.options, item.answer) == (kind, options, index)


def test_a_source_mixing_kinds_splits_into_tasks_and_limit_applies_per_task():
    chats = ([chat(options_question(), "C. option c")] * 5 + [chat("Why?", "Because.")] * 3
             + [chat("Does it?", "yes, it does")] * 2)
    tasks = build_tasks("mine", chat_rows(chats), medical, limit=4, source="mine.jsonl")
    assert [(t.name, t.kind, len(t.items)) for t in tasks] == [
        ("mine/yes-no-maybe", "classification", 2), ("mine/multiple_choice", "multiple_choice", 4),
        ("mine/open", "open", 3)]
    assert [t.name for t in build_tasks("only", chat_rows(chats[:5]), medical, None, source="x")] == ["only"]


def test_options_come_from_the_options_block_only():
    """A CaseHOLD context's own `I.`, `A.`, `B.` headings are not options: only the block the converter wrote is."""
    row = dict(read_file(SAMPLES / "legal" / "case_hold.jsonl")[0])
    row["context"] = f"I. Background\n\nA. The facts\nB. The claims\n\nII. Discussion\n\n{row['context']}"
    messages = legal.case_hold_to_messages(row)["messages"]
    for task in (None, "multiple_choice"):  # told from the text, and declared by the schema
        kind, item = to_item(messages, [], task)
        assert kind == "multiple_choice" and item.options == ["A.", "B.", "C.", "D.", "E."], item.options
        assert item.answer == row["label"] and item.show(item.answer) == f"{'ABCDE'[row['label']]}. " \
            f"{row['endings'][row['label']]}"


def flashcard(answer: str) -> dict:
    return {"input": "Can a child with influenza be given aspirin?", "output": answer}


def test_task_kind_comes_from_the_schema_not_the_answer_text(tmp_path):
    """A flashcard that happens to start with No stays an open answer, read as a named file or as a run's eval split;
    PubMedQA stays a Yes/No/Maybe classification."""
    flashcards = tmp_path / "flashcards.jsonl"
    flashcards.write_text("".join(json.dumps(flashcard(answer)) + "\n" for answer in (
        "No, because of Reye syndrome.", "Yes it can, in adults only.", "Maybe later (SYNTHETIC).")))
    [task] = named_tasks([str(flashcards)], medical, None, [])
    assert (task.name, task.kind, len(task.items)) == ("flashcards", "open", 3)

    pubmedqa = MEDICAL / "pubmedqa.jsonl"
    held_out = prepare_data([str(MEDICAL / "medqa.jsonl")], medical.SCHEMAS,
                            eval_sources=[str(flashcards), str(pubmedqa)]).eval  # what the end of training scores
    tasks = {t.name: t for t in build_tasks("held_out", held_out, medical, None, source="held-out")}
    assert tasks["held_out/open"].kind == "open" and len(tasks["held_out/open"].items) == 3
    classified = tasks["held_out/yes-no-maybe"]
    assert classified.kind == "classification" and len(classified.items) == len(read_file(pubmedqa))


def test_standard_sets_use_their_evaluation_splits():
    assert parse_hub_source("GBaker/MedQA-USMLE-4-options", medical) == ("medqa", "GBaker/MedQA-USMLE-4-options",
                                                                         "test")
    assert parse_hub_source("openlifescienceai/medmcqa", medical)[2] == "validation"
    assert parse_hub_source("qiaojin/PubMedQA:pqa_labeled", medical)[2] == "train"  # its only split, EVAL_ONLY
    assert parse_hub_source("someone/cases", medical) == ("someone/cases", "someone/cases", "test")
    assert parse_hub_source("someone/cases:en@validation", medical)[1:] == ("someone/cases:en", "validation")
    trained = set(parse_args(REAL, ["--use_cpu", "true"])[0].dataset_name)  # the recipe reads their train splits
    for eval_set in medical.EVAL_SETS:
        assert eval_set.split != "train" or (eval_set.source not in trained and eval_set.source in medical.EVAL_ONLY)


# ---------------------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits favour one token everywhere: `adapter_token`, or `base_token` while
    the adapter is disabled. Unfavoured tokens share a uniform logit."""

    def __init__(self, vocab_size: int, adapter_token: int, base_token: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device to read
        self.vocab_size, self.favoured, self.base_token = vocab_size, adapter_token, base_token
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, past_key_values=None,
                use_cache=False):
        from transformers import DynamicCache

        self.calls.append(tuple(input_ids.shape))
        logits = torch.zeros(input_ids.shape[0], logits_to_keep or input_ids.shape[1], self.vocab_size)
        logits[..., self.favoured] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values or DynamicCache())

    @contextmanager
    def disable_adapter(self):
        adapter_token, self.favoured = self.favoured, self.base_token
        try:
            yield
        finally:
            self.favoured = adapter_token


def test_multiple_choice_accuracy_when_the_logits_make_option_c_win(tokenizer):
    letters = "CCBCDC"  # the right answers; the model always prefers C, the base (adapter off) A
    chats = [chat(options_question(), f"{letter}. option {letter.lower()}") for letter in letters]
    tasks = build_tasks("hand-built", chat_rows(chats), medical, None, source="hand-built")
    c, a = tokenizer.convert_tokens_to_ids("C"), tokenizer.convert_tokens_to_ids("A")
    model = FixedLogits(len(tokenizer), adapter_token=c, base_token=a)
    args = EvalArguments(adapter="unused", output_dir="unused", batch_size=5, max_length=512, bootstrap_samples=200)
    report = compare(model, tokenizer, tasks, args)["hand-built"]
    assert report["metric"] == "accuracy" and report["n"] == 6
    assert report["adapter"] == pytest.approx(4 / 6) and report["base"] == 0.0
    assert report["delta"] == pytest.approx(4 / 6) and report["base_ci"] == [0.0, 0.0]
    assert report["delta_ci"][0] > 0  # every resample has the adapter ahead
    assert {e["adapter"] for e in report["examples"]} == {"C. option c"}
    assert {e["base"] for e in report["examples"]} == {"A. option a"}
    # The six questions are one prompt: read once per 5 of its 24 options, then the options' tokens after the first
    assert max(shape[0] for shape in model.calls) <= 5
    prompt_passes = [shape for shape in model.calls if shape[1] > 2]
    assert prompt_passes == [(1, prompt_passes[0][1])] * 2 * 5  # base and adapter


def test_classification_scores_by_label_likelihood(tokenizer):
    answers = ["No.", "No.", "Yes.", "Maybe.", "No.", "Yes."]
    chats = [chat("Context: ... Question: does it work?", f"{answer} Because.") for answer in answers]
    tasks = build_tasks("pubmed-like", chat_rows(chats), medical, None, source="hand-built")
    assert tasks[0].kind == "classification"
    n_token, y_token = tokenizer.convert_tokens_to_ids("N"), tokenizer.convert_tokens_to_ids("Y")
    model = FixedLogits(len(tokenizer), adapter_token=n_token, base_token=y_token)
    args = EvalArguments(adapter="unused", output_dir="unused", max_length=512, bootstrap_samples=200)
    report = compare(model, tokenizer, tasks, args)["pubmed-like"]
    metrics = report["metrics"]
    assert metrics["accuracy"]["adapter"] == pytest.approx(3 / 6)
    assert metrics["accuracy"]["base"] == pytest.approx(2 / 6)
    # adapter always says No: F1(No) = 2*3/(3+6) = 2/3, F1(Yes) = F1(Maybe) = 0
    assert metrics["macro_f1"]["adapter"] == pytest.approx((2 / 3) / 3)
    assert metrics["weighted_f1"]["adapter"] == pytest.approx((2 / 3) * 3 / 6)


@pytest.fixture(scope="module")
def tiny_model():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()


def test_batched_scores_equal_the_log_softmax_of_each_sequence_alone(tiny_model, tokenizer):
    texts = [("Which test confirms hypothyroidism?", " Serum TSH."), ("Q", " A long answer about migraine."),
             ("What is the first-line treatment for asthma exacerbation in adults?", " B"),
             ("Hi", " Yes"), ("Fatigue and spoon-shaped nails suggest", " iron deficiency anemia.")]
    requests = [(tokenizer(c)["input_ids"], tokenizer(x, add_special_tokens=False)["input_ids"]) for c, x in texts]
    batched = continuation_logprobs(tiny_model, requests, batch_size=3, pad_id=tokenizer.pad_token_id)
    for (context, continuation), score in zip(requests, batched, strict=False):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([context + continuation])).logits[0]
        logprobs = logits[len(context) - 1:-1].log_softmax(-1)
        expected = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_generation_is_batch_independent_and_respects_each_budget(tiny_model, tokenizer):
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ["The first-line treatment is", "Serum lipase confirms", "Fatigue and", "A"]]
    budgets = [12, 5, 20, 8]
    batched = greedy_generations(tiny_model, tokenizer, prompts, budgets, batch_size=4)
    assert batched == greedy_generations(tiny_model, tokenizer, prompts, budgets, batch_size=1)
    # The random-init tiny model repeats one token after these prompts, so each generation is its budget long
    assert [len(text.split()) for text in batched[:3]] == budgets[:3] and batched[3] == "A" * budgets[3], batched


# ---------------------------------------------------------------------------------------------------------------
# Metrics and intervals
# ---------------------------------------------------------------------------------------------------------------
def test_text_metrics_on_hand_computed_cases():
    assert token_f1("The first-line treatment: Metformin.", "first-line treatment, metformin") == 1.0  # case, articles
    f1 = token_f1("The first-line treatment is metformin.", "first-line treatment: metformin")
    assert f1 == pytest.approx(8 / 9)
    assert token_f1("metformin daily", "metformin") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "metformin") == 0.0 and token_f1("", "") == 1.0
    # LCS of [a b c d e] and [a c e f] is [a c e]: precision 3/5, recall 3/4
    assert rouge_l("a b c d e", "a c e f") == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # order matters, unlike token F1
    assert token_f1("d c b a", "a b c d") == 1.0


def test_classification_scores_match_a_hand_confusion_matrix():
    gold = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 0])
    scores = classification_scores(gold, predicted, 3)
    f1 = [2 * 2 / (3 + 4), 2 * 1 / (2 + 2), 0.0]  # 2 TP / (3 gold + 4 predicted), ...
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert scores["weighted_f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 0) / 6)


def mean_metric(values):
    return lambda idx: values[idx].mean()


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (50, 800):
        base = (rng.random(n) < 0.6).astype(float)
        adapter = np.maximum(base, rng.random(n) < 0.3)  # the adapter fixes some of the base's mistakes
        result = paired_bootstrap(mean_metric(base), mean_metric(adapter), n, samples=1000, seed=0)
        for key in ("base", "adapter", "delta"):
            low, high = result[f"{key}_ci"]
            assert low <= result[key] <= high, (n, key, result)
        assert result["delta"] > 0 and result["delta_ci"][0] > 0  # paired: every example moved up or stayed
        widths[n] = result["base_ci"][1] - result["base_ci"][0]
    assert widths[800] < widths[50] / 2.5  # ~ 1/sqrt(n): 4x narrower for 16x the examples
    again = paired_bootstrap(mean_metric(base), mean_metric(adapter), 800, samples=1000, seed=0)
    assert again == result  # seeded
    same = paired_bootstrap(mean_metric(base), mean_metric(base), 800, samples=200, seed=3)
    assert same["delta_ci"] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# The command: errors before any model loads, and the whole report after the smoke training run
# ---------------------------------------------------------------------------------------------------------------
def evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO_ROOT / "recipes" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("dataset, message", [
    (None, "nothing to evaluate: no standard set could be loaded"),  # offline: all three standard sets skipped
    (["GBaker/MedQA-USMLE-4-options"], "could not load its test split from the Hugging Face Hub"),
    (["{bad}"], "unknown schema, columns ['foo']"),
])
def test_evaluate_fails_in_one_line(medical_smoke_run, tmp_path, capsys, dataset, message):
    adapter, _ = medical_smoke_run
    if dataset == ["{bad}"]:
        dataset = [str(tmp_path / "bad.jsonl")]
        (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main()(EvalArguments(adapter=str(adapter), output_dir=str(tmp_path / "out"), dataset_name=dataset))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_evaluate_refuses_a_folder_without_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main()(EvalArguments(adapter=str(tmp_path), output_dir=str(tmp_path / "out")))
    assert "not an adapter folder (no adapter_config.json)" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="limit must be > 0"):
        EvalArguments(adapter="a", output_dir="b", limit=0).check()
    with pytest.raises(RecipeError, match="eval_after_training_limit must be > 0"):
        parse_args(SMOKE, ["--eval_after_training_limit", "0"])


def test_base_is_loaded_as_it_was_trained(medical_smoke_run):
    adapter, _ = medical_smoke_run
    card = json.loads((adapter / "run_card.json").read_text())
    args = base_model_args(adapter, card, None)
    assert (args.model_name_or_path, args.load_in_4bit, args.bnb_4bit_quant_type, args.use_bnb_nested_quant,
            args.dtype) == ("data/tiny-llama", True, "nf4", True, "float32")
    assert base_model_args(adapter, card, "other/model").model_name_or_path == "other/model"


def test_evaluation_leaves_the_4bit_model_as_it_found_it(medical_smoke_run):
    adapter, _ = medical_smoke_run
    model, tokenizer, _ = load_for_evaluation(adapter, json.loads((adapter / "run_card.json").read_text()), None)
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    chats = [chat(options_question(), "B. option b"), chat("Why?", "Because it is.")]
    tasks = build_tasks("small", chat_rows(chats), medical, None, source="hand-built")
    compare(model, tokenizer, tasks, EvalArguments(adapter="unused", output_dir="unused", max_length=128,
                                                   max_new_tokens=4, bootstrap_samples=10))
    after = model.state_dict()
    assert model.training  # handed back in the mode it came in
    # bitsandbytes would repack the 4-bit weights for CPU inference, rounding their scales, if evaluation let it
    assert all(torch.equal(before[name], after[name]) for name in before), "evaluation changed the model"


@pytest.fixture
def gpu_seen(monkeypatch):
    """CUDA reported available (and `set_device` a no-op) without a GPU, on a fresh accelerate state both sides."""
    import bitsandbytes  # noqa: F401  (imported with CUDA seen, it would load its CUDA kernels)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_quantised_adapter_loads_onto_the_gpu_when_cuda_is_available(tiny_model, tmp_path, monkeypatch, gpu_seen):
    """On a CUDA machine the 4-bit base goes whole onto GPU 0. The loaders are intercepted: no GPU here."""
    import peft
    import transformers

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(TINY_MODEL)}))
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append(kwargs)
        return tiny_model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda base, folder: base)
    model, tokenizer, model_args = load_for_evaluation(adapter, None, None)  # no run card: 4-bit NF4, bf16
    assert model is tiny_model and model_args.load_in_4bit and model_args.dtype == "bfloat16"
    assert calls[0]["device_map"] == {"": 0} and calls[0]["quantization_config"].load_in_4bit
    assert calls[0]["trust_remote_code"] is False and tokenizer.chat_template


def check_report(output_dir, tasks: set[str]) -> dict:
    report = json.loads((output_dir / "eval_report.json").read_text())
    assert set(report["tasks"]) == tasks
    for name, task in report["tasks"].items():
        assert REPORT_KEYS <= set(task), name
        assert isinstance(task["n"], int) and task["n"] > 0
        for key in ("base", "adapter"):
            low, high = task[f"{key}_ci"]
            assert low <= task[key] <= high, (name, key)
        assert task["delta_ci"][0] <= task["adapter"] - task["base"] <= task["delta_ci"][1]
        assert task["metrics"][task["metric"]]["base"] == task["base"]
    markdown = (output_dir / "eval_report.md").read_text()
    assert "| task | metric | n | base | adapter | delta |" in markdown and "## Examples" in markdown
    assert all(f"### {name}" in markdown for name in tasks)
    assert (output_dir / "eval_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def test_training_saves_a_loss_curve_and_evaluates_its_held_out_split(medical_smoke_run):
    output_dir, proc = medical_smoke_run
    assert (output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = check_report(output_dir, {"held_out/multiple_choice", "held_out/yes-no-maybe", "held_out/open"})
    assert all(task["n"] <= 8 for task in report["tasks"].values())  # eval_after_training_limit in the smoke YAML
    assert report["quantization"].startswith("4-bit NF4") and report["skipped"]  # the Hub sets are off in the demo
    held_out = report["tasks"]["held_out/open"]["metrics"]["loss"]
    assert held_out["adapter"] < held_out["base"] - 1.0 and held_out["delta_ci"][1] < 0
    assert "Evaluation report (base vs adapter)" in proc.stdout


def test_adapter_beats_base_on_its_training_samples(medical_smoke_run, tmp_path, capsys):
    adapter, _ = medical_smoke_run
    files = [str(MEDICAL / name) for name in ("medqa.jsonl", "pubmedqa.jsonl", "flashcards.jsonl")]
    argv = ["--adapter", str(adapter), "--dataset_name", *files, "--limit", "12", "--output_dir", str(tmp_path)]
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)  # as the script parses them
    assert (args.dataset_name, args.limit, args.batch_size) == (files, 12, 8)
    evaluate_main()(args)  # in-process: the script's imports are already paid for
    report = check_report(tmp_path, {"medqa", "pubmedqa", "flashcards"})
    assert all(task["n"] == 12 and task["trained_on"] for task in report["tasks"].values())
    assert "is training data of this adapter" in capsys.readouterr().out
    # Memorisation after 30 steps: the reference answers became far more likely under the adapter
    loss = report["tasks"]["flashcards"]["metrics"]["loss"]
    assert loss["adapter"] < loss["base"] - 1.0 and loss["delta_ci"][1] < 0
    assert report["tasks"]["medqa"]["metric"] == "accuracy"
    assert report["tasks"]["pubmedqa"]["kind"] == "classification"
    assert set(report["tasks"]["flashcards"]["metrics"]) == {"rouge_l", "token_f1", "loss"}
