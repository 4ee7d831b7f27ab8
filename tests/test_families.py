"""Every tokenizer family of the shipped model configs, with its published chat template, trains as it should: the
end-of-turn token is found, the system prompt reaches the model, a template that cannot be split into turns is
refused in one line, and the recipe trains and saves the template that chat and evaluation use. The assistant mask
of every family is tested in tests/test_assistant_mask.py."""

import pytest
from conftest import REPO_ROOT

from lora_recipes.config import parse_args
from lora_recipes.errors import RecipeError
from lora_recipes.model import load_tokenizer
from lora_recipes.templates import end_of_turn_token, end_of_turn_token_id
from lora_recipes.tiny_model import FAMILIES

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
SYSTEM = "Answer as a careful clinician."
CHATS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which test confirms gout?"},
     {"role": "assistant", "content": "Joint aspiration."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "First question?"},
     {"role": "assistant", "content": "First answer."},
     {"role": "user", "content": "Second question, a longer one this time?"},
     {"role": "assistant", "content": "Second answer."}],
]
# Families whose template has no system role (Gemma) or writes it only before the last user turn (Mistral v0.3)
FOLDS_SYSTEM = {"gemma2", "mistral"}
families = pytest.mark.parametrize("family", sorted(FAMILIES))


def family_tokenizer(path, tmp_path, *overrides):
    _, training_args, model_args = parse_args(SMOKE, ["--model_name_or_path", str(path), "--output_dir",
                                                      str(tmp_path), *overrides])
    return load_tokenizer(model_args, training_args)


@families
def test_end_of_turn_token_and_a_pad_that_stops_nothing(family, family_models, tmp_path):
    tokenizer = family_tokenizer(family_models[family], tmp_path)
    assert end_of_turn_token(tokenizer) == FAMILIES[family].end_of_turn
    assert tokenizer.eos_token == FAMILIES[family].eos
    # without a pad token (Llama 3) SFTTrainer pads with EOS
    pad = tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id
    assert pad != end_of_turn_token_id(tokenizer)


@families
def test_system_prompt_reaches_the_model_once_and_folds_only_where_needed(family, family_models, tmp_path, capsys):
    tokenizer = family_tokenizer(family_models[family], tmp_path)
    notes = capsys.readouterr().out
    folded = "the system prompt is folded into the first user turn" in notes
    assert folded == (family in FOLDS_SYSTEM) and notes.count("folded") <= 1
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        assert full.startswith(prompt) and full.count(SYSTEM) == 1
        if folded:
            assert f"{SYSTEM}\n\n{chat[1]['content']}" in full


def test_gemma2_fold_renders_as_the_published_template_would_a_folded_chat(family_models, tmp_path):
    from transformers import AutoTokenizer

    published = AutoTokenizer.from_pretrained(family_models["gemma2"])
    with pytest.raises(Exception, match="System role not supported"):
        published.apply_chat_template(CHATS[0], tokenize=False)
    tokenizer = family_tokenizer(family_models["gemma2"], tmp_path)
    for chat in CHATS:
        by_hand = [{"role": "user", "content": f"{SYSTEM}\n\n{chat[1]['content']}"}, *chat[2:]]
        for prefix in (by_hand[:1], by_hand):
            ours = chat[:2] if len(prefix) == 1 else chat
            assert (tokenizer.apply_chat_template(ours, add_generation_prompt=len(prefix) == 1)
                    == published.apply_chat_template(prefix, add_generation_prompt=len(prefix) == 1))


def test_mistral_published_template_drops_the_system_prompt_from_a_chat_that_ends_with_an_answer(family_models):
    from transformers import AutoTokenizer

    published = AutoTokenizer.from_pretrained(family_models["mistral"])
    assert SYSTEM in published.apply_chat_template(CHATS[0][:2], tokenize=False, add_generation_prompt=True)
    assert SYSTEM not in published.apply_chat_template(CHATS[0], tokenize=False)  # what training would have seen


def test_chatml_without_markers_trains_with_the_bundled_template_and_its_default_system_prompt(family_models,
                                                                                                tmp_path, capsys):
    from transformers import AutoTokenizer

    published = AutoTokenizer.from_pretrained(family_models["qwen2"])
    tokenizer = family_tokenizer(family_models["qwen2"], tmp_path)
    assert "ChatML without {% generation %} markers: training with lora_recipes/chat_templates/chatml.jinja " \
           "(the model's default system prompt kept)" in capsys.readouterr().out
    no_system = [m for m in CHATS[1] if m["role"] != "system"]
    assert (tokenizer.apply_chat_template(no_system, tokenize=False)
            == published.apply_chat_template(no_system, tokenize=False))
    assert "You are a helpful assistant." in tokenizer.apply_chat_template(no_system[:1], tokenize=False)


def test_template_that_rewrites_earlier_turns_is_refused_in_one_line(family_models, tmp_path):
    # Like templates that drop the reasoning of earlier answers: an answer renders differently once a turn follows
    template = tmp_path / "rewrites-history.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'][:5] }}{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(RecipeError, match=r"cannot be split into turns \(the chat template does not preserve "
                                          r"prefixes.*\): pass --chat_template_path") as error:
        family_tokenizer(family_models["qwen2"], tmp_path, "--chat_template_path", str(template))
    assert "\n" not in str(error.value)


@families
def test_recipe_trains_each_family_and_saves_the_template_chat_and_evaluation_use(family, family_models, tmp_path):
    from transformers import AutoTokenizer

    from data import medical
    from lora_recipes.sft import main

    output_dir = tmp_path / "adapter"
    # plain LoRA, short rows, 2 steps: the point is the tokenizer and template on the real recipe path
    trainer = main(medical, *parse_args(SMOKE, [
        "--model_name_or_path", str(family_models[family]), "--output_dir", str(output_dir),
        "--dataset_name", "data/samples/medical/medqa.jsonl", "--max_steps", "2", "--per_device_train_batch_size",
        "2", "--max_length", "256", "--load_in_4bit", "false", "--activation_checkpointing", "false",
        "--eval_strategy", "no", "--save_strategy", "no", "--eval_after_training", "false"]))
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # PEFT starts B at zero: non-zero means trained
    saved = AutoTokenizer.from_pretrained(output_dir)
    assert saved.chat_template == trainer.processing_class.chat_template
    assert end_of_turn_token(saved) == FAMILIES[family].end_of_turn
    prompt = saved.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q?"}],
                                       tokenize=False, add_generation_prompt=True)
    assert prompt.count(SYSTEM) == 1
