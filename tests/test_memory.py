"""The memory planner: its arithmetic on real architectures, and its peak against measured training steps."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import REPO_ROOT

from lora_recipes.errors import RecipeError
from lora_recipes.measure import long_chats, measure_here, random_model
from lora_recipes.memory import (
    GiB,
    Setup,
    architecture,
    largest_batch,
    layer_activation_bytes,
    parse_memory,
    plan,
    resolve_config,
    weight_bytes,
)

SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"


@pytest.fixture(scope="module")
def llama_8b():
    return architecture("meta-llama/Llama-3.1-8B-Instruct")


def test_llama_8b_shapes_and_parameter_count(llama_8b):
    assert (llama_8b.layers, llama_8b.hidden, llama_8b.vocab, llama_8b.tied_embeddings) == (32, 4096, 128256, False)
    assert {lin.name: (lin.in_features, lin.out_features) for lin in llama_8b.layer_linears} == {
        "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 1024), "self_attn.v_proj": (4096, 1024),
        "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (4096, 14336), "mlp.up_proj": (4096, 14336),
        "mlp.down_proj": (14336, 4096)}
    assert llama_8b.total_params == 8_030_261_248


def test_llama_8b_4bit_weight_bytes(llama_8b):
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    other = 8_030_261_248 - linear  # embeddings, LM head, norms: kept in bf16
    nf4 = linear // 2
    double_quant = linear // 64 + linear // 64 // 256 * 4  # uint8 absmax per 64 weights + fp32 per 256 absmax
    total, constants = weight_bytes(llama_8b, Setup(quant="4bit", double_quant=True))
    assert constants == double_quant
    assert total == nf4 + double_quant + 2 * other == 5_702_295_552  # 5.31 GiB
    single, single_constants = weight_bytes(llama_8b, Setup(quant="4bit", double_quant=False))
    assert single_constants == linear // 64 * 4 and single - total == single_constants - constants
    rows = 32 * (3 * 4096 + 2 * 1024 + 2 * 14336)  # one fp32 scale per output row
    assert weight_bytes(llama_8b, Setup(quant="8bit"))[0] == linear + rows * 4 + 2 * other
    assert weight_bytes(llama_8b, Setup(quant="none"))[0] == 2 * 8_030_261_248


def test_lora_parameter_counts_match_peft():
    # PEFT prints these for r=16 on all linear layers: 41,943,040 (Llama 3.1 8B) and 18,464,768 (Qwen2.5 1.5B)
    assert plan(architecture("meta-llama/Llama-3.1-8B-Instruct"), Setup(lora_r=16)).trainable_params == 41_943_040
    assert plan(architecture("Qwen/Qwen2.5-1.5B-Instruct"), Setup(lora_r=16)).trainable_params == 18_464_768


def test_linears_grouped_by_the_input_they_read(llama_8b):
    # traced on the meta device: q/k/v share the normed hidden state, gate/up the other; o and down read their own
    assert llama_8b.input_groups == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    # Phi-3 fuses q/k/v and gate/up: one adapter per fused projection, so fewer dropout copies than Llama's layout
    phi3 = architecture("microsoft/Phi-3-mini-4k-instruct")
    assert phi3.input_groups == (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                 ("mlp.down_proj",))
    assert plan(phi3, Setup(lora_r=8)).trainable_params == 32 * 8 * (3072 + 3072 + 3072 + 9216 + 3072 + 16384 + 8192
                                                                     + 3072)


def test_checkpointing_keeps_one_hidden_state_per_layer(llama_8b):
    setup = Setup(per_device_train_batch_size=2, max_length=1024)
    on, off = plan(llama_8b, setup), plan(llama_8b, replace(setup, activation_checkpointing=False))
    tokens = 2 * 1024
    assert on.activations_if_checkpointing == pytest.approx(tokens * (32 * 4096 * 2 + layer_activation_bytes(
        llama_8b, setup)))
    assert off.parts["activations"] > 10 * on.parts["activations"] and off.peak > on.peak


@pytest.fixture(scope="module")
def llama_70b():
    return architecture("meta-llama/Llama-3.1-70B-Instruct")


def test_fsdp_and_zero3_plan_one_shard_of_the_weights_per_device(llama_70b):
    """FSDP and ZeRO-3 split every parameter, its gradient and its optimizer state across the processes; the 4-bit
    quantisation constants are not parameters and stay whole on every device (measured: tests/test_fsdp2.py)."""
    setup = Setup(per_device_train_batch_size=1, max_length=2048, world_size=8, mixed_precision="bf16")
    ddp, fsdp = plan(llama_70b, replace(setup, strategy="ddp")), plan(llama_70b, replace(setup, strategy="fsdp"))
    whole, constants = weight_bytes(llama_70b, setup)
    assert ddp.parts["weights"] == whole  # DDP: the whole model on every device
    assert fsdp.parts["weights"] == pytest.approx((whole - constants) / 8 + constants)
    # the units all-gathered for compute: two decoder layers (the one running and the one prefetched) and the LM head
    # with the final norm (accelerate keeps that tail unit whole from its forward to its backward)
    layer_linear = sum(lin.in_features * lin.out_features for lin in llama_70b.layer_linears)
    layer = layer_linear / 2 + (llama_70b.layer_params - layer_linear) * 2
    head = llama_70b.vocab * llama_70b.hidden * 2 + llama_70b.final_norm_width * 2
    assert fsdp.parts["gathered"] == pytest.approx(2 * layer + head, rel=0.01)
    for part in ("adapter", "gradients", "optimizer"):  # DDP also keeps a bucketed copy of the gradients
        assert fsdp.parts[part] == pytest.approx(ddp.parts[part] / (16 if part == "gradients" else 8)), part
    zero3 = plan(llama_70b, replace(setup, strategy="zero3"))
    assert zero3.parts["weights"] == fsdp.parts["weights"] and zero3.parts["gathered"] == fsdp.parts["gathered"]
    # DeepSpeed under bf16 keeps an fp32 master copy of the trainable parameters and fp32 optimizer states
    assert zero3.parts["optimizer"] == pytest.approx(ddp.trainable_params * (4 + 2 * 4) / 8)
    zero2 = plan(llama_70b, replace(setup, strategy="zero2"))
    assert zero2.parts["weights"] == whole and "gathered" not in zero2.parts
    assert zero2.parts["gradients"] == pytest.approx(fsdp.parts["gradients"])
    assert zero2.parts["optimizer"] == zero3.parts["optimizer"]


def test_fsdp_qlora_70b_fits_where_ddp_does_not(llama_70b):
    """The case fsdp_qlora.yaml exists for: a 4-bit 70B on 8 x 24 GB GPUs."""
    setup = Setup(per_device_train_batch_size=2, gradient_accumulation_steps=8, max_length=2048, world_size=8,
                  mixed_precision="bf16")
    budget = parse_memory("24GB")
    assert largest_batch(llama_70b, replace(setup, strategy="ddp"), budget) is None  # 37 GiB of weights per device
    fsdp = plan(llama_70b, replace(setup, strategy="fsdp", per_device_train_batch_size=1))
    assert fsdp.peak < budget
    assert largest_batch(llama_70b, replace(setup, strategy="fsdp"), budget) is not None


@pytest.mark.parametrize("hub_id, file", [
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b.json"),
    ("Qwen/Qwen2.5-7B", "qwen2.5-7b-instruct.json"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-instruct-v0.3.json"),
    ("google/gemma-2-9b-it", "gemma-2-9b-it.json"),
])
def test_hub_ids_resolve_to_shipped_configs(hub_id, file):
    assert resolve_config(hub_id)[1].endswith(file)


def test_unknown_model_is_one_line_error():
    with pytest.raises(RecipeError, match="no config.json found .* pass --model path/to/config.json"):
        resolve_config("someone/Unknown-13B")


def test_largest_batch_keeps_sequences_per_step(llama_8b):
    setup = Setup(per_device_train_batch_size=4, gradient_accumulation_steps=4, max_length=2048)
    fits = [largest_batch(llama_8b, setup, parse_memory(f"{gb}GB")) for gb in (6, 16, 24, 40, 80)]
    assert fits[0] is None  # 5.3 GiB of weights + a 2048-token sequence does not fit 6 GiB
    batches = [f[0] for f in fits[1:]]
    assert batches == sorted(batches) and batches[-1] == 16
    assert all(b * accumulation == 16 for b, accumulation in fits[1:])
    for b, accumulation in fits[1:]:
        assert plan(llama_8b, replace(setup, per_device_train_batch_size=b,
                                      gradient_accumulation_steps=accumulation)).peak <= 80 * GiB


def test_plan_memory_cli():
    proc = subprocess.run([sys.executable, "recipes/plan_memory.py", "--model", "Qwen/Qwen2.5-1.5B-Instruct",
                           "--quant", "4bit", "--lora_r", "16", "--max_length", "2048",
                           "--per_device_train_batch_size", "4", "--gpu_memory", "24GB"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("weights as stored", "LoRA parameters", "optimizer states", "activations", "logits and loss",
                "framework overhead", "peak", "24 GiB, checkpointing on: per_device_train_batch_size 4"):
        assert row in proc.stdout
    bad = subprocess.run([sys.executable, "recipes/plan_memory.py", "--model", "nobody/Nothing-1B"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: model")


def test_plan_memory_cli_advises_sharding_and_plans_it():
    command = [sys.executable, "recipes/plan_memory.py", "--model", "meta-llama/Llama-3.1-70B-Instruct",
               "--gpu_memory", "24GB", "--per_device_train_batch_size", "1", "--num_processes", "8"]
    ddp = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "8 processes (DDP: everything on every device)" in ddp.stdout
    assert "does not fit even 1 sequence per device" in ddp.stdout
    assert "or shard the model across the processes (accelerate_configs/fsdp_qlora.yaml)" in ddp.stdout
    fsdp = subprocess.run([*command, "--strategy", "fsdp"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    assert "8 processes (FSDP full shard)" in fsdp.stdout and "whole units for compute" in fsdp.stdout
    assert "24 GiB, checkpointing on: per_device_train_batch_size 1" in fsdp.stdout
    assert "Not modelled (fsdp): communication buffers" in fsdp.stdout


@pytest.mark.parametrize("config_name, strategy", [("multi_gpu.yaml", "ddp"), ("fsdp_qlora.yaml", "fsdp"),
                                                   ("deepspeed_zero3.yaml", "zero3")])
def test_recipe_plan_takes_the_strategy_from_its_launch(config_name, strategy, monkeypatch):
    from test_distributed import CONFIGS, launch_env

    from lora_recipes.config import parse_args
    from lora_recipes.memory import setup_from_args

    _, training_args, model_args = parse_args(SMOKE, ["--use_cpu", "false", "--bnb_4bit_quant_storage", "bfloat16"])
    for key, value in launch_env(CONFIGS / config_name).items():  # 8 processes of that launch
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(type(training_args), "world_size", property(lambda _: 8))
    setup = setup_from_args(training_args, model_args)
    assert (setup.world_size, setup.strategy) == (8, strategy)


def test_recipe_dry_run_plans_and_exits_before_loading(tmp_path):
    proc = subprocess.run([sys.executable, "recipes/sft_medical.py", "--dry_run", "true", "--use_cpu", "true",
                           "--output_dir", str(tmp_path / "out")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Memory plan for Qwen/Qwen2.5-1.5B-Instruct" in proc.stdout and "Dry run: nothing was loaded" in proc.stdout
    assert "4 sequences x 2048 tokens per device" in proc.stdout
    assert not (tmp_path / "out").exists()


# Small random-init models of different shapes, trained for 2 steps through the recipe on CPU: the planned peak
# (without the process's own runtime) against the peak of live tensor bytes measured during those steps.
SHAPES = {
    "llama-gqa-4bit-no-checkpointing": (
        {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 2048},
        ["--activation_checkpointing", "false"]),
    "qwen2-8bit-checkpointing": (
        {"model_type": "qwen2", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 2,
         "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 1024},
        ["--load_in_4bit", "false", "--load_in_8bit", "true", "--activation_checkpointing", "true"]),
    "phi3-fused-plain-lora": (
        {"model_type": "phi3", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048},
        ["--load_in_4bit", "false", "--activation_checkpointing", "false", "--lora_dropout", "0"]),
}


@pytest.mark.parametrize("name", SHAPES)
def test_planned_peak_within_20_percent_of_measured(name, tmp_path):
    from transformers import AutoTokenizer

    from lora_recipes.config import parse_args
    from lora_recipes.memory import setup_from_args

    shape, overrides = SHAPES[name]
    model = random_model(tmp_path / "model", **dict(shape))
    data = long_chats(tmp_path / "chats.jsonl", rows=16, words=200)
    # max_length = the shortest chat: every sequence fills it, as the planner assumes, and no row is wholly too long
    # (the recipe refuses data where every row exceeds max_length)
    tokenizer = AutoTokenizer.from_pretrained(model)
    max_length = min(len(tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=True)["input_ids"])
                     for line in data.read_text().splitlines())
    args = ["--config", str(SMOKE), "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--max_length", str(max_length),
            "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--eval_fraction", "0",
            "--logging_steps", "100", *overrides]
    measured = measure_here({"kind": "recipe", "domain": "medical", "config": str(SMOKE), "args": args,
                             "track_tensors": True})
    _, training_args, model_args = parse_args(SMOKE, args)
    planned = plan(architecture(str(model)), setup_from_args(training_args, model_args))

    assert measured["padding_waste"] == 0  # every sequence filled max_length, as the planner assumes
    error = planned.peak_without_runtime / measured["tensor_peak_bytes"] - 1
    parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in planned.parts.items())
    assert abs(error) <= 0.20, (f"{name}: planned {planned.peak_without_runtime / 2**20:.0f} MiB ({parts}), "
                                f"measured {measured['tensor_peak_bytes'] / 2**20:.0f} MiB of tensors "
                                f"(resident growth {(measured['rss_peak_bytes']) / 2**20:.0f} MiB)")
    weights_error = planned.parts["weights"] / measured["weight_tensor_bytes"] - 1
    assert abs(weights_error) <= 0.10, f"weights: planned {planned.parts['weights']}, held {measured}"
