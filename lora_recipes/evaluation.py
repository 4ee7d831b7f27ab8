"""Did the fine-tuning help? The base model and the adapter side by side, per task, with bootstrap intervals.

Every example is a chat from a domain converter (system/user/assistant); its last assistant turn is the reference,
and the source's schema declares the task (`Schema.task`; chats in `messages` form, which declare nothing, are told
by their text: lettered options and a letter answer, else an answer that starts with one of the domain's labels):

    multiple choice  the prompt ends with a block of lettered options and the answer is `C. <option text>` (or just
                     `C`): accuracy, the model's pick being the letter (`A.`, `B.`, ...) with the highest
                     log-likelihood given the prompt, as the standard harnesses score MedQA and MedMCQA (no bias
                     towards short options)
    classification   the answer starts with one of the schema's labels (PubMedQA Yes/No/Maybe, ...): accuracy,
                     macro-F1 and weighted F1, the pick being the label with the highest log-likelihood
    open answer      ROUGE-L and token F1 of greedy generations against the reference, and the per-token loss of
                     the reference answer (lower is better)

The base numbers come from the same model with the adapter switched off, so the (4-bit) base loads once. Scoring runs
in bounded batches and keeps the logits of one batch's scored tokens only. Every metric gets a 95% percentile
bootstrap interval over examples (seeded), and the paired difference adapter - base resamples the same examples.

A domain module declares its standard evaluation sets as `EVAL_SETS = [EvalSet(...), ...]`, and each schema's task
in `SCHEMAS`, so a new domain only adds those; a domain without standard sets is scored on the held-out split of the
adapter's own training run (`held_out_tasks`).
"""

import importlib
import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType, SimpleNamespace

from .data import HubUnreachable, held_out_split, load_converted, parse_source, prepare_domain
from .errors import RecipeError
from .model import describe_quantization

CONFIDENCE = 0.95
ARTICLES = {"a", "an", "the"}
LETTERS = "ABCDEFGHIJ"
OPTION_LINE = re.compile(r"\s*([A-J])[.)]\s+(.+?)\s*")  # one line of the options block: `C. text` or `C) text`
LETTER_ANSWER = re.compile(r"^([A-J])(?:([.):])(?:\s|$)|\n|$)")  # `C`, `C.`, `C. text`, but not `A word`
HEADLINE = {"multiple_choice": "accuracy", "classification": "accuracy", "open": "rouge_l"}
LOWER_IS_BETTER = {"loss"}


@dataclass(frozen=True)
class EvalSet:
    """A domain's standard evaluation set: a Hub dataset and the split to read (its schema declares the task)."""

    name: str  # the task name in the report
    source: str  # Hub id or ID:CONFIG
    split: str  # the standard evaluation split; never one that the recipe trains on


@dataclass
class EvalArguments:
    """What `recipes/evaluate.py` compares, on which data, and how."""

    adapter: str = field(metadata={"help": "The adapter folder: a recipe's output_dir (adapter_config.json, "
                                           "run_card.json, tokenizer)."})
    output_dir: str = field(metadata={"help": "Where eval_report.json, eval_report.md and eval_report.png go."})
    dataset_name: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluation data: local files or folders, or Hub ids (ID, ID:CONFIG, ID:CONFIG@SPLIT; the "
                          "test split unless named). Default: the domain's standard evaluation sets; for a domain "
                          "without any, the held-out split of the adapter's training run (from run_card.json)."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model (default: base_model_name_or_path in adapter_config.json)."}
    )
    domain: str | None = field(
        default=None, metadata={"help": "The data module in data/ (default: the recipe named in run_card.json)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Score at most this many examples per task."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass (memory is bounded by it)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Longest prompt + answer in tokens; prompts are cut from the left "
                                        "(default: the training max_length from run_card.json, else 2048)."},
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Longest greedy generation for open answers; each one also stops at twice "
                                       "its reference's length plus 16 tokens."},
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap resampling."})
    num_examples: int = field(default=3, metadata={"help": "Prompts per task shown in eval_report.md."})

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                    "bootstrap_samples": self.bootstrap_samples, "limit": self.limit, "max_length": self.max_length}
        problems = [f"{name} must be > 0, got {value}" for name, value in positive.items()
                    if value is not None and value <= 0]
        if problems:
            raise RecipeError("; ".join(problems))


@dataclass
class Item:
    prompt: list[dict]  # the messages before the answer
    reference: str  # the answer as the data writes it
    options: list[str] = field(default_factory=list)  # continuations scored by log-likelihood (choice tasks)
    answer: int = -1  # index of the right option
    shown: list[str] = field(default_factory=list)  # how each option reads in the report (default: as scored)

    def show(self, pick: int) -> str:
        return (self.shown or self.options)[pick]


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice, classification or open
    items: list[Item]
    source: str
    split: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # rows the converter skipped (reason -> count)
    trained_on: bool = False  # the user pointed at the adapter's own training data


# ---------------------------------------------------------------------------------------------------------------
# From converted chats to tasks
# ---------------------------------------------------------------------------------------------------------------
def _same_case(label: str, seen: str) -> str:
    """`label` written the way the data writes labels (`Yes` / `yes` / `YES`)."""
    if seen.isupper() and len(seen) > 1:
        return label.upper()
    if seen[:1].isupper():
        return label[:1].upper() + label[1:].lower()
    return label.lower()


def options_block(question: str) -> dict[str, str]:
    """The lettered options (letter -> text): the last run of lines `A. text`, `B. text`, ... in letter order from A
    (blank lines allowed between them). A letter line elsewhere (a CaseHOLD context's `I. Background`) is not one."""
    runs, run = [], {}
    for line in question.splitlines():
        match = OPTION_LINE.fullmatch(line)
        if match and len(run) < len(LETTERS) and match.group(1) == LETTERS[len(run)]:
            run[match.group(1)] = match.group(2)
        elif match or line.strip():
            runs.append(run)
            run = {match.group(1): match.group(2)} if match and match.group(1) == "A" else {}
    runs.append(run)
    return next((r for r in reversed(runs) if len(r) >= 2), {})


def _choice_item(prompt: list[dict], reference: str) -> Item | None:
    """A multiple-choice item, when the last user turn has an options block and the answer is one of its letters."""
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    options = options_block(question)
    letter = LETTER_ANSWER.match(reference)
    if not (letter and letter.group(1) in options):
        return None
    chosen, separator = letter.group(1), letter.group(2) or ""
    # The letter written as the answer writes it (`C.`): every candidate has the same length
    return Item(prompt, reference, [f"{key}{separator}" for key in options], list(options).index(chosen),
                [f"{k}. {v}" for k, v in options.items()])


def _label_item(prompt: list[dict], reference: str, labels: tuple[str, ...]) -> Item | None:
    """A classification item, when the answer starts with one of `labels` (as a whole word, in any case)."""
    match = re.match(r"(" + "|".join(re.escape(label) for label in labels) + r")\b", reference, re.IGNORECASE)
    if not match:
        return None
    candidates = [_same_case(label, match.group(1)) for label in labels]
    return Item(prompt, reference, candidates, [label.lower() for label in labels].index(match.group(1).lower()))


def to_item(messages: list[dict], label_sets: list[tuple[str, ...]], task: str | tuple[str, ...] | None = None
            ) -> tuple[str, Item]:
    """(kind, item) for one chat: its last assistant turn is the reference, everything before it the prompt.

    `task` is what the source's schema declares (Schema.task); None (chats that declare nothing) tells the kind from
    the text: an options block and a letter answer, else an answer starting with a label of `label_sets`, else open.
    A declared task that the chat does not follow is a ValueError.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, reference = messages[:last], messages[last]["content"].strip()
    if task is None:
        item = _choice_item(prompt, reference)
        if item is not None:
            return "multiple_choice", item
        for labels in label_sets:
            item = _label_item(prompt, reference, labels)
            if item is not None:
                return "classification", item
        return "open", Item(prompt, reference)
    if task == "open":
        return "open", Item(prompt, reference)
    item = _choice_item(prompt, reference) if task == "multiple_choice" else _label_item(prompt, reference, task)
    if item is None:
        expected = ("an options block and a letter answer" if task == "multiple_choice"
                    else f"an answer starting with {' / '.join(task)}")
        raise ValueError(f"expected {expected}, got the answer '{reference[:60]}'")
    return "multiple_choice" if task == "multiple_choice" else "classification", item


def eval_sets(domain: ModuleType) -> list[EvalSet]:
    # A domain without standard sets (no EVAL_SETS yet) evaluates its held-out split and the user's data only
    return list(getattr(domain, "EVAL_SETS", ()))


def build_tasks(name: str, rows, domain: ModuleType, limit: int | None, **task_fields) -> list[Task]:
    """The converted rows ({messages, schema}) of one source as tasks, one per kind of answer and label set: `name`,
    or `name/multiple_choice`, `name/yes-no-maybe`, `name/open` when a source (a held-out split of a mixture) mixes
    them. Each row's schema declares its task; a row without one (chat data) is told by its text."""
    declared = {schema.name: schema.task for schema in domain.SCHEMAS}
    label_sets = list(dict.fromkeys(task for task in declared.values() if isinstance(task, tuple)))
    groups: dict[tuple[str, str], list[Item]] = {}
    for index, row in enumerate(rows):
        try:
            kind, item = to_item(row["messages"], label_sets, declared.get(row.get("schema")))
        except ValueError as e:  # a converter whose output does not match its schema's task
            raise RecipeError(f"{name}: example {index + 1} ({row['schema']} schema): {e}") from None
        label = "-".join(item.options).lower() if kind == "classification" else kind
        groups.setdefault((kind, label), []).append(item)
    return [Task(name if len(groups) == 1 else f"{name}/{label}", kind, items[:limit], **task_fields)
            for (kind, label), items in sorted(groups.items())]


def parse_hub_source(source: str, domain: ModuleType) -> tuple[str, str, str]:
    """(task name, Hub id[:config], split) for a Hub dataset: the split named, else a standard set's own, else test."""
    parsed = parse_source(source)
    if parsed.path is not None:  # a local file or folder that is missing: reading it says so
        return source, source, None
    names = {eval_set.source: eval_set.name for eval_set in eval_sets(domain)}
    split = held_out_split(parsed, {eval_set.source: eval_set.split for eval_set in eval_sets(domain)})
    return names.get(parsed.hub, parsed.hub), parsed.hub, split


def named_tasks(sources: list[str], domain: ModuleType, limit: int | None, training_sources: list[str]) -> list[Task]:
    """Tasks from the datasets the user named; a source that cannot be read is an error."""
    trained = {parse_source(s).with_split("train").key for s in training_sources}
    tasks, names = [], set()
    for source in sources:
        path = Path(source)
        if path.exists():
            name, dataset, split = path.stem, source, None
        else:
            name, dataset, split = parse_hub_source(source, domain)
        name = source if name in names else name  # two files named alike keep their full paths apart
        names.add(name)
        rows, report = load_converted(dataset, domain.SCHEMAS, split or "train")
        trained_on = parse_source(dataset).with_split(split or "train").key in trained
        if trained_on:
            print(f"note: {source} is training data of this adapter: its numbers measure memorisation")
        tasks += build_tasks(name, rows, domain, limit, source=source, split=split, dropped=report.dropped,
                             trained_on=trained_on)
    return tasks


def standard_tasks(domain: ModuleType, limit: int | None) -> tuple[list[Task], list[str]]:
    """(tasks, skipped) from the domain's standard evaluation sets; a set the Hub cannot serve is skipped, said why."""
    tasks, skipped = [], []
    for eval_set in eval_sets(domain):
        try:
            rows, report = load_converted(eval_set.source, domain.SCHEMAS, eval_set.split)
        except HubUnreachable as e:
            skipped.append(f"{eval_set.name}: {e}")
            print(f"skipped {skipped[-1]}")
            continue
        tasks += build_tasks(eval_set.name, rows, domain, limit, source=eval_set.source, split=eval_set.split,
                             dropped=report.dropped)
    return tasks, skipped


def held_out_tasks(adapter: Path, card: dict | None, domain: ModuleType, limit: int | None) -> list[Task]:
    """The held-out split of the adapter's own training run, rebuilt as the run split it (run_card.json: the same
    sources, eval_fraction, seed and token budget): rows it never trained on. What a domain without standard
    evaluation sets is scored on."""
    from transformers import AutoTokenizer

    from .config import DataArguments

    if card is None:
        raise RecipeError(f"{adapter}: no run_card.json to rebuild the held-out split from, and data/"
                          f"{domain.__name__.split('.')[-1]}.py declares no EVAL_SETS: pass --dataset_name FILE or ID")
    known = {f.name for f in fields(DataArguments)}
    data_args = DataArguments(**{k: v for k, v in card["config"]["data"].items() if k in known})
    training = SimpleNamespace(**card["config"]["training"])
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=bool(card.get("trust_remote_code")))
    data = prepare_domain(domain, data_args, training, tokenizer)
    if data.eval is None:
        raise RecipeError(f"{adapter}: its training run held out no rows (eval_fraction "
                          f"{data_args.eval_fraction}): pass --dataset_name FILE or ID")
    return build_tasks("held_out", data.eval, domain, limit, source="held-out split of the training sources")


# ---------------------------------------------------------------------------------------------------------------
# Scoring: log-likelihoods of continuations and greedy generations, in bounded batches
# ---------------------------------------------------------------------------------------------------------------
def _prompt_text(tokenizer, prompt: list[dict]) -> str:
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat text, as `apply_chat_template(tokenize=True)` (and so training) encodes it."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _split_after_prompt(prompt: list[int], whole: list[int]) -> tuple[list[int], list[int]]:
    """(context, continuation) of a prompt + continuation encoded together: the continuation is what follows the
    encoded prompt (from where they diverge, when a token merges across the boundary), at least one token."""
    from trl.data_utils import common_prefix_length

    start = min(common_prefix_length(prompt, whole), len(whole) - 1)
    return whole[:start], whole[start:]


def option_requests(tokenizer, item: Item) -> list[tuple[list[int], list[int]]]:
    """(context ids, option ids) per option, as training tokenizes an answer: the option is written as the assistant
    turn of the conversation through the chat template and the whole text encoded; the option's tokens run from
    where the text leaves the generation prompt (Mistral writes `[/INST] Yes`: training sees `▁Yes`, or `▁ Y es`)
    to the option's last character, the context is every token before them. Encoded alone, `C.` would start with a
    word boundary (`▁C`) that a SentencePiece tokenizer never puts after Phi-3's `<|assistant|>\\n`."""
    import os

    prompt_text = _prompt_text(tokenizer, item.prompt)
    requests = []
    for option in item.options:
        text = tokenizer.apply_chat_template(item.prompt + [{"role": "assistant", "content": option}], tokenize=False)
        begin = len(os.path.commonprefix([prompt_text, text]))
        end = text.index(option, begin) + len(option)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        covering = [k for k, (first, last) in enumerate(encoded["offset_mapping"]) if last > begin and first < end]
        ids = encoded["input_ids"]
        requests.append((ids[:covering[0]], ids[covering[0]:covering[-1] + 1]))
    return requests


def reference_request(tokenizer, item: Item) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) of the reference as training tokenizes the conversation: the answer is the last
    assistant turn's span of the assistant mask (its content and end-of-turn token). A template without generation
    markers has no mask: then every token after the encoded prompt (what training without assistant_only_loss
    learns)."""
    from trl.chat_template_utils import has_generation_markers

    masked = has_generation_markers(tokenizer.chat_template)
    encoded = tokenizer.apply_chat_template(item.prompt + [{"role": "assistant", "content": item.reference}],
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=masked)
    ids, mask = encoded["input_ids"], encoded.get("assistant_masks", [])
    if 1 in mask:
        end = len(mask) - mask[::-1].index(1)
        start = end - mask[:end][::-1].index(0) if 0 in mask[:end] else 0
        return ids[:start], ids[start:end]
    return _split_after_prompt(_tokens(tokenizer, _prompt_text(tokenizer, item.prompt)), ids)


def choice_requests(tokenizer, items: list[Item], max_length: int) -> tuple[list, list[int], set[int]]:
    """(requests, the item of each, the items whose prompt was cut) for the options of choice items: each item's
    options share one context, cut from the left for the longest option, so that it is read once."""
    requests, owners, truncated = [], [], set()
    for index, item in enumerate(items):
        options = option_requests(tokenizer, item)
        longest = max(len(option) for _, option in options)
        for context, option in options:
            *request, cut = _fit(context, option, max_length - longest + len(option))
            requests.append(request)
            owners.append(index)
            if cut:
                truncated.add(index)
    return requests, owners, truncated


def _fit(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut the context from the left (and an over-long continuation from the right) to fit max_length tokens."""
    continuation = continuation[: max_length - 1]
    room = max_length - len(continuation)
    return context[-room:], continuation, len(context) > room


def _pad(sequences: list[list[int]], pad_id: int, left: bool = True):
    """(input_ids, attention_mask) of the sequences padded to one width, on the left (or the right)."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                          desc: str = "scoring") -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) request.

    Longest requests first (an out-of-memory shows at once), left-padded so that every continuation ends the row,
    and the model computes logits for the last `longest continuation` positions only.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    scores = [0.0] * len(requests)
    with torch.no_grad(), tqdm(total=len(requests), desc=desc, leave=False) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            # The last continuation token is only ever predicted, so it is not part of the input
            input_ids, attention_mask = _pad([requests[i][0] + requests[i][1][:-1] for i in batch], pad_id)
            keep = max(len(requests[i][1]) for i in batch)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                logits_to_keep=keep,
            ).logits
            for row, i in enumerate(batch):
                continuation = torch.tensor(requests[i][1], device=device)
                predicted = logits[row, keep - len(continuation):].float()
                scores[i] = -F.cross_entropy(predicted, continuation, reduction="sum").item()
            progress.update(len(batch))
    return scores


def grouped_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                     desc: str = "scoring") -> list[float]:
    """The sums of `continuation_logprobs`, reading each distinct context once (requests grouped by context, as
    lm-evaluation-harness does): one forward of the context gives every continuation's first token, and the rest of
    the continuations are scored together from its KV cache. A context with one continuation is one pass with it.

    A forward holds at most `batch_size` continuations (at least one context's), longest contexts first.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(requests):
        groups.setdefault(tuple(context), []).append(i)
    alone = [members[0] for members in groups.values() if len(members) == 1]
    scores = [0.0] * len(requests)
    for i, score in zip(alone, continuation_logprobs(model, [requests[i] for i in alone], batch_size, pad_id, desc),
                        strict=True):
        scores[i] = score
    # (context, its continuations), at most batch_size continuations each, longest contexts first
    shared = sorted(((context, members[k:k + batch_size]) for context, members in groups.items() if len(members) > 1
                     for k in range(0, len(members), batch_size)), key=lambda group: -len(group[0]))
    device = next(model.parameters()).device
    with torch.no_grad(), tqdm(total=len(requests) - len(alone), desc=desc, leave=False) as progress:
        start = 0
        while start < len(shared):
            batch, rows = [], 0
            while start < len(shared) and (not batch or rows + len(shared[start][1]) <= batch_size):
                batch.append(shared[start])
                rows += len(shared[start][1])
                start += 1
            input_ids, attention_mask = _pad([list(context) for context, _ in batch], pad_id)
            output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True,
                           logits_to_keep=1)
            pairs = [(row, i) for row, (_, members) in enumerate(batch) for i in members]
            first = output.logits[:, -1].float().log_softmax(-1)
            picked = first[[row for row, _ in pairs], [requests[i][1][0] for _, i in pairs]].tolist()
            for (_, i), score in zip(pairs, picked, strict=True):
                scores[i] = score
            rest = [(row, i) for row, i in pairs if len(requests[i][1]) > 1]
            if rest:
                # one row per continuation, on its context's cache: the continuation minus its last token goes in,
                # right-padded (a pad after the tokens is never attended to by them)
                owners = torch.tensor([row for row, _ in rest])
                cache = output.past_key_values
                cache.batch_select_indices(owners.to(device))
                tails, tail_mask = _pad([requests[i][1][:-1] for _, i in rest], pad_id, left=False)
                context_mask = attention_mask[owners]
                positions = context_mask.sum(-1, keepdim=True) + torch.arange(tails.shape[1])
                logits = model(input_ids=tails.to(device), attention_mask=torch.cat([context_mask, tail_mask], 1)
                               .to(device), position_ids=positions.to(device), past_key_values=cache,
                               use_cache=True).logits
                for k, (_, i) in enumerate(rest):
                    target = torch.tensor(requests[i][1][1:], device=device)
                    scores[i] -= F.cross_entropy(logits[k, :len(target)].float(), target, reduction="sum").item()
            progress.update(len(pairs))
    return scores


def greedy_generations(model, tokenizer, prompts: list[list[int]], budgets: list[int], batch_size: int,
                       desc: str = "generating") -> list[str]:
    """Greedy completions, batched (left-padded), each cut at its own token budget and at the end of turn."""
    import torch
    from tqdm.auto import tqdm

    from .inference import eos_token_ids, explicit_generation_config

    device = next(model.parameters()).device
    stop = set(eos_token_ids(tokenizer, model.generation_config))  # the chat template's end of turn, and EOS
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    with torch.no_grad(), tqdm(total=len(prompts), desc=desc, leave=False) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            input_ids, attention_mask = _pad([prompts[i] for i in batch], tokenizer.pad_token_id)
            # greedy, nothing from the model's generation_config.json (no repetition penalty an instruct model ships)
            config = explicit_generation_config(model, tokenizer, max(budgets[i] for i in batch), use_cache=True)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for row, i in enumerate(batch):
                new = output[row, input_ids.shape[1]:][: budgets[i]].tolist()
                ends = [k for k, token in enumerate(new) if token in stop]
                texts[i] = tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True).strip()
            progress.update(len(batch))
    return texts


@dataclass
class Predictions:
    """One model's outputs on a task: picked option indices (choice tasks) or answers, per-token losses (open)."""

    picks: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    truncated: int = 0  # examples whose prompt was cut from the left to fit max_length


def predict(model, tokenizer, task: Task, args: EvalArguments, label: str) -> Predictions:
    """Run one model (base or adapter) over one task."""
    if task.kind != "open":
        requests, owners, truncated = choice_requests(tokenizer, task.items, args.max_length)
        scores = grouped_logprobs(model, requests, args.batch_size, tokenizer.pad_token_id,
                                  desc=f"{task.name} [{label}] options")
        per_item: list[list[float]] = [[] for _ in task.items]
        for owner, score in zip(owners, scores, strict=False):
            per_item[owner].append(score)
        picks = [max(range(len(s)), key=s.__getitem__) for s in per_item]
        return Predictions(picks=picks, answers=[item.show(p) for item, p in zip(task.items, picks, strict=False)],
                           truncated=len(truncated))

    fitted = [_fit(*reference_request(tokenizer, item), args.max_length) for item in task.items]
    requests = [(context, continuation) for context, continuation, _ in fitted]
    scores = grouped_logprobs(model, requests, args.batch_size, tokenizer.pad_token_id,
                              desc=f"{task.name} [{label}] reference loss")
    losses = [-score / len(continuation) for score, (_, continuation) in zip(scores, requests, strict=False)]
    contexts = [_tokens(tokenizer, _prompt_text(tokenizer, item.prompt)) for item in task.items]
    budgets = [min(args.max_new_tokens, 2 * len(_tokens(tokenizer, item.reference)) + 16, args.max_length - 1)
               for item in task.items]
    prompts = [context[-(args.max_length - budget):] for context, budget in zip(contexts, budgets, strict=False)]
    answers = greedy_generations(model, tokenizer, prompts, budgets, args.batch_size,
                                 desc=f"{task.name} [{label}] generation")
    truncated = sum(cut or len(prompt) < len(context)
                    for (_, _, cut), prompt, context in zip(fitted, prompts, contexts, strict=False))
    return Predictions(answers=answers, losses=losses, truncated=truncated)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and paired bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the bags of words (lower case, punctuation and articles removed)."""
    predicted = [w for w in words(prediction) if w not in ARTICLES]
    expected = [w for w in words(reference) if w not in ARTICLES]
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words over both lengths (as `rouge-score` computes it)."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    previous = [0] * (len(expected) + 1)
    for p in predicted:
        current = [0]
        for j, e in enumerate(expected):
            current.append(previous[j] + 1 if p == e else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def classification_scores(gold, predicted, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 (over the labels that occur in gold or predictions) and support-weighted F1."""
    import numpy as np

    confusion = np.bincount(gold * num_labels + predicted, minlength=num_labels**2).reshape(num_labels, num_labels)
    true_positives = np.diag(confusion)
    support, predicted_count = confusion.sum(1), confusion.sum(0)
    denominator = support + predicted_count
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros(num_labels), where=denominator > 0)
    present = denominator > 0
    return {
        "accuracy": true_positives.sum() / len(gold),
        "macro_f1": f1[present].mean(),
        "weighted_f1": (f1 * support).sum() / support.sum(),
    }


def per_example_metrics(task: Task, predictions: Predictions) -> dict:
    """A function of resampled example indices for every metric of the task's kind."""
    import numpy as np

    if task.kind == "multiple_choice":
        correct = np.array([p == item.answer for p, item in zip(predictions.picks, task.items, strict=False)],
                           dtype=float)
        return {"accuracy": lambda idx: correct[idx].mean()}
    if task.kind == "classification":
        gold = np.array([item.answer for item in task.items])
        picks = np.array(predictions.picks)
        num_labels = len(task.items[0].options)
        return {name: (lambda idx, name=name: classification_scores(gold[idx], picks[idx], num_labels)[name])
                for name in ("accuracy", "macro_f1", "weighted_f1")}
    rouge = np.array([rouge_l(a, item.reference) for a, item in zip(predictions.answers, task.items, strict=False)])
    f1 = np.array([token_f1(a, item.reference) for a, item in zip(predictions.answers, task.items, strict=False)])
    loss = np.array(predictions.losses)
    return {"rouge_l": lambda idx: rouge[idx].mean(), "token_f1": lambda idx: f1[idx].mean(),
            "loss": lambda idx: loss[idx].mean()}


def interval(values) -> list[float]:
    import numpy as np

    tail = 100 * (1 - CONFIDENCE) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def paired_bootstrap(base_metric, adapter_metric, n: int, samples: int, seed: int) -> dict:
    """Point estimates and 95% intervals of base, adapter and adapter - base, on the same resampled examples."""
    import numpy as np

    everything = np.arange(n)
    resamples = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    base = np.array([base_metric(idx) for idx in resamples])
    adapter = np.array([adapter_metric(idx) for idx in resamples])
    base_value, adapter_value = float(base_metric(everything)), float(adapter_metric(everything))
    return {"base": base_value, "adapter": adapter_value, "delta": adapter_value - base_value,
            "base_ci": interval(base), "adapter_ci": interval(adapter), "delta_ci": interval(adapter - base)}


# ---------------------------------------------------------------------------------------------------------------
# Running the comparison and writing the report
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def training_layout_4bit(model):
    """Keep 4-bit weights as training used them. In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks them for
    inference, rounding their scales to bf16, and cannot undo it exactly: the base would no longer be the one the
    adapter was trained on, and a model evaluated at the end of training would be left altered."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]  # bnb Linear4bit only
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


def compare(model, tokenizer, tasks: list[Task], args: EvalArguments) -> dict:
    """Every task with the adapter switched off (base) and on: the `tasks` part of eval_report.json."""
    with training_layout_4bit(model):
        return _compare(model, tokenizer, tasks, args)


def _compare(model, tokenizer, tasks: list[Task], args: EvalArguments) -> dict:
    was_training = model.training
    model.eval()  # no dropout; the end of a training run hands over its model in train mode
    report = {}
    for task in tasks:
        with model.disable_adapter():
            base = predict(model, tokenizer, task, args, "base")
        adapter = predict(model, tokenizer, task, args, "adapter")
        base_metrics, adapter_metrics = per_example_metrics(task, base), per_example_metrics(task, adapter)
        metrics = {name: {"higher_is_better": name not in LOWER_IS_BETTER,
                          **paired_bootstrap(base_metrics[name], adapter_metrics[name], len(task.items),
                                             args.bootstrap_samples, args.seed)}
                   for name in base_metrics}
        headline = HEADLINE[task.kind]
        examples = [{"prompt": next((m["content"] for m in reversed(item.prompt) if m["role"] == "user"), ""),
                     "reference": item.reference, "base": b, "adapter": a}
                    for item, b, a in zip(task.items, base.answers, adapter.answers, strict=False)
                    ][: args.num_examples]
        report[task.name] = {
            "metric": headline, "n": len(task.items), **metrics[headline], "kind": task.kind, "metrics": metrics,
            "source": task.source, "split": task.split, "dropped": task.dropped, "trained_on": task.trained_on,
            "truncated": adapter.truncated, "examples": examples,
        }
        print(f"{task.name}: {headline} base {report[task.name]['base']:.3f} -> adapter "
              f"{report[task.name]['adapter']:.3f} (n={len(task.items)})")
    model.train(was_training)
    return report


def _cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", "<br>")


def _value(entry: dict, key: str) -> str:
    sign = "+" if key == "delta" else ""
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def markdown_report(report: dict) -> str:
    lines = ["# Base model vs adapter", "",
             f"Adapter `{report['adapter']}` on base `{report['base_model']}` ({report['quantization']}). "
             f"Intervals: {int(100 * CONFIDENCE)}% percentile bootstrap over examples "
             f"({report['bootstrap']['samples']} resamples, seed {report['bootstrap']['seed']}); "
             "delta = adapter - base on the same resamples.", "",
             "| task | metric | n | base | adapter | delta |", "|---|---|---:|---|---|---|"]
    for name, task in report["tasks"].items():
        for metric, entry in task["metrics"].items():
            better = "higher is better" if entry["higher_is_better"] else "lower is better"
            lines.append(f"| {name if metric == task['metric'] else ''} | {metric} ({better}) | {task['n']} | "
                         f"{_value(entry, 'base')} | {_value(entry, 'adapter')} | {_value(entry, 'delta')} |")
    notes = [f"- `{name}`: training data of this adapter (memorisation, not generalisation)"
             for name, task in report["tasks"].items() if task["trained_on"]]
    notes += [f"- `{name}`: {', '.join(f'{n} {reason}' for reason, n in task['dropped'].items())} dropped by the "
              "converter" for name, task in report["tasks"].items() if task["dropped"]]
    notes += [f"- `{name}`: {task['truncated']} prompts cut from the left to fit max_length"
              for name, task in report["tasks"].items() if task["truncated"]]
    notes += [f"- skipped: {line}" for line in report["skipped"]]
    if notes:
        lines += ["", *notes]
    lines += ["", "## Examples", ""]
    for name, task in report["tasks"].items():
        lines += [f"### {name}", "", "| prompt | reference | base | adapter |", "|---|---|---|---|"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['reference'])} | {_cell(e['base'])} | {_cell(e['adapter'])} |"
                  for e in task["examples"]]
        lines.append("")
    return "\n".join(lines)


def write_report(tasks: dict, output_dir: Path, meta: dict) -> Path:
    """eval_report.json, eval_report.md and eval_report.png in output_dir; returns the JSON path."""
    from .plots import plot_eval_report
    from .run_card import write_json

    output_dir = Path(output_dir)
    report = {**meta, "tasks": tasks}
    path = write_json(output_dir / "eval_report.json", report)
    (output_dir / "eval_report.md").write_text(markdown_report(report), encoding="utf-8")
    plot_eval_report(tasks, output_dir / "eval_report.png")
    return path


def report_meta(adapter: str, base_model: str, quantization: str, args: EvalArguments, skipped: list[str]) -> dict:
    return {"adapter": str(adapter), "base_model": base_model, "quantization": quantization,
            "bootstrap": {"samples": args.bootstrap_samples, "seed": args.seed, "confidence": CONFIDENCE},
            "settings": asdict(args), "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------------
# The two entry points: recipes/evaluate.py (a saved adapter) and the end of a training run (the model in memory)
# ---------------------------------------------------------------------------------------------------------------
def open_adapter(folder: str) -> tuple[Path, dict | None]:
    """(adapter folder, its run card or None) with a one-line error when the folder holds no adapter."""
    adapter = Path(folder)
    if not (adapter / "adapter_config.json").is_file():
        raise RecipeError(f"{adapter}: not an adapter folder (no adapter_config.json); pass a recipe's output_dir")
    card_path = adapter / "run_card.json"
    return adapter, json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None


def load_domain(name: str | None, card: dict | None) -> ModuleType:
    """The data module `data/<domain>.py`: named, or the one of the recipe that trained the adapter."""
    if name is None and card is not None:
        name = Path(card["recipe"]).stem.removeprefix("sft_")
    available = sorted(p.stem for p in Path(__file__).resolve().parents[1].joinpath("data").glob("*.py")
                       if not p.stem.startswith("_"))
    if name not in available:
        raise RecipeError(f"unknown domain '{name}': pass --domain, one of {', '.join(available)}")
    return importlib.import_module(f"data.{name}")


def base_model_args(adapter: Path, card: dict | None, model_name_or_path: str | None):
    """The base model as it was trained: quantisation and dtype from run_card.json, the name from the adapter."""
    import torch
    from trl import ModelConfig

    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    name = model_name_or_path or adapter_config.get("base_model_name_or_path")
    if not name:
        raise RecipeError(f"{adapter}/adapter_config.json names no base model: pass --model_name_or_path")
    if card is None:
        print(f"note: {adapter} has no run_card.json: loading the base in 4-bit NF4 (the recipes' default)")
        trained = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
                   "dtype": "bfloat16" if torch.cuda.is_available() else "float32"}
    else:
        known = {f.name for f in fields(ModelConfig)}
        trained = {k: v for k, v in card["config"]["model"].items() if k in known}
    return ModelConfig(**{**trained, "model_name_or_path": name})


def load_for_evaluation(adapter: Path, card: dict | None, model_name_or_path: str | None):
    """(base model with the adapter on top, tokenizer, base model args) for a saved adapter folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from .model import load_model

    model_args = base_model_args(adapter, card, model_name_or_path)
    trust_remote_code = bool(card and card.get("trust_remote_code"))
    # The tokenizer saved with the adapter carries the chat template it was trained with
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise RecipeError(f"tokenizer of {tokenizer_source} has no chat template to build prompts with")
    if tokenizer.pad_token_id is None:
        raise RecipeError(f"tokenizer of {tokenizer_source} has no pad token")
    # load_model takes the run's training settings (where quantised weights go, whether remote code runs): here one
    # process, on the GPU when there is one. Nothing trains: no bf16 autocast (TRL's default, which a GPU without
    # bf16 refuses) and no activation checkpointing (TRL's default for it warns)
    settings = SFTConfig(output_dir=str(adapter), use_cpu=not torch.cuda.is_available(), report_to="none",
                         trust_remote_code=trust_remote_code, bf16=False, activation_checkpointing=False)
    base = load_model(model_args, settings)
    model = PeftModel.from_pretrained(base, adapter).eval()
    return model, tokenizer, model_args


def evaluate_after_training(trainer, domain: ModuleType, held_out, data_args, training_args, model_args) -> None:
    """The end of a recipe: base vs adapter on the held-out split and, when reachable, the domain's standard sets."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        print("End-of-training evaluation skipped: the model is sharded across processes. Run "
              f"`python recipes/evaluate.py --adapter {training_args.output_dir} --output_dir OUT` instead")
        return
    args = EvalArguments(adapter=training_args.output_dir, output_dir=training_args.output_dir,
                         limit=data_args.eval_after_training_limit,
                         batch_size=training_args.per_device_eval_batch_size,
                         max_length=training_args.max_length or 2048)
    tasks = build_tasks("held_out", held_out, domain, args.limit,
                        source="held-out split of the training sources") if held_out is not None else []
    skipped = ["the domain's standard sets (eval_after_training_standard_sets is false)"]
    if data_args.eval_after_training_standard_sets:
        standard, skipped = standard_tasks(domain, args.limit)
        tasks += standard
    if not tasks:
        print("End-of-training evaluation: nothing to evaluate (no held-out split; " + "; ".join(skipped) + ")")
        return
    results = compare(trainer.model, trainer.processing_class, tasks, args)
    meta = report_meta(args.adapter, model_args.model_name_or_path, describe_quantization(model_args), args, skipped)
    path = write_report(results, Path(training_args.output_dir), meta)
    print(f"Evaluation report (base vs adapter): {path.with_suffix('.md')}")
