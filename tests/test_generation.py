"""Generation everywhere (chat, evaluation, the merged model): where it stops, which settings it uses, the exported
template and the system prompt."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.evaluation import greedy_generations
from lora_recipes.inference import ChatModel, GenerationArguments, conversation, plain_chat_template, read_adapter
from lora_recipes.model_card import render
from lora_recipes.sft import main as train
from lora_recipes.templates import CHAT_TEMPLATES, CHATML_TEMPLATE, derive_assistant_spans, fold_system_prompt
from recipes import chat, merge

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "medical_smoke.yaml"
TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
IMAGE_TEXT_TEMPLATES = ("idefics3_training", "llava_next_training", "smolvlm_training")  # contents: lists of parts
GENERATION_TAG = re.compile(r"\{%[-+]?\s*(?:end)?generation\s*[-+]?%\}")
QUESTION = "What causes scurvy?"
GREEDY = GenerationArguments(max_new_tokens=8, greedy=True)
# Settings an instruct model ships in its generation_config.json (as Qwen2.5-Instruct does), all of which change the
# tokens picked; a generation that says what it wants must use none of them.
SHIPPED_SETTINGS = {"do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "min_p": 0.2, "typical_p": 0.9,
                    "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 6}


class Scripted:
    """Makes a model emit `script` (then its last token forever), one token per forward pass of a generate call."""

    def __init__(self, model, script: list[int]):
        self.script, self.step = script, 0
        model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, logits):
        bias = torch.zeros(logits.shape[-1])
        bias[self.script[min(self.step, len(self.script) - 1)]] = 1e4
        self.step += 1
        return logits + bias


def first_token(tokenizer, text: str) -> int:
    return tokenizer.encode(text, add_special_tokens=False)[0]


def prompt_ids(tokenizer, system_prompt: str | None = None) -> list[int]:
    return tokenizer.apply_chat_template(conversation(QUESTION, system_prompt), add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


@pytest.fixture(scope="module")
def chatml_base(tmp_path_factory):
    """The tiny model as a ChatML *base* model (as Qwen2.5-1.5B): EOS `<|endoftext|>`, turns end with `<|im_end|>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("chatml-base")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids("<|im_end|>")
    return folder


def scripted(folder: Path):
    """(model, tokenizer, answer ids): the model says one token, ends its turn, then would go on talking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = [first_token(tokenizer, "Vitamin"), end_of_turn, first_token(tokenizer, " more")]
    Scripted(model, script)
    return model, tokenizer, script[:2]


@pytest.fixture(scope="module")
def chatml_merged(chatml_base, tmp_path_factory):
    """An adapter trained on the ChatML base for two steps with the medical recipe, merged by recipes/merge.py."""
    adapter = tmp_path_factory.mktemp("chatml-adapter")
    train(medical, *parse_args(SMOKE, ["--model_name_or_path", str(chatml_base), "--output_dir", str(adapter),
                                       "--load_in_4bit", "false", "--max_steps", "2", "--eval_strategy", "no",
                                       "--save_strategy", "no", "--eval_after_training", "false"]))
    output_dir = tmp_path_factory.mktemp("chatml-merged") / "merged"
    merge.run(["--adapter", str(adapter), "--output_dir", str(output_dir)])
    return adapter, output_dir


def test_chat_stops_at_the_end_of_turn_token_of_the_template(chatml_base):
    model, tokenizer, answer_ids = scripted(chatml_base)
    (answer,) = ChatModel(model, tokenizer, {None: None}).generate([conversation(QUESTION, None)], GREEDY)
    assert answer.token_ids == answer_ids and answer.finish_reason == "eos"
    assert answer.text == tokenizer.decode(answer_ids[0]).strip()


def test_evaluation_stops_at_the_end_of_turn_token_of_the_template(chatml_base):
    model, tokenizer, answer_ids = scripted(chatml_base)
    generated = []
    original = model.generate
    model.generate = lambda **kwargs: generated.append(original(**kwargs)) or generated[-1]
    prompt = prompt_ids(tokenizer)
    (text,) = greedy_generations(model, tokenizer, [prompt], [8], batch_size=1)
    assert generated[0][0, len(prompt):].tolist() == answer_ids
    assert text == tokenizer.decode(answer_ids[0]).strip()


def test_merged_model_stops_at_the_end_of_turn_token_of_the_template(chatml_merged):
    from transformers import AutoTokenizer

    _, merged = chatml_merged
    tokenizer = AutoTokenizer.from_pretrained(merged)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert eos[0] == end_of_turn and tokenizer.eos_token_id in eos
    # plain transformers, no settings passed: the merged model's own generation config ends the answer
    model, tokenizer, answer_ids = scripted(merged)
    prompt = prompt_ids(tokenizer)
    output = model.generate(torch.tensor([prompt]), max_new_tokens=8)
    assert output[0, len(prompt):].tolist() == answer_ids


def rendered_text(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool) -> str:
    """The rendered text, or the error the template raises (e.g. Gemma's for a system turn)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        return f"{type(e).__name__}: {e}"


def test_chat_with_the_merged_model_stops_at_the_end_of_turn_token(chatml_merged):
    _, merged = chatml_merged
    chat_model = ChatModel.load([], str(merged))
    end_of_turn = chat_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = [first_token(chat_model.tokenizer, "Vitamin"), end_of_turn, first_token(chat_model.tokenizer, " more")]
    Scripted(chat_model.model, script)
    (answer,) = chat_model.generate([conversation(QUESTION, None)], GREEDY)
    assert answer.token_ids == script[:2] and answer.finish_reason == "eos"


def test_model_card_code_stops_at_the_end_of_turn_token(chatml_merged, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    adapter, _ = chatml_merged
    code = render(read_adapter(adapter), kind="adapter", name=str(adapter)).split("```python\n")[1].split("```")[0]
    calls = []
    original = LlamaForCausalLM.generate

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    exec(code, {})  # the card's snippet as a user runs it (base and adapter are local folders here)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert calls[0]["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id


def training_templates() -> dict[str, str]:
    """Every kind of template training uses: bundled ChatML, TRL's training variants, markers derived from a
    family's template (with the system prompt folded in, as for Mistral)."""
    templates = {"chatml": CHATML_TEMPLATE.read_text(encoding="utf-8")}
    templates |= {t.stem: t.read_text(encoding="utf-8") for t in TRL_TEMPLATES.glob("*_training.jinja")
                  if t.stem not in IMAGE_TEXT_TEMPLATES}
    for family in (CHAT_TEMPLATES / "families").glob("*.jinja"):
        derived = derive_assistant_spans(family.read_text(encoding="utf-8"))
        templates |= {f"{family.stem}-derived": derived, f"{family.stem}-derived-folded": fold_system_prompt(derived)}
    return templates


@pytest.mark.parametrize("name", sorted(training_templates()))
def test_plain_template_renders_as_the_training_template(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    training = training_templates()[name]
    plain = plain_chat_template(training)
    assert GENERATION_TAG.search(training) and not GENERATION_TAG.search(plain)
    chats = [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "Hello.\n"}], False),
        ([{"role": "user", "content": "  Hi?"}, {"role": "assistant", "content": " Hello. "},
          {"role": "user", "content": "And?\n"}], True),
    ]
    rendered = [[rendered_text(tokenizer, messages, t, add_generation_prompt) for t in (training, plain)]
                for messages, add_generation_prompt in chats]
    assert all(a == b for a, b in rendered)
    assert any("Hello." in a for a, _ in rendered)  # not only errors: the template renders these chats


def test_merged_model_ships_the_plain_template(chatml_merged):
    from transformers import AutoTokenizer

    adapter, merged = chatml_merged
    training = AutoTokenizer.from_pretrained(adapter).chat_template
    exported = AutoTokenizer.from_pretrained(merged).chat_template
    assert GENERATION_TAG.search(training) and exported == plain_chat_template(training)


@pytest.fixture
def opinionated_model(tmp_path):
    """The tiny model with sampling settings in its generation_config.json."""
    folder = tmp_path / "opinionated"
    shutil.copytree(TINY_MODEL, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **SHIPPED_SETTINGS}))
    return folder


SETTINGS = ("penalty", "temperature", "top_p", "min_p", "min_length")  # the setting of each kind of logits processor


def record_logits_processors(monkeypatch, model) -> list:
    """The logits processors each generate call of `model` builds, as (name, setting) pairs."""
    calls = []
    original = model._get_logits_processor

    def recording(*args, **kwargs):
        processors = original(*args, **kwargs)
        calls.append([(type(p).__name__, next((getattr(p, a) for a in SETTINGS if hasattr(p, a)), None))
                      for p in processors])
        return processors

    monkeypatch.setattr(model, "_get_logits_processor", recording)
    return calls


def manual_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop:
                break
    return ids[len(prompt):]


def test_chat_uses_its_own_settings_not_the_models(opinionated_model, monkeypatch):
    chat_model = ChatModel.load([], str(opinionated_model))
    calls = record_logits_processors(monkeypatch, chat_model.model)
    sampling = GenerationArguments(max_new_tokens=4)
    chat_model.generate([conversation(QUESTION, None)], sampling)
    chat_model.generate([conversation(QUESTION, None)], GREEDY)
    no_minimum = ("MinLengthLogitsProcessor", len(prompt_ids(chat_model.tokenizer)))  # min_new_tokens 0
    assert calls == [
        [("RepetitionPenaltyLogitsProcessor", sampling.repetition_penalty), no_minimum,
         ("TemperatureLogitsWarper", sampling.temperature), ("TopPLogitsWarper", sampling.top_p),
         ("MinPLogitsWarper", 0.0)],  # min_p 0 keeps every token: the model's own min_p is overridden
        [("RepetitionPenaltyLogitsProcessor", GREEDY.repetition_penalty), no_minimum],
    ]


def test_greedy_evaluation_is_plain_greedy_decoding(opinionated_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(opinionated_model)
    model = AutoModelForCausalLM.from_pretrained(opinionated_model).eval()
    calls = record_logits_processors(monkeypatch, model)
    prompt = prompt_ids(tokenizer)
    expected = manual_greedy(model, prompt, 12, {tokenizer.eos_token_id})
    with torch.no_grad():
        inherited = model.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
    assert inherited != expected  # the shipped settings do change this model's answer
    calls.clear()
    (text,) = greedy_generations(model, tokenizer, [prompt], [12], batch_size=1)
    assert calls == [[("MinLengthLogitsProcessor", len(prompt))]]  # min_new_tokens 0: no minimum
    assert text == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_batch_rows_without_a_system_turn_get_the_training_system_prompt(chatml_merged, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, merged = chatml_merged
    user = {"role": "user", "content": QUESTION}
    rows = [{"messages": [user]}, {"messages": [{"role": "system", "content": "Answer in one word."}, user]},
            {"prompt": QUESTION}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = []
    original = LlamaForCausalLM.generate

    def recording(self, **kwargs):
        prompts.extend(kwargs["input_ids"].tolist())
        return original(self, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    chat.run(["--model_name_or_path", str(merged), "--input", str(tmp_path / "requests.jsonl"), "--output",
              str(tmp_path / "answers.jsonl"), "--max_new_tokens", "2", "--batch_size", "1"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    system_turn = tokenizer.apply_chat_template([{"role": "system", "content": medical.SYSTEM_PROMPT}],
                                                tokenize=True, return_dict=True)["input_ids"]
    assert [contains(p, system_turn) for p in prompts] == [True, False, True]
    assert prompts[0] == prompts[2] == prompt_ids(tokenizer, medical.SYSTEM_PROMPT)
