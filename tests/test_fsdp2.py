"""FSDP2 + QLoRA on CPU: the recipe prepared by accelerate's own FSDP2 path (accelerate_configs/fsdp_qlora.yaml) in two
gloo processes, against one process on the same data.

accelerate turns FSDP on for accelerators only. `allow_fsdp_on_cpu` below bypasses exactly that gate and nothing else:
the plugin is the one accelerate builds from the launch environment of fsdp_qlora.yaml, the model goes through
`fsdp2_prepare_model` inside the Trainer, and the adapter is saved by the Trainer's FULL_STATE_DICT path. Run as a
script (`torchrun ... tests/test_fsdp2.py RECIPE-ARGS`), this file is the worker each process runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = "FSDP2_TEST_RECORD"  # folder where each process of the worker writes what it measured


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP with gloo on CPU, as it runs it on GPUs.

    Two checks in accelerate/state.py keep FSDP off a machine without an accelerator: `PartialState._prepare_backend`
    starts a CPU process group (gloo, MULTI_CPU) only when asked for CPU, and `AcceleratorState.__init__` sets
    `DistributedType.FSDP` only for accelerator types (the `elif self.distributed_type in [MULTI_GPU, ...]` branch).
    Here the first always takes the CPU branch, and after the second we do what its FSDP branch does.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    prepare_backend = PartialState._prepare_backend
    state_init = AcceleratorState.__init__

    def cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return prepare_backend(self, True, sagemaker_dp, backend)

    def with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    PartialState._prepare_backend = cpu_backend
    AcceleratorState.__init__ = with_fsdp


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(quant_state) -> int:
    """Bytes of the tensors bitsandbytes keeps beside a 4-bit weight (absmax, nested absmax, code tables)."""
    import torch

    return sum(tensor_bytes(v) for v in quant_state.as_dict(packed=False).values() if isinstance(v, torch.Tensor))


def worker_callback():
    """A TrainerCallback recording, per process, what it holds once the model is prepared and its LoRA shards at the
    end, and checking at every forward of a 4-bit layer that the weight it computes with is whole and quantised."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.forwards = []  # (packed shape seen at forward, full packed shape, has quant_state) per call
            self.quant_states = {}  # module -> bytes of its quantisation constants, read at its first forward

        def check_weight(self, full_shape):
            def hook(module, _):
                # the constants sit on the weight, or on the module once FSDP swapped the weight for a plain tensor
                state = getattr(module.weight, "quant_state", None)
                state = getattr(module, "quant_state", None) if state is None else state
                self.forwards.append((tuple(module.weight.shape), full_shape, state is not None))
                if state is not None:
                    self.quant_states[module] = quant_state_bytes(state)
            return hook

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            held = {"4bit": 0, "frozen": 0, "lora": 0, "4bit_full": 0, "frozen_full": 0, "lora_full": 0,
                    "sharded_params": 0, "params": 0}
            four_bit = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}
            for p in model.parameters():
                kind = "lora" if p.requires_grad else "4bit" if id(p) in four_bit else "frozen"
                held[kind] += tensor_bytes(p.to_local() if isinstance(p, DTensor) else p)
                held[f"{kind}_full"] += tensor_bytes(p)
                held["sharded_params"] += isinstance(p, DTensor)
                held["params"] += 1
            for module in model.modules():
                if isinstance(module, Linear4bit):  # bitsandbytes' layer, not PEFT's LoRA layer of the same name
                    module.register_forward_pre_hook(self.check_weight(tuple(module.weight.shape)))
            self.held = held

        def on_train_end(self, args, state, control, model=None, **kwargs):
            shards = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    local = p.to_local() if isinstance(p, DTensor) else p
                    shards[name] = local.detach().to(torch.float32).contiguous()
            folder = Path(os.environ[RECORD])
            save_file(shards, folder / f"lora_shards.rank{args.process_index}.safetensors")
            whole = all(seen == full and has_state for seen, full, has_state in self.forwards)
            (folder / f"rank{args.process_index}.json").write_text(json.dumps(
                {**self.held, "quant_state": sum(self.quant_states.values()), "forwards": len(self.forwards),
                 "forwards_with_whole_quantised_weight": whole}))

    return Record()


def worker() -> None:
    """One process of the run: the medical recipe (lora_recipes/sft.py) with the recording callback."""
    sys.path.insert(0, str(REPO_ROOT))
    allow_fsdp_on_cpu()
    from data import medical
    from lora_recipes.config import parse_args
    from lora_recipes.errors import exit_on_recipe_error
    from lora_recipes.sft import main

    exit_on_recipe_error(lambda: main(medical, *parse_args(REPO_ROOT / "recipes" / "configs" / "medical.yaml"),
                                      callbacks=[worker_callback()]))()


if __name__ == "__main__":
    worker()
    sys.exit()

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import log_history  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_distributed import CONFIGS, EIGHT_BIT, SMOKE, run_torchrun  # noqa: E402
from test_distributed import launch_env as accelerate_launch_env  # noqa: E402

# 4 steps of the smoke recipe, every step logged; dropout 0 (each rank would draw its own masks), 4-bit NF4 with the
# packed weights stored as bfloat16 as fsdp_qlora.yaml needs. --use_cpu false: the launch a GPU machine gets, so the
# recipe sees FSDP (on CPU accelerate and the recipe would both say DDP)
STEPS = 4
COMMON = ["--config", str(SMOKE), "--use_cpu", "false", "--dtype", "bfloat16", "--bnb_4bit_quant_storage", "bfloat16",
          "--max_steps", str(STEPS), "--logging_steps", "1", "--lora_dropout", "0", "--eval_strategy", "no",
          "--save_strategy", "no", "--eval_after_training", "false"]
WORKER = str(Path(__file__).resolve())
# bf16 tolerance for the final adapters, as a relative (Frobenius) distance: one bf16 rounding is up to 0.4%, and a
# few Adam steps carry it on; measured 0.56% over the whole adapter and 0.76% over the lora_B matrices (the whole
# update), 1.2% for the furthest single matrix (cosine similarity >= 0.99993)
MAX_WEIGHT_ERROR = 0.02


def fsdp_env(record: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file fsdp_qlora.yaml` gives each process (torchrun sets WORLD_SIZE),
    single-threaded so two processes share the CI machine's cores without contention."""
    env = {k: v for k, v in accelerate_launch_env(CONFIGS / "fsdp_qlora.yaml").items() if k != "WORLD_SIZE"}
    return {**os.environ, **env, RECORD: str(record), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fsdp_and_single(tmp_path_factory):
    """The recipe as 2 FSDP2 processes x 4 sequences and as 1 process x 8 (same bf16 mixed precision, no FSDP):
    (output_dir, record folder) each."""
    runs = {}
    for name in ("fsdp", "single"):
        out, record = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(f"{name}-record")
        env = fsdp_env(record)
        if name == "fsdp":
            proc = run_torchrun([WORKER, *COMMON, "--per_device_train_batch_size", "4", "--output_dir", str(out)], env)
        else:
            env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_USE_FSDP", "FSDP_"))}
            proc = subprocess.run([sys.executable, WORKER, *COMMON, "--per_device_train_batch_size", "8",
                                   "--output_dir", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (out, record, proc)
    return runs


def held(record: Path, rank: int) -> dict:
    return json.loads((record / f"rank{rank}.json").read_text())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fsdp2_ran_two_sharded_processes(fsdp_and_single):
    out, record, proc = fsdp_and_single["fsdp"]
    card = json.loads((out / "run_card.json").read_text())
    assert (card["strategy"], card["num_processes"], card["global_batch_size"]) == ("fsdp", 2, 8)
    assert "global batch = 4 per device x 1 accumulation x 2 processes = 8 sequences/step" in proc.stdout
    for rank in (0, 1):  # every parameter of the model is a DTensor shard after fsdp2_prepare_model
        assert held(record, rank)["sharded_params"] == held(record, rank)["params"] > 0


def test_each_rank_holds_half_of_the_4bit_base(fsdp_and_single):
    """The packed 4-bit weights (bf16 storage), the other frozen weights and the adapter: half on each rank, the two
    halves adding up to what one process holds. The quantisation constants are not parameters: whole on each rank."""
    single = held(fsdp_and_single["single"][1], 0)
    ranks = [held(fsdp_and_single["fsdp"][1], rank) for rank in (0, 1)]
    for kind in ("4bit", "frozen", "lora"):
        assert ranks[0][kind] + ranks[1][kind] == ranks[0][f"{kind}_full"] == single[kind] > 0, kind
        assert [r[kind] / single[kind] for r in ranks] == [pytest.approx(0.5, abs=0.02)] * 2, kind
    assert ranks[0]["quant_state"] == ranks[1]["quant_state"] == single["quant_state"] > 0


def test_every_forward_computes_with_the_whole_quantised_weight(fsdp_and_single):
    """FSDP gathers each 4-bit weight as a plain tensor: bitsandbytes must still find its quantisation state."""
    single = held(fsdp_and_single["single"][1], 0)
    for rank in (0, 1):
        record = held(fsdp_and_single["fsdp"][1], rank)
        assert record["forwards"] == single["forwards"] > 0
        assert record["forwards_with_whole_quantised_weight"]


def test_fsdp2_losses_match_one_process(fsdp_and_single):
    fsdp = [e for e in log_history(fsdp_and_single["fsdp"][0]) if "loss" in e]
    single = [e for e in log_history(fsdp_and_single["single"][0]) if "loss" in e]
    assert [e["step"] for e in fsdp] == [e["step"] for e in single] == list(range(1, STEPS + 1))
    assert [e["num_tokens"] for e in fsdp] == [e["num_tokens"] for e in single]  # the same sequences in each step
    # bf16 tolerance: at a loss of 8-16 one bf16 step is 0.0625 (0.6%); measured: at most 0.23% apart (step 2), grad
    # norms at most 0.4% apart
    for f, s in zip(fsdp, single, strict=True):
        assert f["loss"] == pytest.approx(s["loss"], rel=0.01), (f, s)
        assert f["grad_norm"] == pytest.approx(s["grad_norm"], rel=0.01), (f, s)


def test_fsdp2_final_lora_weights_match_one_process(fsdp_and_single):
    fsdp = load_file(fsdp_and_single["fsdp"][0] / "adapter_model.safetensors")
    single = load_file(fsdp_and_single["single"][0] / "adapter_model.safetensors")
    assert sorted(fsdp) == sorted(single)
    names = sorted(single)
    # lora_B starts at zero: it is the training's whole update. bf16 weights, Adam at lr 1e-2: an update whose gradient
    # is near zero can take either sign from rounding, so compare the whole adapter, not single entries
    for subset in (names, [n for n in names if "lora_B" in n]):
        error = relative_error(torch.cat([fsdp[n].flatten() for n in subset]),
                               torch.cat([single[n].flatten() for n in subset]))
        assert error < MAX_WEIGHT_ERROR, (subset[0], error)


def test_saved_adapter_is_complete_and_equals_the_gathered_shards(fsdp_and_single):
    """FULL_STATE_DICT: the adapter rank 0 saved holds every LoRA tensor, each exactly the two ranks' shards joined."""
    out, record, _ = fsdp_and_single["fsdp"]
    saved = load_file(out / "adapter_model.safetensors")
    layers = json.loads((REPO_ROOT / "data" / "tiny-llama" / "config.json").read_text())["num_hidden_layers"]
    assert len(saved) == layers * 7 * 2  # A and B of q, k, v, o, gate, up, down in every layer
    shards = [load_file(record / f"lora_shards.rank{rank}.safetensors") for rank in (0, 1)]
    for name, tensor in saved.items():
        parameter = name.replace(".weight", ".default.weight")
        whole = torch.cat([shards[0][parameter], shards[1][parameter]])
        assert torch.equal(tensor.float(), whole), name


@pytest.mark.parametrize("overrides, message", [
    (["--bnb_4bit_quant_storage", "uint8"], "4-bit + FSDP needs the packed weights in a float dtype"),
    (EIGHT_BIT, "8-bit weights cannot be sharded by FSDP"),
], ids=["4bit-uint8", "8bit"])
def test_unshardable_quantisation_refused_before_anything_loads(overrides, message, tmp_path):
    """The same worker, FSDP gate bypassed, one process of the launch (without WORLD_SIZE it waits for no one)."""
    env = fsdp_env(tmp_path)
    proc = subprocess.run([sys.executable, WORKER, *COMMON, *overrides, "--output_dir", str(tmp_path / "out")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("rank*.json"))  # nothing prepared or trained


def test_planned_fsdp_shard_is_the_measured_shard(fsdp_and_single):
    """lora_recipes/memory.py against what each rank held: the sharded weights and adapter to the byte."""
    from lora_recipes.memory import Setup, architecture, plan, weight_bytes

    setup = Setup(quant="4bit", dtype="bfloat16", mixed_precision="bf16", lora_r=16, world_size=2, strategy="fsdp",
                  device="cpu")
    planned = plan(architecture(str(REPO_ROOT / "data" / "tiny-llama")), setup)
    _, constants = weight_bytes(planned.arch, setup)
    for rank in (0, 1):
        record = held(fsdp_and_single["fsdp"][1], rank)
        assert planned.parts["weights"] - constants == record["4bit"] + record["frozen"]
        assert planned.parts["adapter"] == record["lora"]


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed without a GPU: deepspeed 0.19.8 installs on CPU (no compiled ops at install), but its CPU communication
# backend JIT-compiles a C++ shared-memory op at the first `deepspeed.initialize` (minutes and over 1 GiB of compiler
# memory on the CI machine), and accelerate enables DeepSpeed for accelerators only. What runs here: the plugin
# accelerate builds from each config, against what the recipe and the memory planner read from the same launch.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_plugin_from_each_config_is_what_the_recipe_plans_for(name, stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    from lora_recipes.config import parse_args
    from lora_recipes.distributed import launch_strategy

    _, training_args, _ = parse_args(SMOKE, ["--use_cpu", "false"])
    for key, value in accelerate_launch_env(CONFIGS / name).items():
        monkeypatch.setenv(key, value)
    zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage and launch_strategy(training_args) == f"zero{stage}"
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "none"  # the planner's case
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
