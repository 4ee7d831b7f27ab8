"""Mixture weights: `SOURCE weight=W` and `SOURCE fraction=F` give exact, seeded row counts per source after cleaning
and deduplication, the data card shows them before and after, and upsampling never brings a prompt to both sides of
the train/eval split."""

import json
from collections import Counter

import pytest
from conftest import REPO_ROOT, TINY_MODEL

from data import medical
from lora_recipes.config import parse_args
from lora_recipes.data import content_key, parse_source, prepare_data, prompt_key
from lora_recipes.data_card import write_data_card
from lora_recipes.errors import RecipeError


def write_chats(path, prompts: list[str], answers: int = 1):
    """A messages file: each prompt `answers` times, with a different answer each time (not duplicates)."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"Answer {a} to {p}"}]}
            for p in prompts for a in range(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def uses(dataset) -> Counter:
    return Counter(content_key(m) for m in dataset["messages"])


def prompts(dataset) -> set[str]:
    return {prompt_key(m) for m in dataset["messages"]} if dataset is not None else set()


def test_weights_share_the_deduplicated_rows_in_proportion(tmp_path):
    many = write_chats(tmp_path / "many.jsonl", [f"Common question {i}?" for i in range(30)])
    # 10 rare questions and 2 repeats of them: the weights apply to the 10 left after deduplication
    rare = tmp_path / "rare.jsonl"
    write_chats(rare, [f"Rare question {i}?" for i in range(10)] + ["Rare question 0?", "Rare question 1?"])

    data = prepare_data([f"{many} weight=1", f"{rare} weight=3"], medical.SCHEMAS, eval_fraction=0.0, seed=7)

    # 40 rows kept in all, shared 1:3: 10 common rows (a third of them) and 30 rare ones (each exactly three times)
    common, rare_rows = data.sources
    assert (common.kept, common.train, rare_rows.kept, rare_rows.dropped, rare_rows.train) == (
        30, 10, 10, {"duplicate": 2}, 30)
    counts = uses(data.train)
    assert len(data.train) == 40
    assert sorted(n for key, n in counts.items() if key.startswith("rare")) == [3] * 10
    assert sorted(n for key, n in counts.items() if key.startswith("common")) == [1] * 10
    # seeded: the same seed draws the same common rows, whatever the order of the file; another seed others
    write_chats(many, [f"Common question {i}?" for i in reversed(range(30))])
    again = prepare_data([f"{many} weight=1", f"{rare} weight=3"], medical.SCHEMAS, eval_fraction=0.0, seed=7)
    other = prepare_data([f"{many} weight=1", f"{rare} weight=3"], medical.SCHEMAS, eval_fraction=0.0, seed=8)
    assert uses(again.train) == counts
    assert uses(other.train) != counts


@pytest.mark.parametrize("fraction", [0.4, 2.5])
def test_a_fraction_scales_each_side_and_a_prompt_never_straddles_the_split(tmp_path, fraction):
    # 40 questions asked twice each with different answers: 80 rows whose prompts the split must keep together
    source = write_chats(tmp_path / "chats.jsonl", [f"Question {i} about dosage?" for i in range(40)], answers=2)
    other = write_chats(tmp_path / "other.jsonl", [f"Other question {i}?" for i in range(20)])
    plain = prepare_data([str(source), str(other)], medical.SCHEMAS, eval_fraction=0.3, seed=3)

    mixed = prepare_data([f"{source} fraction={fraction}", str(other)], medical.SCHEMAS, eval_fraction=0.3, seed=3)

    before, after = plain.sources[0], mixed.sources[0]
    assert (after.train, after.eval) == (round(fraction * before.train), round(fraction * before.eval))
    assert (mixed.sources[1].train, mixed.sources[1].eval) == (plain.sources[1].train, plain.sources[1].eval)
    assert len(mixed.train) == after.train + mixed.sources[1].train
    # each side draws only from its own rows: the prompts of a side are the plain split's, so none is on both sides
    assert prompts(mixed.train) <= prompts(plain.train) and prompts(mixed.eval) <= prompts(plain.eval)
    assert not prompts(mixed.train) & prompts(mixed.eval)
    if fraction > 1:  # every row at least twice, half of them a third time
        assert {n for key, n in uses(mixed.train).items() if key.startswith("question")} == {2, 3}
        assert prompts(mixed.train) == prompts(plain.train)


def test_the_card_shows_rows_before_and_after_and_says_upsampled(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    many = write_chats(tmp_path / "many.jsonl", [f"Common question {i}?" for i in range(30)])
    rare = write_chats(tmp_path / "rare.jsonl", [f"Rare question {i}?" for i in range(10)])
    data = prepare_data([f"{many} weight=1", f"{rare} weight=3"], medical.SCHEMAS, eval_fraction=0.0)

    card = write_data_card(tmp_path / "out", data, tokenizer, max_length=256)

    assert card["mixture"] == [
        {"source": str(many), "mixture": "weight 1", "before": 30, "after": 10, "share_before": 0.75,
         "share_after": 0.25, "uses_per_row": round(10 / 30, 3)},
        {"source": str(rare), "mixture": "weight 3", "before": 10, "after": 30, "share_before": 0.25,
         "share_after": 0.75, "uses_per_row": 3.0}]
    markdown = (tmp_path / "out" / "data_card.md").read_text()
    assert f"| {rare} | weight 3 | 10 | 25.0% | 30 | 75.0% | 3 (upsampled) |" in markdown
    assert f"| {many} | weight 1 | 30 | 75.0% | 10 | 25.0% | 0.333 |" in markdown
    assert card["token_lengths"]["train"]["examples"] == 40
    # without a weight or fraction the card has no mixture section
    plain = prepare_data([str(many)], medical.SCHEMAS, eval_fraction=0.0)
    assert write_data_card(tmp_path / "plain", plain, tokenizer, max_length=256)["mixture"] is None


def test_the_share_is_read_after_any_source_name():
    assert (parse_source("owner/name:config@test weight=2").hub, parse_source("owner/name@test weight=2").weight,
            parse_source("owner/name@test weight=2").split) == ("owner/name:config", 2.0, "test")
    assert parse_source("data/file.jsonl  fraction=0.25").fraction == 0.25
    assert parse_source("data/file.jsonl  fraction=0.25").text == "data/file.jsonl"
    assert parse_source("owner/name").mixture == ""


@pytest.mark.parametrize("sources, eval_sources, expected", [
    (["a.jsonl weight=2", "b.jsonl"], None, r"^b.jsonl: no weight, while a.jsonl has one"),
    (["a.jsonl weight=2", "b.jsonl fraction=0.5"], None, r"^b.jsonl: no weight"),
    (["a.jsonl weight=0"], None, r"^a.jsonl weight=0: weight must be a number > 0, got '0'$"),
    (["a.jsonl fraction=half"], None, r"fraction must be a number > 0, got 'half'"),
    (["a.jsonl fraction=nan"], None, r"fraction must be a number > 0, got 'nan'"),
    (["a.jsonl"], ["owner/cases weight=2"], r"^owner/cases: an eval source takes no weight or fraction"),
])
def test_a_bad_share_is_a_one_line_error(sources, eval_sources, expected):
    with pytest.raises(RecipeError, match=expected):
        prepare_data(sources, medical.SCHEMAS, eval_sources=eval_sources)


def test_a_yaml_mapping_as_a_source_is_a_one_line_error(tmp_path):
    config = tmp_path / "mapping.yaml"
    smoke = (REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml").read_text()
    config.write_text(smoke + "\neval_dataset_name:\n  - {name: owner/cases, weight: 2}\n")
    with pytest.raises(RecipeError, match=r"a source is a string, got \{'name': 'owner/cases', 'weight': 2\}: write "
                                          r"'SOURCE weight=W'"):
        parse_args(config, ["--output_dir", str(tmp_path)])
