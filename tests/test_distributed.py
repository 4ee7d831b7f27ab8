"""From one process to many: the accelerate configs, real two-process DDP on CPU, the SLURM launcher, and the
quantisation x strategy combinations that are refused before anything loads."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO_ROOT, log_history
from safetensors.torch import load_file

from lora_recipes.config import check_args, parse_args
from lora_recipes.distributed import global_batch_warning, launch_strategy
from lora_recipes.errors import RecipeError
from lora_recipes.reliability import last_checkpoint

CONFIGS = REPO_ROOT / "accelerate_configs"
SMOKE = REPO_ROOT / "recipes" / "configs" / "medical_smoke.yaml"
SLURM = CONFIGS / "slurm_multinode.sh"

# What each file's name promises: (distributed_type, strategy the recipe detects, fields that must hold)
PROMISES = {
    "single_gpu.yaml": ("NO", "single", {"num_processes": 1, "num_machines": 1}),
    "multi_gpu.yaml": ("MULTI_GPU", "ddp", {"num_machines": 1}),
    "multi_node.yaml": ("MULTI_GPU", "ddp", {"num_machines": 2, "same_network": False}),
    "fsdp_qlora.yaml": ("FSDP", "fsdp", {"fsdp_config": {
        "fsdp_version": 2, "fsdp_cpu_ram_efficient_loading": True, "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "zero2", {"deepspeed_config": {"zero_stage": 2}}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "zero3", {"deepspeed_config": {
        "zero_stage": 3, "zero3_save_16bit_model": True}}),
}


def launch_env(config_file) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives each process it starts (WORLD_SIZE: torchrun's)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "recipes/sft_medical.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if args.num_processes > 1:
        env["WORLD_SIZE"] = str(args.num_processes)
    return env


# ---------------------------------------------------------------------------------------------------------------
# accelerate_configs/
# ---------------------------------------------------------------------------------------------------------------
def test_every_config_has_promises():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PROMISES)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_config_loads_with_accelerate_and_keeps_its_promises(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))  # accelerate's loader: unknown top-level keys fail here
    distributed_type, strategy, fields = PROMISES[name]
    assert config.distributed_type.value == distributed_type
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    for key, expected in fields.items():
        value = getattr(config, key)
        if isinstance(expected, dict):
            assert {k: value.get(k) for k in expected} == expected, value
        else:
            assert value == expected, (key, value)
    # accelerate copies fsdp_config / deepspeed_config keys onto its launch arguments without checking them: a typo
    # would be ignored silently, so every key must name a real launch argument
    known = vars(launch_command_parser().parse_args(["x.py"]))
    for key in {**config.fsdp_config, **config.deepspeed_config}:
        assert key in known or f"fsdp_{key}" in known, key
    # and the recipe reads the launch the way the file means it (on GPUs: the smoke YAML's use_cpu turned off)
    _, training_args, _ = parse_args(SMOKE, ["--use_cpu", "false"])
    for key, value in launch_env(CONFIGS / name).items():
        monkeypatch.setenv(key, value)
    assert launch_strategy(training_args) == strategy


# ---------------------------------------------------------------------------------------------------------------
# Quantisation x strategy: refused before the model loads, in one line, with the alternative
# ---------------------------------------------------------------------------------------------------------------
FOUR_BIT_BF16 = ["--bnb_4bit_quant_storage", "bfloat16", "--dtype", "bfloat16"]
EIGHT_BIT = ["--load_in_4bit", "false", "--load_in_8bit", "true"]
PLAIN_LORA = ["--load_in_4bit", "false"]
REENTRANT = ["--activation_checkpointing_kwargs", '{"use_reentrant": true}']


def combination_error(config_name, overrides, monkeypatch, env=None):
    """check_args under the environment an accelerate config gives; the one-line error, or None if accepted."""
    # parsed before the launch environment is set: with WORLD_SIZE > 1 parsing would join a process group
    args = parse_args(SMOKE, ["--use_cpu", "false", *overrides])  # GPU launches: FSDP and DeepSpeed are GPU-only
    with monkeypatch.context() as patch:
        for key, value in (env if env is not None else launch_env(CONFIGS / config_name)).items():
            patch.setenv(key, value)
        try:
            check_args(*args)
        except RecipeError as e:
            assert "\n" not in str(e)
            return str(e)
    return None


@pytest.mark.parametrize("config_name, overrides, message", [
    ("fsdp_qlora.yaml", [], 'cannot shard ("Cannot flatten integer dtype tensors"): add --bnb_4bit_quant_storage'),
    ("fsdp_qlora.yaml", ["--bnb_4bit_quant_storage", "bfloat16"], "bnb_4bit_quant_storage (bfloat16) must equal "
                                                                  "dtype (float32)"),
    ("fsdp_qlora.yaml", EIGHT_BIT, "8-bit weights cannot be sharded by FSDP"),
    ("deepspeed_zero3.yaml", [], "4-bit + ZeRO-3 needs the packed weights in a float dtype"),
    ("deepspeed_zero3.yaml", EIGHT_BIT, "8-bit weights cannot be sharded by ZeRO-3"),
    ("multi_gpu.yaml", [*REENTRANT, "--ddp_find_unused_parameters", "true"],
     'fails under DDP with "Expected to mark a variable ready only once": set activation_checkpointing_kwargs'),
], ids=["fsdp-4bit-uint8", "fsdp-4bit-storage-mismatch", "fsdp-8bit", "zero3-4bit-uint8", "zero3-8bit",
        "ddp-reentrant-find-unused"])
def test_unsupported_combination_fails_with_reason_and_alternative(config_name, overrides, message, monkeypatch):
    error = combination_error(config_name, overrides, monkeypatch)
    assert error is not None and message in error, error


@pytest.mark.parametrize("config_name, overrides", [
    ("single_gpu.yaml", EIGHT_BIT),
    ("multi_gpu.yaml", []),
    ("multi_gpu.yaml", EIGHT_BIT),
    ("multi_gpu.yaml", REENTRANT),  # reentrant alone, and find_unused alone, train (checked on CPU DDP)
    ("multi_gpu.yaml", ["--ddp_find_unused_parameters", "true"]),
    ("multi_node.yaml", []),
    ("fsdp_qlora.yaml", FOUR_BIT_BF16),
    ("fsdp_qlora.yaml", PLAIN_LORA),
    ("deepspeed_zero2.yaml", []),
    ("deepspeed_zero2.yaml", EIGHT_BIT),
    ("deepspeed_zero3.yaml", FOUR_BIT_BF16),
    ("deepspeed_zero3.yaml", PLAIN_LORA),
])
def test_supported_combination_is_accepted(config_name, overrides, monkeypatch):
    assert combination_error(config_name, overrides, monkeypatch) is None


def test_zero3_without_16bit_gather_would_save_an_empty_adapter(monkeypatch, tmp_path):
    env = launch_env(CONFIGS / "deepspeed_zero3.yaml")
    del env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"]
    assert "writes an empty LoRA adapter" in combination_error(None, PLAIN_LORA, monkeypatch, env)
    # the same rule read from a DeepSpeed JSON (accelerate's deepspeed_config_file)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json), "WORLD_SIZE": "2"}
    assert "writes an empty LoRA adapter" in combination_error(None, PLAIN_LORA, monkeypatch, env)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": 1}}))
    assert combination_error(None, PLAIN_LORA, monkeypatch, env) is None


def test_fsdp2_with_sharded_state_dict_would_save_no_adapter(monkeypatch):
    env = {**launch_env(CONFIGS / "fsdp_qlora.yaml"), "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
    assert "saves no PEFT adapter" in combination_error(None, FOUR_BIT_BF16, monkeypatch, env)


def test_on_cpu_fsdp_and_deepspeed_run_as_ddp(monkeypatch):
    """accelerate enables FSDP and DeepSpeed for GPUs only: a CPU launch with their configs is plain DDP."""
    for name in ("fsdp_qlora.yaml", "deepspeed_zero3.yaml"):
        with monkeypatch.context() as patch:
            _, training_args, _ = parse_args(SMOKE, [])  # the smoke YAML: use_cpu true
            for key, value in launch_env(CONFIGS / name).items():
                patch.setenv(key, value)
            assert launch_strategy(training_args) == "ddp"
            patch.setenv("ACCELERATE_USE_CPU", "true")
            training_args.use_cpu = False
            assert launch_strategy(training_args) == "ddp"
    assert combination_error("fsdp_qlora.yaml", [], monkeypatch) is not None  # the same launch on GPUs: refused


@pytest.mark.parametrize("config_name, device_map", [
    ("single_gpu.yaml", {"": 0}), ("multi_gpu.yaml", {"": 0}), ("fsdp_qlora.yaml", None),
    ("deepspeed_zero2.yaml", None), ("deepspeed_zero3.yaml", None)])
def test_quantised_model_placement_per_strategy(config_name, device_map, monkeypatch):
    """On GPUs a quantised model goes whole onto the process's own GPU (its local rank, 0 here) for one process and
    DDP; FSDP and DeepSpeed place it themselves (ZeRO-3 refuses any device_map). from_pretrained is intercepted."""
    import torch
    import transformers

    from lora_recipes.model import load_model

    _, training_args, model_args = parse_args(SMOKE, ["--use_cpu", "false", *FOUR_BIT_BF16])
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: calls.append(kw))
    with monkeypatch.context() as patch:
        for key, value in launch_env(CONFIGS / config_name).items():
            patch.setenv(key, value)
        load_model(model_args, training_args)
    assert calls[0]["device_map"] == device_map and calls[0]["quantization_config"].load_in_4bit


def test_refused_before_the_model_loads_in_one_line():
    # one process of an FSDP launch (without WORLD_SIZE, which would wait for the other 7 to join)
    env = {**os.environ, **launch_env(CONFIGS / "fsdp_qlora.yaml")}
    del env["WORLD_SIZE"]
    proc = subprocess.run([sys.executable, "recipes/sft_medical.py", "--config", str(SMOKE), "--use_cpu", "false"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Cannot flatten integer dtype tensors" in errors[0], proc.stderr[-2000:]
    assert "global batch" not in proc.stdout  # stopped before the data, the model and the trainer


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed installed")
def test_deepspeed_launch_without_deepspeed_is_one_line(monkeypatch):
    for key, value in launch_env(CONFIGS / "deepspeed_zero2.yaml").items():
        if key != "WORLD_SIZE":  # one process of the launch, alone
            monkeypatch.setenv(key, value)
    with pytest.raises(RecipeError, match="needs a package that is not installed: .*deepspeed"):
        parse_args(SMOKE, [])


# ---------------------------------------------------------------------------------------------------------------
# Two-process DDP on CPU (gloo) against one process with the same global batch
# ---------------------------------------------------------------------------------------------------------------
# lora_dropout 0: with dropout each rank draws its own masks, and the comparison would measure noise
COMMON = ["--config", str(SMOKE), "--max_steps", "10", "--logging_steps", "5", "--lora_dropout", "0",
          "--eval_strategy", "no", "--save_strategy", "no"]
QUANTISATION = {"4bit": [], "8bit": EIGHT_BIT, "lora": PLAIN_LORA}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGS` on a free port. A run that hangs is stopped with the Python stack of every
    thread of every rank (faulthandler prints them on SIGABRT) and tried once more, the stacks kept as a warning in
    the report: gloo on CPU hung at exit about once in 40 runs (DDP's wrapper torn down after the process group;
    lora_recipes/sft.py now releases it first), and a hang that comes back must say where it is."""
    import psutil

    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**env, "PYTHONFAULTHANDLER": "1"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            ranks = psutil.Process(proc.pid).children(recursive=True)
            for rank in ranks:
                rank.send_signal(signal.SIGABRT)
            psutil.wait_procs(ranks, timeout=20)
            proc.kill()
            stdout, stderr = proc.communicate()
            report = (f"torchrun still running after {timeout} s (attempt {attempt}); stacks of its ranks:\n"
                      f"{stderr[-12000:]}\nstdout:\n{stdout[-2000:]}")
            if attempt == 2:
                pytest.fail(report)
            warnings.warn(report, stacklevel=2)
            if "--output_dir" in args:  # the recipe would refuse to overwrite the finished run the hang left behind
                shutil.rmtree(args[args.index("--output_dir") + 1], ignore_errors=True)


@pytest.fixture(scope="module", params=sorted(QUANTISATION))
def ddp_and_single(request, tmp_path_factory):
    """The smoke recipe as 2 processes x 4 sequences (torchrun, gloo) and as 1 process x 8: (output_dir, proc) each."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = [*COMMON, *QUANTISATION[request.param]]
    ddp_dir, single_dir = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    # torchrun's own entry point: `accelerate launch --cpu --num_processes 2` would silently start ONE process
    ddp = run_torchrun(["recipes/sft_medical.py", *args, "--output_dir", str(ddp_dir),
                        "--per_device_train_batch_size", "4"], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "recipes/sft_medical.py", *args, "--output_dir", str(single_dir)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    return (ddp_dir, ddp), (single_dir, single)


def test_ddp_really_ran_two_processes(ddp_and_single):
    (ddp_dir, ddp), (single_dir, single) = ddp_and_single
    assert "global batch = 4 per device x 1 accumulation x 2 processes = 8 sequences/step" in ddp.stdout
    assert "global batch = 8 per device x 1 accumulation x 1 processes = 8 sequences/step" in single.stdout
    card = json.loads((ddp_dir / "run_card.json").read_text())
    assert (card["num_processes"], card["global_batch_size"], card["strategy"]) == (2, 8, "ddp")
    assert json.loads((single_dir / "run_card.json").read_text())["num_processes"] == 1


def test_ddp_loss_trajectory_matches_one_process(ddp_and_single):
    (ddp_dir, _), (single_dir, _) = ddp_and_single
    ddp = [e for e in log_history(ddp_dir) if "loss" in e]
    single = [e for e in log_history(single_dir) if "loss" in e]
    assert [e["step"] for e in ddp] == [e["step"] for e in single] == [5, 10]
    # the same sequences in every optimizer step: the token counts summed over both ranks are exactly equal
    assert [e["num_tokens"] for e in ddp] == [e["num_tokens"] for e in single]
    # measured: within 3e-5 at steps 5 and 10 for all three (4-bit: 0.15% apart by step 25, bf16 adapter rounding)
    for d, s in zip(ddp, single, strict=True):
        assert d["loss"] == pytest.approx(s["loss"], rel=0.01), (d, s)
    assert ddp[0]["loss"] > ddp[-1]["loss"] + 1.0  # and it trained


def test_ddp_writes_one_adapter_and_prepares_the_data_once(ddp_and_single):
    (ddp_dir, ddp), (_, single) = ddp_and_single
    assert [p.relative_to(ddp_dir) for p in ddp_dir.rglob("adapter_model.safetensors")] == [
        ddp_dir.joinpath("adapter_model.safetensors").relative_to(ddp_dir)]
    assert ddp.stdout.count("Adapter, tokenizer and run card saved") == 1
    # every source is converted by one process only: as many conversion progress bars as a single-process run
    assert ddp.stderr.count("Converting medqa.jsonl") == single.stderr.count("Converting medqa.jsonl") > 0
    assert not (ddp_dir / "data_cache").exists()  # the shared copy is removed when every rank is done


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_with_every_rank_training_the_same_adapter(tmp_path):
    """Two processes SIGKILLed once checkpoint-4 is complete, then the same command again: every rank ends with the
    same adapter, the one an uninterrupted two-process run trains, with the same losses after the restart. A
    parameter whose dtype changes after DDP's wrap leaves DDP's gradient all-reduce: each rank would train its own."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = [*COMMON, "--max_steps", "8", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "4",
            "--per_device_train_batch_size", "4", "--eval_after_training", "false"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    proc = run_torchrun(["tests/distributed_probes.py", *args, "--output_dir", str(uninterrupted)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = run_torchrun(["tests/distributed_probes.py", "--kill_after_checkpoint", "4", *args, "--output_dir",
                           str(resumed)], env)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert last_checkpoint(resumed) == resumed / "checkpoint-4" and not (resumed / "run_card.json").exists()
    proc = run_torchrun(["tests/distributed_probes.py", *args, "--output_dir", str(resumed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoint-4'}" in proc.stdout

    # each rank's digest of its own trainable weights, written at the end of training
    digests = {folder.name: [(folder / f"adapter-rank{rank}.sha256").read_text() for rank in (0, 1)]
               for folder in (uninterrupted, resumed)}
    assert digests["resumed"][0] == digests["resumed"][1], "the ranks trained different adapters after the resume"
    assert digests["resumed"] == digests["uninterrupted"]
    saved = {folder.name: load_file(folder / "adapter_model.safetensors") for folder in (uninterrupted, resumed)}
    assert {w.dtype for w in saved["resumed"].values()} == {torch.bfloat16}  # TRL's QLoRA adapter dtype, kept
    losses = {folder.name: [(e["step"], e["loss"]) for e in log_history(folder) if "loss" in e]
              for folder in (uninterrupted, resumed)}
    assert [step for step, _ in losses["resumed"]] == [2, 4, 6, 8]
    assert losses["resumed"] == losses["uninterrupted"]


def test_a_long_evaluation_after_ddp_training_outlasts_the_collective_timeout(tmp_path):
    """Rank 0 evaluates alone after training. Another rank waiting for it at a barrier would be ended by the process
    group's timeout (`ddp_timeout`, 30 minutes by default; gloo raises, NCCL's watchdog aborts), failing the job after
    training succeeded. Here the timeout is 20 s once training ends and the evaluation starts 30 s late."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = run_torchrun(["tests/distributed_probes.py", "--collective_timeout", "20", "--slow_evaluation", "30",
                         *COMMON, "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir",
                         str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Evaluation report (base vs adapter)" in proc.stdout
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["adapter"] == str(tmp_path) and report["settings"]["limit"] == 8  # the smoke YAML's limit
    assert report["tasks"] and all(task["n"] > 0 for task in report["tasks"].values())
    assert json.loads((tmp_path / "run_card.json").read_text())["num_processes"] == 2
    assert not (tmp_path / "data_cache").exists()  # removed once the evaluation no longer reads the held-out split


# ---------------------------------------------------------------------------------------------------------------
# SLURM launcher
# ---------------------------------------------------------------------------------------------------------------
SLURM_ARGS = ["--nodes", "2", "--gpus_per_node", "4", "--recipe", "recipes/sft_medical.py",
              "--config", "recipes/configs/medical.yaml"]


def test_slurm_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0


def check_node_commands(lines: list[str], main_address: str, recipe_args: list[str]):
    """One `accelerate launch` per node: 2 machines, 8 processes in all, ranks 0 and 1, the same rendezvous."""
    assert len(lines) == 2, lines
    for rank, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:2] == ["accelerate", "launch"]
        assert dict(zip(argv[2:14:2], argv[3:14:2], strict=True)) == {
            "--config_file": "accelerate_configs/multi_node.yaml", "--num_machines": "2", "--num_processes": "8",
            "--machine_rank": str(rank), "--main_process_ip": main_address, "--main_process_port": "29500"}
        assert argv[14:] == ["recipes/sft_medical.py", "--config", "recipes/configs/medical.yaml", *recipe_args]


def test_slurm_dry_run_prints_one_launch_per_node():
    proc = subprocess.run(["bash", str(SLURM), *SLURM_ARGS, "--main_address", "10.0.0.1", "--dry_run", "--",
                           "--output_dir", "/shared/run 1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_node_commands(proc.stdout.splitlines(), "10.0.0.1", ["--output_dir", "/shared/run 1"])


def test_slurm_job_starts_the_same_commands_through_srun(tmp_path):
    """Inside an allocation (fake srun/scontrol/accelerate on PATH): each node's task runs its own machine rank."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a\\ngpu-b\\n"\n')
    # srun [options] bash -c CMD: run CMD once per node, with that node's SLURM_NODEID, as SLURM does
    (fake / "srun").write_text(
        '#!/bin/bash\n'
        'while [[ $1 == --* ]]; do case $1 in --nodes) n=$2; shift 2 ;; --*=*) shift ;; *) shift 2 ;; esac; done\n'
        'for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@"; done\n')
    (fake / "accelerate").write_text('#!/bin/bash\nprintf "%q " accelerate "$@" | sed "s/ $//"; echo\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.run(["bash", str(SLURM), *SLURM_ARGS], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_node_commands(proc.stdout.splitlines(), "gpu-a", [])
    # a node count that disagrees with the allocation is refused before anything starts
    proc = subprocess.run(["bash", str(SLURM), *SLURM_ARGS[:1], "3", *SLURM_ARGS[2:]], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --nodes 3 but the SLURM allocation has 2 nodes")


# ---------------------------------------------------------------------------------------------------------------
# The global batch: the YAMLs are sized for one process, a launch on several must keep their batch
# ---------------------------------------------------------------------------------------------------------------
def launch_examples() -> list[tuple[str, list[str]]]:
    """(file, command) for every multi-line-joined `accelerate launch --config_file` and SLURM launcher command
    written in the accelerate configs' comments and the recipes' docstrings."""
    examples = []
    for path in [*sorted(CONFIGS.iterdir()), *sorted((REPO_ROOT / "recipes").glob("sft_*.py"))]:
        lines = [line.strip() for line in path.read_text().splitlines()]
        if path.suffix != ".py":  # the examples are in the comments (the SLURM script's code builds a command too)
            lines = [line.removeprefix("#").strip() for line in lines if line.startswith("#")]
        text = "\n".join(lines).replace("\\\n", " ")
        for line in text.splitlines():
            for start in ("accelerate launch --config_file", "accelerate_configs/slurm_multinode.sh --nodes"):
                if start in line:
                    examples.append((path.name, shlex.split(line[line.index(start):], comments=True)))
    return examples


def global_batch_of(command: list[str]) -> tuple[int, int, str | None]:
    """(processes, global batch, the recipe's warning) of a launch example, its recipe flags parsed by the recipe."""
    import yaml

    def flag(args, name, default=None):
        return args[args.index(name) + 1] if name in args else default

    if command[0] == "accelerate":
        recipe_at = next(i for i, arg in enumerate(command) if arg.endswith(".py"))
        launcher, recipe, recipe_args = command[:recipe_at], command[recipe_at], command[recipe_at + 1:]
        written = yaml.safe_load((REPO_ROOT / flag(launcher, "--config_file")).read_text())
        processes = int(flag(launcher, "--num_processes", written["num_processes"]))
    else:  # slurm_multinode.sh: nodes x GPUs per node, the recipe's flags after `--`
        recipe = flag(command, "--recipe")
        processes = int(flag(command, "--nodes")) * int(flag(command, "--gpus_per_node"))
        passed_on = command[command.index("--") + 1:] if "--" in command else []
        recipe_args = ["--config", flag(command, "--config"), *passed_on]
    config = REPO_ROOT / flag(recipe_args, "--config", f"recipes/configs/{recipe.split('sft_')[1][:-3]}.yaml")
    _, training_args, _ = parse_args(config, [*recipe_args, "--use_cpu", "true"])
    per_device, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    return (processes, per_device * accumulation * processes,
            global_batch_warning(config, per_device, accumulation, processes))


def test_every_multi_gpu_example_keeps_the_yaml_global_batch():
    examples = launch_examples()
    assert len({name for name, _ in examples}) >= 7  # the six accelerate configs, the SLURM script and a recipe
    multi = [(name, global_batch_of(command)) for name, command in examples]
    assert sum(processes > 1 for _, (processes, _, _) in multi) >= 6
    assert [(name, warning) for name, (_, _, warning) in multi if warning] == []
    assert {batch for name, (_, batch, _) in multi if name.endswith(".yaml")} == {16}


def test_the_global_batch_warning_names_both_batches_and_the_fix():
    import yaml

    medical = REPO_ROOT / "recipes" / "configs" / "medical.yaml"
    written = yaml.safe_load(medical.read_text())
    per_device, accumulation = written["per_device_train_batch_size"], written["gradient_accumulation_steps"]
    assert global_batch_warning(medical, per_device, accumulation, 1) is None
    warning = global_batch_warning(medical, per_device, accumulation, 4)
    assert warning == (f"warning: global batch {per_device * accumulation * 4} ({per_device} per device x "
                       f"{accumulation} accumulation x 4 processes) differs from the {per_device * accumulation} "
                       f"that {medical} is sized for ({per_device} x {accumulation} x 1 process); to keep it, pass "
                       f"--gradient_accumulation_steps {accumulation // 4}")
    assert global_batch_warning(medical, per_device, accumulation // 4, 4) is None


def test_the_recipe_warns_when_the_launch_multiplies_the_batch(monkeypatch, capsys):
    """Four processes (faked) on a YAML sized for one: the warning before anything loads; none with the batch kept."""
    import yaml
    from trl import SFTConfig

    monkeypatch.setattr(SFTConfig, "world_size", property(lambda self: 4))
    written = yaml.safe_load(SMOKE.read_text())
    intended = written["per_device_train_batch_size"] * written["gradient_accumulation_steps"]
    parse_args(SMOKE, [])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: global batch")]
    assert line.startswith(f"warning: global batch {intended * 4} (")
    assert f"differs from the {intended} that {SMOKE} is sized for" in line
    parse_args(SMOKE, ["--per_device_train_batch_size", str(written["per_device_train_batch_size"] // 4)])
    assert "warning: global batch" not in capsys.readouterr().out


@pytest.mark.parametrize("default_config", [None, "multi_gpu.yaml"])
def test_a_bare_launch_is_not_single_gpu_yaml(monkeypatch, tmp_path, default_config):
    """What single_gpu.yaml says of `accelerate launch` without --config_file, on a machine with 4 GPUs (faked): one
    process per GPU, or whatever the user's default config says; naming single_gpu.yaml gives one process."""
    import accelerate.commands.config.config_args as config_args
    import accelerate.commands.launch as launch
    import yaml

    default = CONFIGS / default_config if default_config else tmp_path / "no_default_config.yaml"
    for module in (launch, config_args):
        monkeypatch.setattr(module, "default_config_file", str(default))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def processes(*flags):
        args, _, _ = launch._validate_launch_command(launch.launch_command_parser().parse_args([*flags, "x.py"]))
        return args.num_processes, bool(args.multi_gpu)

    bare = yaml.safe_load(default.read_text())["num_processes"] if default_config else 4
    assert processes() == (bare, True)
    assert processes("--config_file", str(CONFIGS / "single_gpu.yaml")) == (1, False)
