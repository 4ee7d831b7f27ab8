"""Evaluation scores the tokens training saw, and reads each prompt once: per tokenizer family, on every bundled task.

Families: the bundled byte-level tiny model and one tiny model per family of lora_recipes/tiny_model.py (byte-level
Llama 3 and Qwen2; SentencePiece-style Metaspace Phi-3, Mistral and Gemma 2), each with the chat template the recipe
trains with.
"""

import importlib

import pytest
import torch
from conftest import REPO_ROOT, SAMPLES, TINY_MODEL
from transformers import AutoModelForCausalLM
from trl.data_utils import _tokenize

from lora_recipes.config import parse_args
from lora_recipes.data import load_converted
from lora_recipes.evaluation import (
    build_tasks,
    choice_requests,
    continuation_logprobs,
    grouped_logprobs,
    option_requests,
    reference_request,
    to_item,
)
from lora_recipes.model import load_tokenizer
from lora_recipes.tiny_model import FAMILIES

DOMAINS = ("medical", "legal", "finance")
MAX_LENGTH = 512  # the tiny models' context
SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two that other processes share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_tokenizer(path, output_dir):
    """The tokenizer as the recipe trains with it: the training chat template (assistant mask), a pad token."""
    _, training_args, model_args = parse_args(SMOKE, ["--model_name_or_path", str(path), "--output_dir",
                                                      str(output_dir)])
    return load_tokenizer(model_args, training_args)


@pytest.fixture(scope="module", params=["tiny-llama", *sorted(FAMILIES)])
def family(request, family_models, tmp_path_factory):
    """(tokenizer, model) of one tokenizer family."""
    path = TINY_MODEL if request.param == "tiny-llama" else family_models[request.param]
    tokenizer = training_tokenizer(path, tmp_path_factory.mktemp(request.param))
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def bundled_tasks(limit: int):
    """(domain module, task) for every task of every sample file of every domain."""
    for name in DOMAINS:
        domain = importlib.import_module(f"data.{name}")
        for path in sorted((SAMPLES / name).iterdir()):
            if path.suffix in (".jsonl", ".txt"):
                rows, _ = load_converted(str(path), domain.SCHEMAS)
                for task in build_tasks(path.stem, rows, domain, limit, source=str(path)):
                    yield domain, task


def trained_answer(tokenizer, messages: list[dict]) -> tuple[list[int], int, int]:
    """(token ids, start, end of the last assistant turn's mask) as TRL tokenizes the conversation for training."""
    encoded = _tokenize(tokenizer, messages, return_assistant_tokens_mask=True)
    mask = encoded["assistant_masks"]
    start = len(mask) - 1 - mask[::-1].index(1)
    while start > 0 and mask[start - 1]:
        start -= 1
    end = start + mask[start:].index(0) if 0 in mask[start:] else len(mask)
    return encoded["input_ids"], start, end


def test_scored_tokens_are_the_tokens_training_saw(family):
    """The right option's tokens are the answer's first tokens as training saw them, after the same context and
    inside the assistant mask (which may start before the generation prompt ends: Qwen2.5's at its newline); the
    reference loss scores exactly the assistant-mask tokens (answer and end-of-turn)."""
    tokenizer, _ = family
    checked = {"multiple_choice": 0, "classification": 0, "open": 0}
    for _, task in bundled_tasks(limit=3):
        for item in task.items:
            messages = [*item.prompt, {"role": "assistant", "content": item.reference}]
            ids, start, end = trained_answer(tokenizer, messages)
            assert reference_request(tokenizer, item) == (ids[:start], ids[start:end])
            if task.kind != "open":
                requests = option_requests(tokenizer, item)
                context, option = requests[item.answer]
                # the right option's tokens are the trained tokens at the same place, inside the assistant mask
                assert ids[:len(context) + len(option)] == context + option, task.name
                assert start <= len(context) < len(context) + len(option) <= end, task.name
                assert all(other_context == context for other_context, _ in requests)
            checked[task.kind] += 1
    assert min(checked.values()) > 0, checked


def test_sentencepiece_options_carry_no_word_boundary(family_models, tmp_path):
    """The bug this guards against: under Phi-3's SentencePiece-style tokenizer the option `C.` encoded alone starts
    with `▁C`, a token training never saw after `<|assistant|>`."""
    tokenizer = training_tokenizer(family_models["phi3"], tmp_path)
    alone = tokenizer.convert_ids_to_tokens(tokenizer("C.", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁C"
    item = to_item([{"role": "user", "content": "Which?\n\nA. one\nB. two\nC. three"},
                    {"role": "assistant", "content": "C. three"}], [])[1]
    context, option = option_requests(tokenizer, item)[item.answer]
    assert tokenizer.convert_ids_to_tokens(option)[0] != "▁C" and tokenizer.decode(option) == "C."
    assert tokenizer.convert_ids_to_tokens(context)[-1] == "<|assistant|>" or tokenizer.decode(context).endswith(
        "<|assistant|>\n")


class CountingModel(torch.nn.Module):
    """The model, counting the real (unpadded) input tokens of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.tokens = model, 0

    def forward(self, input_ids, attention_mask, **kwargs):
        self.tokens += int(attention_mask[:, -input_ids.shape[1]:].sum())
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_reading_each_prompt_once_scores_as_option_by_option(family):
    """On every bundled task: the same log-likelihoods (1e-4) and picks as one full pass per option, while each
    prompt goes through the model once (plus each option's tokens after its first)."""
    tokenizer, model = family
    kinds = set()
    for _, task in bundled_tasks(limit=4):
        if task.kind == "open":
            requests = [reference_request(tokenizer, item) for item in task.items]
            owners = list(range(len(task.items)))
        else:
            requests, owners, _ = choice_requests(tokenizer, task.items, MAX_LENGTH)
        counted = CountingModel(model)
        pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id  # Llama 3: none
        old = continuation_logprobs(model, requests, 4, pad)
        new = grouped_logprobs(counted, requests, 8, pad)  # room for every option of a prompt
        assert new == pytest.approx(old, abs=1e-4), task.name
        for index in set(owners):
            options = [i for i, owner in enumerate(owners) if owner == index]
            assert max(options, key=new.__getitem__) == max(options, key=old.__getitem__), (task.name, index)
        contexts = {tuple(context): [] for context, _ in requests}
        for context, continuation in requests:
            contexts[tuple(context)].append(continuation)
        expected = sum(len(context) + len(options[0]) - 1 if len(options) == 1
                       else len(context) + sum(len(option) - 1 for option in options)
                       for context, options in contexts.items())
        assert counted.tokens == expected, task.name
        kinds.add(task.kind)
    assert kinds == {"multiple_choice", "classification", "open"}
