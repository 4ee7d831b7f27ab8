"""Evaluation scores the tokens training saw, and reads each prompt once: per tokenizer family, on every bundled task.

Families: the tiny byte-level BPE model (data/tiny-llama), and a SentencePiece-style Metaspace tokenizer (Llama-2,
Mistral, Phi-3) built here with a Phi-3-style chat template, on a random tiny Llama of its vocabulary.
"""

import importlib

import pytest
import torch
from conftest import SAMPLES, TINY_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import _tokenize

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

DOMAINS = ("medical", "legal", "finance")
MAX_LENGTH = 512  # the tiny models' context
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}"
    "{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def metaspace_tokenizer():
    """BPE over Metaspace pre-tokenization (`▁` marks a word start, prepended to the first word only), trained on
    the bundled samples: `encode("C.")` alone gives `▁C .`, but after `<|assistant|>\\n` training sees `C .`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lora_recipes.tiny_model import sample_texts

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tokenizer.train_from_iterator([*sample_texts(), "\n"], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=special, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|end|>", chat_template=PHI3_TEMPLATE)


def random_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits that differ between options (the default init makes them nearly uniform)
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two that other processes share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def family(request):
    """(tokenizer, model) of one tokenizer family."""
    if request.param == "byte-level":
        return AutoTokenizer.from_pretrained(TINY_MODEL), AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    tokenizer = metaspace_tokenizer()
    return tokenizer, random_llama(len(tokenizer))


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
    """Every option's tokens are where training put the answer's first tokens, after the same context; the
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
                assert context == ids[:start] and option == ids[start:start + len(option)], task.name
                assert all(other_context == context for other_context, _ in requests)
            checked[task.kind] += 1
    assert min(checked.values()) > 0, checked


def test_metaspace_options_carry_no_word_boundary():
    """The bug this guards against: the option `C.` encoded alone starts with `▁C`, a token training never saw."""
    tokenizer = metaspace_tokenizer()
    alone = tokenizer.convert_ids_to_tokens(tokenizer("C.", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁C"
    item = to_item([{"role": "user", "content": "Which?\n\nA. one\nB. two\nC. three"},
                    {"role": "assistant", "content": "C. three"}], [])[1]
    context, option = option_requests(tokenizer, item)[item.answer]
    assert tokenizer.convert_ids_to_tokens(option) == ["C", "."]
    assert tokenizer.convert_ids_to_tokens(context)[-2:] == ["<|assistant|>", "\n"]


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
        old = continuation_logprobs(model, requests, 4, tokenizer.pad_token_id)
        new = grouped_logprobs(counted, requests, 8, tokenizer.pad_token_id)  # room for every option of a prompt
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
