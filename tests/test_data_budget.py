"""The token-length pass (`TokenBudget`): measured in batches and in worker processes, it counts and drops exactly the
rows that tokenizing one row at a time, as TRL does, shows truncated or left without an answer token."""

import json

import pytest
from conftest import REPO_ROOT, TINY_MODEL

from data import medical
from lora_recipes import data as data_module
from lora_recipes.data import TokenBudget, prepare_data
from lora_recipes.tiny_model import FAMILIES

MAX_LENGTH = 64
SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.mark.parametrize("keep_end", [False, True])
def test_the_budget_counts_what_trl_cuts_in_worker_processes(tmp_path, tokenizer, monkeypatch, capfd, keep_end):
    # prompts, answers and follow-up questions of many lengths: some rows fit, some are cut inside the answer, some
    # lose it entirely (keep_start: a long prompt; keep_end: a long follow-up)
    chats = [[{"role": "user", "content": "Context. " * (i % 7 * 12) + f"Question {i}?"},
              {"role": "assistant", "content": "Word " * (i % 5 * 12 + 1) + "end."}]
             + [{"role": "user", "content": "Follow-up. " * (i % 3 * 20)}] * (i % 4 == 3) for i in range(60)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    # the reference: one row at a time, as TRL's SFTTrainer tokenizes, cut to the window it keeps
    window = slice(-MAX_LENGTH, None) if keep_end else slice(None, MAX_LENGTH)
    per_row = [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
               for chat in chats]
    truncated = sum(len(row["input_ids"]) > MAX_LENGTH for row in per_row)
    answered = [chat for chat, row in zip(chats, per_row, strict=True) if 1 in row["assistant_masks"][window]]
    assert 0 < truncated and 0 < len(chats) - len(answered) < truncated  # the fixture has every case
    processes, worth_processes = [], data_module.worth_processes

    def recording(num_proc, rows):
        processes.append(worth_processes(num_proc, rows))
        return processes[-1]

    monkeypatch.setattr(data_module, "MIN_ROWS_PER_PROCESS_POOL", 10)  # so that 60 rows use the worker processes
    monkeypatch.setattr(data_module, "worth_processes", recording)

    data = prepare_data([str(path)], medical.SCHEMAS, eval_fraction=0.0, num_proc=2,
                        budget=TokenBudget(tokenizer, MAX_LENGTH, keep_end=keep_end, assistant_only_loss=True))

    assert processes == [2, 2]  # the local file converted from Arrow in two processes, then measured in two
    assert "Measuring chats.jsonl in tokens" in capfd.readouterr().err  # its progress bar
    assert data.sources[0].truncated == truncated
    assert data.sources[0].dropped == {"answer cut off by max_length": len(chats) - len(answered)}
    assert data.train["messages"] == answered


def budget_chats(path, rows: int = 60) -> list[list[dict]]:
    """Prompts, answers and follow-ups of many lengths, written to `path`: at MAX_LENGTH some rows fit, some are cut
    inside the answer, some lose it entirely (keep_start: a long prompt; keep_end: a long follow-up)."""
    chats = [[{"role": "system", "content": "Answer briefly."}] * (i % 6 == 5)
             + [{"role": "user", "content": "Context. " * (i % 7 * 12) + f"Question {i}?"},
                {"role": "assistant", "content": "Word " * (i % 5 * 12 + 1) + "end."}]
             + [{"role": "user", "content": "Follow-up. " * (i % 3 * 20)}] * (i % 4 == 3) for i in range(rows)]
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return chats


def recipe_setup(model: str, output_dir, *overrides: str):
    """(training_args, model_args, tokenizer) of the smoke YAML on `model`, through the recipe's tokenizer loading."""
    from lora_recipes.config import parse_args
    from lora_recipes.model import load_tokenizer

    _, training_args, model_args = parse_args(SMOKE, ["--model_name_or_path", model, "--output_dir", str(output_dir),
                                                      *overrides])
    return training_args, model_args, load_tokenizer(model_args, training_args)


def messages_only(dataset):
    from datasets import Dataset

    return Dataset.from_dict({"messages": dataset["messages"]})


@pytest.mark.parametrize(("family", "keep_end"), [("tiny-llama", False), ("tiny-llama", True),
                                                  *((name, False) for name in sorted(FAMILIES))])
def test_sft_trainer_trains_on_the_budget_token_ids_exactly_as_on_its_own(tmp_path, family_models, family, keep_end):
    from trl import SFTTrainer

    from lora_recipes.model import load_model

    path = TINY_MODEL if family == "tiny-llama" else family_models[family]
    # the plain model, no adapter: two trainers share it, and only their datasets are compared
    _, _, tokenizer = recipe_setup(str(path), tmp_path)
    chats = budget_chats(tmp_path / "chats.jsonl")
    # the median row's length: half the rows are cut (a family's default system prompt lengthens every row)
    max_length = sorted(len(ids) for ids in tokenizer.apply_chat_template(chats, tokenize=True)["input_ids"])[30]
    training_args, model_args, tokenizer = recipe_setup(
        str(path), tmp_path, "--max_length", str(max_length), "--truncation_mode", "keep_end" if keep_end else
        "keep_start", "--load_in_4bit", "false")
    data = prepare_data([str(tmp_path / "chats.jsonl")], medical.SCHEMAS, eval_fraction=0.2,
                        budget=TokenBudget(tokenizer, max_length, keep_end=keep_end, assistant_only_loss=True))
    assert data.sources[0].truncated > 0
    model = load_model(model_args, training_args)
    reference = SFTTrainer(model=model, args=training_args, train_dataset=messages_only(data.train),
                           eval_dataset=messages_only(data.eval), processing_class=tokenizer)

    calls = []
    chat_template = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *args, **kwargs: calls.append(args) or chat_template(*args, **kwargs)
    handed = SFTTrainer(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
                        processing_class=tokenizer)
    del tokenizer.apply_chat_template

    rows = [*data.train["messages"], *data.eval["messages"]]
    assert not [args for args in calls if args and args[0] in rows]  # SFTTrainer tokenized no row: it took the ids
    for split in ("train_dataset", "eval_dataset"):
        ours, theirs = getattr(handed, split), getattr(reference, split)
        assert len(ours) > 0
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]


def test_the_first_step_loss_is_the_same_on_the_budget_token_ids(tmp_path):
    from trl import SFTTrainer, get_peft_config

    from lora_recipes.model import load_model

    budget_chats(tmp_path / "chats.jsonl")
    losses = []
    for handed in (True, False):
        training_args, model_args, tokenizer = recipe_setup(
            str(TINY_MODEL), tmp_path / str(handed), "--max_length", str(MAX_LENGTH), "--max_steps", "1",
            "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none")
        data = prepare_data([str(tmp_path / "chats.jsonl")], medical.SCHEMAS, eval_fraction=0.0,
                            budget=TokenBudget(tokenizer, MAX_LENGTH, assistant_only_loss=True))
        trainer = SFTTrainer(model=load_model(model_args, training_args), args=training_args,
                             train_dataset=data.train if handed else messages_only(data.train),
                             processing_class=tokenizer, peft_config=get_peft_config(model_args))
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
