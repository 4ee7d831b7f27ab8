"""Using a trained adapter: merge and export, the model card, generation, chat, several adapters on one base."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY_MODEL

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.inference import (
    ChatModel,
    GenerationArguments,
    Request,
    conversation,
    plain_chat_template,
    read_adapter,
    read_adapters,
    with_system_prompt,
)
from lora_recipes.model_card import read_eval_report, render
from lora_recipes.sft import main as train
from recipes import chat, merge

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
EVAL_REPORT = {"tasks": {"medqa": {"metric": "accuracy", "n": 11, "base": 0.273, "adapter": 0.455,
                                   "base_ci": [0.06, 0.61], "adapter_ci": [0.17, 0.77], "delta_ci": [-0.09, 0.45]}}}
QUESTIONS = ["What causes scurvy?", "Which test confirms hypothyroidism?", "Define tachycardia.",
             "What is the first-line treatment for anaphylaxis?", "Is aspirin safe in children?", "What is a stroke?"]
SAMPLING = GenerationArguments(max_new_tokens=10, seed=0)


def run_script(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300)


def eos_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def load_4bit_base():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, quantization_config=quant, dtype=torch.float32)


def first_question(tokenizer) -> dict:
    messages = [{"role": "system", "content": medical.SYSTEM_PROMPT},
                {"role": "user", "content": "Name the vitamin that prevents rickets."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.fixture(scope="module")
def adapter_dir(medical_smoke_run, tmp_path_factory):
    """The smoke run's adapter (no checkpoints) with an evaluation report in the evaluation recipe's format."""
    output_dir, _ = medical_smoke_run
    folder = tmp_path_factory.mktemp("adapters") / "medical-smoke"
    shutil.copytree(output_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    (folder / "eval_report.json").write_text(json.dumps(EVAL_REPORT))
    return folder


@pytest.fixture(scope="module")
def merged_run(adapter_dir, tmp_path_factory):
    """recipes/merge.py as a user runs it: default 4-bit path, small shards, a push dry run."""
    output_dir = tmp_path_factory.mktemp("merged") / "medical-smoke-merged"
    proc = run_script("recipes/merge.py", "--adapter", str(adapter_dir), "--output_dir", str(output_dir),
                      "--max_shard_size", "500KB", "--push_to_hub", "--dry_run",
                      "--hub_model_id", "lora-recipes/medical-smoke-merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, proc


@pytest.fixture(scope="module")
def plain_lora_adapter(tmp_path_factory):
    """A plain LoRA adapter (unquantised base), trained in-process for a few steps."""
    output_dir = tmp_path_factory.mktemp("plain-lora")
    train(medical, *parse_args(SMOKE, ["--output_dir", str(output_dir), "--load_in_4bit", "false", "--max_steps",
                                       "3", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                                       "--save_strategy", "no"]))
    return output_dir


def test_merge_cli_writes_a_verified_standalone_model(merged_run, adapter_dir):
    from transformers import AutoTokenizer

    output_dir, proc = merged_run
    difference = float(re.search(r"max \|logit difference\| = (\S+)", proc.stdout).group(1))
    assert 0 < difference < merge.TOLERANCE["float32"]
    assert len(list(output_dir.glob("model-*-of-*.safetensors"))) >= 2
    assert (output_dir / "model.safetensors.index.json").is_file()
    assert not list(output_dir.glob("adapter_*")) and not list(output_dir.glob("*.bin"))
    assert "quantization_config" not in json.loads((output_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    generation = json.loads((output_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == eos_id(tokenizer) == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|pad|>") != eos_id(tokenizer)
    assert tokenizer.chat_template == plain_chat_template((adapter_dir / "chat_template.jinja").read_text())
    record = json.loads((output_dir / "run_card.json").read_text())["merge"]
    assert record["merge_into"] == "dequantized" and record["max_logit_difference"] == pytest.approx(difference,
                                                                                                     rel=1e-3)
    assert record["adapter_effect"] > 100 * difference  # the check compares something the adapter changes
    card = (output_dir / "README.md").read_text()
    assert f"would push the merged {output_dir} to lora-recipes/medical-smoke-merged:" in proc.stdout
    assert card in proc.stdout and "## Merge" in card and "| medqa | accuracy | 11 |" in card


def test_merged_folder_loads_with_plain_transformers_and_gives_the_same_logits(merged_run, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, _ = merged_run
    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [n for n, _ in merged.named_parameters() if "lora" in n or "base_layer" in n]
    original = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                           original.model.layers[0].self_attn.q_proj.weight)  # the update is in the weights
    inputs = first_question(AutoTokenizer.from_pretrained(output_dir))  # not one of merge.py's check prompts
    trained = PeftModel.from_pretrained(load_4bit_base(), adapter_dir).eval()
    with torch.no_grad():
        expected, actual = trained(**inputs).logits, merged(**inputs).logits
        with trained.disable_adapter():
            base = trained(**inputs).logits
    assert (actual - expected).abs().max() < merge.TOLERANCE["float32"]
    assert (base - expected).abs().max() > 1.0


def test_merge_into_original_weights_on_request(adapter_dir, merged_run, tmp_path):
    record = merge.run(["--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "original"),
                        "--merge_into", "original"])
    default = json.loads((merged_run[0] / "run_card.json").read_text())["merge"]
    assert record["merge_into"] == "original"
    assert record["max_logit_difference"] < 1e-4  # exactly original weights + adapter
    # ... which is not what training saw: the 4-bit default is far closer to it
    assert record["difference_from_training"] > 10 * default["max_logit_difference"]
    assert "train/inference mismatch" in (tmp_path / "original" / "README.md").read_text()


def test_merge_of_a_plain_lora_adapter(plain_lora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    record = merge.run(["--adapter", str(plain_lora_adapter), "--output_dir", str(tmp_path / "merged")])
    assert record["merge_into"] == "original" and record["difference_from_training"] is None
    assert record["max_logit_difference"] < 1e-4 < record["adapter_effect"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.float32
    assert "none: plain LoRA on float32 weights" in (tmp_path / "merged" / "README.md").read_text()


def test_merge_fails_outside_the_tolerance(adapter_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge.run(["--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "out"), "--tolerance", "1e-7"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of model loading
    assert exit_info.value.code == 2 and err.startswith("error: the merged model in") and "> tolerance 1e-07" in err


def test_push_fails_offline_before_merging(adapter_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge.run(["--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "out"), "--push_to_hub"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --push_to_hub: HF_HUB_OFFLINE is set")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_model_card_has_the_numbers_of_the_run(adapter_dir):
    adapter = read_adapter(adapter_dir)
    card = render(adapter, kind="adapter", name="you/medical-smoke", eval_report=read_eval_report(adapter_dir))
    sources = adapter.run_card["data"]
    assert len(sources) == 4
    for s in sources:
        assert f"| `{s['source']}` | {s['schema']} | {s['read']} | {s['kept']} |" in card
        assert f"| {s['train']} | {s['eval']} |" in card
    assert "| 80 | 77 | 3 unlabelled (cop = -1) |" in card  # medmcqa: 3 rows without a label
    assert "r=16, alpha=32, dropout=0.05" in card and "4-bit NF4, double quantisation" in card
    assert f"train {adapter.run_card['metrics']['train_loss']:.3f}" in card
    assert "| medqa | accuracy | 11 | 0.273 [0.060, 0.610] | 0.455 [0.170, 0.770] | +0.182 [-0.090, +0.450] |" in card
    assert "library_name: peft" in card and "not professional advice" in card and "SYNTHETIC" in card
    code = card.split("```python\n")[1].split("```")[0]
    compile(code, "model card", "exec")  # the usage snippet is valid Python


def test_a_malformed_eval_report_is_a_one_line_error(adapter_dir, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    (folder / "eval_report.json").write_text(json.dumps({"tasks": {"medqa": {**EVAL_REPORT["tasks"]["medqa"],
                                                                             "n": "11"}}}))
    with pytest.raises(RecipeError, match=r"eval_report.json: task 'medqa': field 'n': expected an integer"):
        read_eval_report(folder)


@pytest.fixture(scope="module")
def medical_chat(adapter_dir):
    return ChatModel.load(read_adapters([f"medical={adapter_dir}"]))


def test_generation_stops_at_eos(medical_chat):
    eos = eos_id(medical_chat.tokenizer)
    assert medical_chat.generation_config(SAMPLING).eos_token_id[0] == eos
    conversations = [conversation(q, medical.SYSTEM_PROMPT) for q in QUESTIONS]
    answers = medical_chat.generate(conversations, SAMPLING, "medical")
    for answer in answers:
        assert eos not in answer.token_ids[:-1]
        assert medical_chat.tokenizer.pad_token_id not in answer.token_ids
        if answer.finish_reason == "eos":
            assert answer.token_ids[-1] == eos
        else:
            assert answer.finish_reason == "length" and len(answer.token_ids) == SAMPLING.max_new_tokens
    assert any(a.finish_reason == "eos" for a in answers)  # the adapter learned to end its turn


def test_two_adapters_on_one_base_answer_as_each_does_alone(medical_smoke_run, medical_chat, tmp_path):
    output_dir, _ = medical_smoke_run
    rows = [{"prompt": q} for q in QUESTIONS[:3]] + [{"prompt": q, "adapter": "early"} for q in QUESTIONS[:3]]
    rows[1] = {"id": "m2", "messages": [{"role": "user", "content": QUESTIONS[1]}]}
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat.run(["--adapter", f"medical={output_dir}", "--adapter", f"early={output_dir / 'checkpoint-15'}",
              "--input", str(tmp_path / "requests.jsonl"), "--output", str(tmp_path / "answers.jsonl"),
              "--max_new_tokens", str(SAMPLING.max_new_tokens), "--batch_size", "2"])
    answered = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["adapter"] for a in answered] == ["medical"] * 3 + ["early"] * 3 and answered[1]["id"] == "m2"

    early_chat = ChatModel.load(read_adapters([f"early={output_dir / 'checkpoint-15'}"]))
    for name, alone in (("medical", medical_chat), ("early", early_chat)):
        requests = [Request(with_system_prompt(r["messages"], medical.SYSTEM_PROMPT) if "messages" in r
                            else conversation(r["prompt"], medical.SYSTEM_PROMPT), name)
                    for r in rows if r.get("adapter", "medical") == name]
        expected = alone.answer(requests, SAMPLING, batch_size=2)
        assert [(a["answer"], a["finish_reason"]) for a in answered if a["adapter"] == name] == [
            (e.text, e.finish_reason) for e in expected]
    assert [a["answer"] for a in answered[:3]] != [a["answer"] for a in answered[3:]]  # the adapters differ


def streamed_answers(stdout: str) -> list[str]:
    return [part.split("\n", 1)[0].strip() for part in stdout.split("assistant> ")[1:]]


def test_interactive_chat_streams_switches_adapter_and_exits(medical_smoke_run, medical_chat):
    output_dir, _ = medical_smoke_run
    proc = run_script("recipes/chat.py", "--adapter", f"medical={output_dir}", "--adapter",
                      f"early={output_dir / 'checkpoint-15'}", "--max_new_tokens", str(SAMPLING.max_new_tokens),
                      stdin="What causes scurvy?\n/adapter legal\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("you> ") == 3  # the line after /exit is never read
    assert "error: unknown adapter 'legal' (loaded: medical, early)" in proc.stdout
    (answer,) = medical_chat.generate([conversation("What causes scurvy?", medical.SYSTEM_PROMPT)], SAMPLING,
                                      "medical")
    assert streamed_answers(proc.stdout) == [answer.text]


def test_interactive_chat_with_a_merged_model_ends_at_end_of_input(merged_run):
    output_dir, _ = merged_run
    proc = run_script("recipes/chat.py", "--model_name_or_path", str(output_dir), "--max_new_tokens", "12",
                      "--greedy", "--system_prompt", "Answer in one word.", stdin="What causes scurvy?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = ChatModel.load([], str(output_dir))
    greedy = GenerationArguments(max_new_tokens=12, greedy=True, system_prompt="Answer in one word.")
    (answer,) = merged.generate([conversation("What causes scurvy?", "Answer in one word.")], greedy)
    assert streamed_answers(proc.stdout) == [answer.text]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: invalid JSON"),
    ('["What causes scurvy?"]', "line 2: expected a JSON object, got list"),
    ('{"question": "What causes scurvy?"}', "line 2: needs exactly one of the fields 'prompt'"),
    ('{"prompt": ""}', "line 2: field 'prompt': expected a non-empty string"),
    ('{"messages": [{"role": "assistant", "content": "Hi"}]}', "line 2: field 'messages': the last message"),
    ('{"prompt": "Hi", "adapter": "legal"}', "line 2: field 'adapter': unknown adapter 'legal' (loaded: medical)"),
])
def test_a_bad_request_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "What causes scurvy?"}\n' + line + "\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}: {message}")):
        chat.read_requests(path, ["medical"], "medical")


def test_chat_checks_requests_before_loading_the_model(adapter_dir, tmp_path, capsys):
    (tmp_path / "requests.jsonl").write_text('{"prompt": "Hi", "adapter": "legal"}\n')
    with pytest.raises(SystemExit) as exit_info:
        chat.run(["--adapter", str(adapter_dir), "--input", str(tmp_path / "requests.jsonl"), "--output",
                  str(tmp_path / "answers.jsonl")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "line 1: field 'adapter': unknown adapter 'legal' (loaded: medical-smoke)" in err


def test_adapters_on_one_base_must_share_it(adapter_dir, plain_lora_adapter):
    with pytest.raises(RecipeError, match="the name twin is used twice"):
        read_adapters([f"twin={adapter_dir}", f"twin={plain_lora_adapter}"])
    with pytest.raises(RecipeError, match="were trained on different bases"):
        ChatModel.load(read_adapters([f"qlora={adapter_dir}", f"lora={plain_lora_adapter}"]))
