"""The legal and finance demos as a user runs them, through the real 4-bit bitsandbytes path."""

import json

import pytest
from conftest import log_history, run_recipe
from safetensors.torch import load_file

DEMOS = {"legal": "law_stackexchange", "finance": "fingpt_sentiment"}


@pytest.fixture(scope="module", params=sorted(DEMOS))
def demo_run(request, tmp_path_factory):
    """`accelerate launch recipes/sft_<domain>.py --config <domain>_smoke.yaml`, 12 steps: (domain, output_dir)."""
    domain = request.param
    output_dir = tmp_path_factory.mktemp(f"{domain}-smoke")
    proc = run_recipe(f"recipes/sft_{domain}.py", "--config", f"recipes/configs/{domain}_smoke.yaml",
                      "--output_dir", str(output_dir), "--max_steps", "12", "--logging_steps", "3",
                      "--eval_steps", "12", "--save_steps", "12", "--dataset_num_proc", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a few hundred rows never repay four worker processes: the recipe tokenizes in one, and says so
    assert "dataset_num_proc 4 -> 1 process for" in proc.stdout
    return domain, output_dir


def test_demo_trains_a_4bit_adapter_and_the_loss_falls(demo_run):
    domain, output_dir = demo_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "run_card.json"):
        assert (output_dir / name).is_file(), name
    losses = [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]
    assert len(losses) == 4 and losses[0] > losses[-1] + 1.0, losses
    weights = load_file(output_dir / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2 and all("lora_" in name for name in weights)
    card = json.loads((output_dir / "run_card.json").read_text())
    assert card["config"]["model"]["load_in_4bit"] is True and card["config"]["model"]["bnb_4bit_quant_type"] == "nf4"
    assert "eval_loss" in card["metrics"]
    assert card["config"]["training"]["dataset_num_proc"] is None  # what the run used, not what was asked


def test_demo_writes_its_data_card_next_to_the_adapter(demo_run):
    domain, output_dir = demo_run
    data_card = json.loads((output_dir / "data_card.json").read_text())
    run_card = json.loads((output_dir / "run_card.json").read_text())
    assert [s["read"] for s in data_card["sources"]] == [s["read"] for s in run_card["data"]]
    assert data_card["total"]["train"] == sum(s["train"] for s in run_card["data"])
    source = next(s for s in data_card["sources"] if s["schema"] == DEMOS[domain])
    assert source["duplicates"] > 0 if domain == "finance" else source["dropped"]["no answers"] > 0
    assert data_card["token_lengths"]["train"]["longer_than_max_length"] == 0  # the smoke data fits max_length 512
    assert (output_dir / "data_card.md").read_text().startswith("# Data card")
    assert (output_dir / "data_card_lengths.png").stat().st_size > 5_000
