"""The loss covers exactly the assistant turns and their EOS, nothing else (prompt, system, padding)."""

import pytest
from conftest import REPO_ROOT

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


def test_template_without_markers_and_no_known_family_fails_clearly(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    _, training_args, model_args = parse_args(SMOKE, ["--output_dir", str(tmp_path),
                                                      "--chat_template_path", str(template)])
    with pytest.raises(RecipeError, match="no \\{% generation %\\} markers"):
        load_tokenizer(model_args, training_args)
