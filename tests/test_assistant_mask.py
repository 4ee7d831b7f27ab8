"""The loss covers exactly each assistant turn and its end-of-turn token, nothing else (prompt, system, padding), in
the bundled tiny model and in every tokenizer family (lora_recipes.tiny_model.FAMILIES)."""

import re

import pytest
from conftest import REPO_ROOT, TINY_MODEL

from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.model import load_model, load_tokenizer
from lora_recipes.templates import end_of_turn_token_id
from lora_recipes.tiny_model import FAMILIES

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which test confirms gout?"},
     {"role": "assistant", "content": "Joint aspiration."}],
    [{"role": "user", "content": "First question?"}, {"role": "assistant", "content": "First answer."},
     {"role": "user", "content": "Second question, a longer one this time?"},
     {"role": "assistant", "content": "Second answer."}],
]
# Phi-3's template writes EOS after the conversation's last turn, and TRL's training variant trains it
EOS_AFTER_LAST_TURN = {"phi3"}


@pytest.fixture(scope="module", params=["tiny-llama", *sorted(FAMILIES)])
def trainer(request, family_models, tmp_path_factory):
    """(model name, SFTTrainer on the two chats), through the recipe's tokenizer and model loading."""
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    path = TINY_MODEL if request.param == "tiny-llama" else family_models[request.param]
    _, training_args, model_args = parse_args(SMOKE, ["--model_name_or_path", str(path), "--output_dir",
                                                      str(tmp_path_factory.mktemp("mask")), "--eval_strategy", "no"])
    tokenizer = load_tokenizer(model_args, training_args)
    return request.param, SFTTrainer(model=load_model(model_args, training_args), args=training_args,
                                     train_dataset=Dataset.from_list([{"messages": c} for c in CHATS]),
                                     processing_class=tokenizer, peft_config=get_peft_config(model_args))


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The token ids of each contiguous masked span."""
    runs, previous = [], False
    for token_id, keep in zip(ids, mask, strict=True):
        if keep:
            if not previous:
                runs.append([])
            runs[-1].append(token_id)
        previous = keep
    return runs


def test_labels_are_exactly_each_assistant_turn_and_its_end_of_turn_token(trainer):
    name, trainer = trainer
    tokenizer = trainer.processing_class
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn if name in FAMILIES else "<|im_end|>")
    assert end_of_turn_token_id(tokenizer) == eot
    assert tokenizer.pad_token_id != eot  # (Llama 3 has no pad token: TRL pads with its EOS, which ends no turn)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(CHATS))])
    for row, chat in enumerate(CHATS):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        runs = masked_runs(ids, [label != -100 for label in labels])
        answers = [m["content"] for m in chat if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for number, (run, answer) in enumerate(zip(runs, answers, strict=True), 1):
            kept = [i for i in run if tokenizer.decode([i]).strip()]  # a blank around the turn may count or not
            tail = [eot, tokenizer.eos_token_id] if name in EOS_AFTER_LAST_TURN and number == len(runs) else [eot]
            assert kept[-len(tail):] == tail
            assert tokenizer.decode(kept[:-len(tail)]).strip() == answer
        prompt = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == -100])
        assert all(m["content"] in prompt for m in chat if m["role"] != "assistant")
        assert not any(m["content"] in prompt for m in chat if m["role"] == "assistant")
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
