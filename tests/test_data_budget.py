"""The token-length pass (`TokenBudget`): measured in batches and in worker processes, it counts and drops exactly the
rows that tokenizing one row at a time, as TRL does, shows truncated or left without an answer token."""

import json

import pytest
from conftest import TINY_MODEL

from data import medical
from lora_recipes import data as data_module
from lora_recipes.data import TokenBudget, prepare_data

MAX_LENGTH = 64


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
