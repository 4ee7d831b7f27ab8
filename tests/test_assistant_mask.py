"""The loss covers exactly the assistant turns and their EOS, nothing else (prompt, system, padding)."""

import re

import pytest
from conftest import REPO_ROOT, TINY_MODEL

from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.model import load_model, load_tokenizer

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which test confirms gout?"},
     {"role": "assistant", "content": "Joint aspiration."}],
    [{"role": "user", "content": "First question?"}, {"role": "assistant", "content": "First answer."},
     {"role": "user", "content": "Second question, a longer one this time?"},
     {"role": "assistant", "content": "Second answer."}],
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    _, training_args, model_args = parse_args(SMOKE, ["--output_dir", str(tmp_path_factory.mktemp("mask")),
                                                      "--eval_strategy", "no"])
    tokenizer = load_tokenizer(model_args, training_args)
    return SFTTrainer(model=load_model(model_args, training_args), args=training_args,
                      train_dataset=Dataset.from_list([{"messages": c} for c in CHATS]),
                      processing_class=tokenizer, peft_config=get_peft_config(model_args))


def test_labels_are_exactly_the_assistant_turns_with_eos(trainer):
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(CHATS))])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for row, chat in enumerate(CHATS):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        expected = "".join(m["content"] + tokenizer.eos_token for m in chat if m["role"] == "assistant")
        assert tokenizer.decode(kept) == expected
        assert kept.count(tokenizer.eos_token_id) == sum(m["role"] == "assistant" for m in chat)
    # the shorter row is padded, and padding never counts
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all()


def test_template_with_no_end_of_turn_token_and_no_known_family_fails_clearly(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    _, training_args, model_args = parse_args(SMOKE, ["--output_dir", str(tmp_path),
                                                      "--chat_template_path", str(template)])
    with pytest.raises(RecipeError, match="never learn to stop: pass --chat_template_path FILE.jinja with "
                                          "\\{% generation %\\} markers"):
        load_tokenizer(model_args, training_args)


def test_end_of_turn_token_is_where_the_assistant_mask_ends_not_eos():
    from transformers import AutoTokenizer

    from lora_recipes.templates import end_of_turn_token, end_of_turn_token_id

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (end_of_turn_token(tokenizer), end_of_turn_token_id(tokenizer)) == ("<|im_end|>", im_end)
    # ChatML models often declare another EOS (`<|endoftext|>`); the turn still ends on <|im_end|>
    tokenizer.eos_token = "<|pad|>"
    assert end_of_turn_token_id(tokenizer) == im_end


def test_spans_derived_from_a_template_without_markers_equal_the_marked_template():
    from transformers import AutoTokenizer

    from lora_recipes.templates import PROBE, assistant_mask

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    unmarked = re.sub(r"\{%-? */?(end)?generation *-?%\}", "", tokenizer.chat_template)
    assert "generation" not in unmarked.replace("add_generation_prompt", "")
    for chat in [PROBE, *CHATS]:
        ids, mask = assistant_mask(tokenizer, chat)
        assert assistant_mask(tokenizer, chat, unmarked) == (ids, mask)
        assert 0 < sum(mask) < len(ids)
