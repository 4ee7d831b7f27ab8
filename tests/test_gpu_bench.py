"""The GPU benchmark is ready for the first CUDA machine: on CPU it skips cleanly, says what it would run, writes
nothing; on CUDA it would train the default model's real shape."""

import subprocess
import sys

from conftest import REPO_ROOT

from bench.gpu_throughput import DEFAULT_MODEL, default_model_shape, gpu_slug, installed, variants


def test_gpu_benchmark_skips_on_cpu_and_prints_its_plan(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--output_dir", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("No CUDA device: the GPU benchmark is skipped.")
    for name, (_, overrides) in variants(installed("flash_attn"), installed("liger_kernel")).items():
        assert f"  - {name}: {' '.join(overrides) or '(as is)'}" in proc.stdout
    assert "Memory planner vs torch.cuda.max_memory_allocated" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_gpu_benchmark_rows_follow_the_installed_kernels():
    plain = variants(flash_attn=False, liger=False)
    full = variants(flash_attn=True, liger=True)
    assert not any("flash_attention_2" in name or "liger" in name for name in plain)
    assert set(full) - set(plain) == {"recipe, flash_attention_2", "recipe, use_liger_kernel",
                                      "recipe + packing (bfd, padding-free, 1 row of 768), flash_attention_2"}
    assert full["recipe, use_liger_kernel"][1] == ["--use_liger_kernel", "true"]
    assert all(kind == "recipe" for name, (kind, _) in full.items() if name.startswith("recipe"))


def test_gpu_benchmark_model_is_the_default_models_real_shape():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_recipes.memory import architecture

    shape = dict(default_model_shape())
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == architecture(DEFAULT_MODEL).total_params
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
