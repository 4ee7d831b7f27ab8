"""Plan the peak memory of a LoRA / QLoRA run before launching it, from the model's config.json alone.

    python recipes/plan_memory.py --model Qwen/Qwen2.5-1.5B-Instruct --quant 4bit --lora_r 16 --max_length 2048 \
        --per_device_train_batch_size 4 --gpu_memory 24GB
    accelerate launch recipes/sft_medical.py --dry_run true      # the same plan for the recipe's YAML, then exit

The model is built on PyTorch's meta device (no weights, no memory), which lists every parameter and linear layer
of any architecture transformers knows. The arithmetic below turns them into bytes, term by term, following what
the pinned stack actually keeps alive at the peak of a training step:

- weights as stored: 4-bit NF4 linears (half a byte per parameter, one absmax per 64 weights: a byte with double
  quantisation plus an fp32 constant per 256 blocks, else an fp32 constant), or 8-bit (a byte plus an fp32 scale
  per row), or the dtype; embeddings, norms and the LM head are never quantised;
- LoRA parameters, their gradients and optimizer states (TRL keeps QLoRA adapters in bf16, PEFT keeps plain LoRA
  adapters in fp32; AdamW keeps two states in the parameter's dtype, 8-bit optimizers one byte each);
- activations saved for backward, per token and layer: each norm's fp32 input, the attention's q, k, v and output
  (eager attention adds its fp32 probabilities), the MLP's intermediate tensors, each adapter's input after dropout
  with its dropout mask (a bool on CUDA, a tensor of the input's dtype on CPU) and A's output. With activation
  checkpointing only each layer's input stays, and one layer is recomputed at a time during backward;
- logits and loss: TRL's fused LM head never builds the (tokens x vocab) logits; it scores tiles of 4096 tokens x
  32768 vocabulary entries (in place on CUDA; on CPU its torch fallback holds about 7 fp32 copies of a tile), and
  accumulates the hidden-state gradient in fp32;
- transient: the largest quantised weight dequantised for a matmul, and the gradients flowing through one layer;
- framework: on CUDA, the context and kernels plus the caching allocator's slack (assumed); on CPU, the interpreter
  and the imported stack. `tests/test_memory.py` checks the rest against the peak of live tensor bytes of real steps;
- several processes (`strategy`): DDP holds everything on every device plus a bucketed copy of the gradients. FSDP
  (full shard) and ZeRO-3 hold 1/N of every parameter, gradient and optimizer state, and the units all-gathered for
  compute whole: the decoder layer running and the one prefetched, and (FSDP, as accelerate wraps it) the LM head with
  the final norm, kept whole from its forward to its backward. The 4-bit quantisation constants are not parameters:
  every device keeps them whole (tests/test_fsdp2.py measures the shards on CPU). ZeRO-1/2 split the optimizer states
  (and ZeRO-2 the gradients); DeepSpeed under bf16/fp16 keeps an fp32 master copy of the trainable parameters and fp32
  optimizer states. Not modelled: the communication buffers (FSDP's all-gather and reduce-scatter buffers, DeepSpeed's
  reduce/prefetch buckets and stage3_max_live_parameters, set in its JSON) and CPU offloading.

Every sequence is taken to fill `max_length` (the worst case a batch can reach, and what packing produces).
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import RecipeError

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO_ROOT / "data" / "model_configs"
GiB = 2**30

NF4_BLOCK = 64  # weights per absmax constant
NESTED_BLOCK = 256  # absmax constants per fp32 constant with double quantisation
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768  # TRL's fused LM head tile (trl/kernels/chunked_logprob.py)
CPU_HEAD_TILE_COPIES = 7  # fp32 tile-sized temporaries of the fused head's torch fallback in backward
CUDA_CONTEXT = 0.5 * GiB  # CUDA context, cuBLAS workspaces and loaded kernels (assumed, not measured here)
CUDA_ALLOCATOR_SLACK = 0.05  # caching allocator: reserved exceeds allocated by a few percent
# resident size of the process when training starts, the model aside: ~0.5 GiB after importing torch, transformers and
# TRL, ~0.3 GiB more of lazily loaded modules, tokenizer and data (bench/results/cpu.json, 2-core CI machine)
CPU_RUNTIME = 0.8 * GiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# how several processes split the model (lora_recipes/distributed.py launch_strategy names them)
STRATEGIES = ("ddp", "fsdp", "zero0", "zero1", "zero2", "zero3")
SHARDED_WEIGHTS = ("fsdp", "zero3")
SHARDED_GRADIENTS = ("fsdp", "zero2", "zero3")
SHARDED_OPTIMIZER = ("fsdp", "zero1", "zero2", "zero3")
STRATEGY_WORDS = {"ddp": "DDP: everything on every device", "fsdp": "FSDP full shard",
                  "zero0": "ZeRO-0: everything on every device", "zero1": "ZeRO-1", "zero2": "ZeRO-2",
                  "zero3": "ZeRO-3"}
NAME_NOISE = {"meta", "instruct", "it", "chat", "hf"}


# ---------------------------------------------------------------------------------------------------------------
# The model: shapes from config.json, via a meta-device instance
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    name: str  # path inside a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Architecture:
    """What the memory arithmetic needs to know about a model, read off a meta-device instance."""

    name: str
    source: str  # the config.json it came from
    model_type: str
    hidden: int
    vocab: int
    layers: int
    heads: int
    layer_linears: tuple[Linear, ...]  # the linear layers of one decoder layer
    input_groups: tuple[tuple[str, ...], ...]  # names of the linears that read the same input, in call order
    layer_norm_widths: tuple[int, ...]  # per-token input width of each norm in one decoder layer
    final_norm_width: int
    total_params: int
    layer_params: int  # parameters of one decoder layer
    tied_embeddings: bool

    @property
    def linear_params(self) -> int:
        return self.layers * sum(lin.in_features * lin.out_features for lin in self.layer_linears)

    @property
    def linear_rows(self) -> int:
        return self.layers * sum(lin.out_features for lin in self.layer_linears)

    def targets(self, target_modules) -> tuple[Linear, ...]:
        """The linears of a layer that get an adapter: PEFT's all-linear (every one but the LM head) or by name."""
        if target_modules in (None, "all-linear") or target_modules == ["all-linear"]:
            return self.layer_linears
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        return tuple(lin for lin in self.layer_linears if lin.name.rpartition(".")[2] in names)


def _normalise(name: str) -> str:
    parts = re.split(r"[-_]", name.lower())
    return "-".join(p for p in parts if p not in NAME_NOISE)


def shipped_configs() -> dict[str, Path]:
    return {_normalise(p.stem): p for p in sorted(MODEL_CONFIGS.glob("*.json"))}


def resolve_config(model: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a config.json path, a local model folder or a Hub id."""
    path = Path(model)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [path / "config.json"]
    else:
        shipped = shipped_configs().get(_normalise(model.rpartition("/")[2]))
        candidates = [shipped] if shipped else []
    if not candidates or not candidates[0].is_file():
        known = ", ".join(p.name for p in shipped_configs().values())
        raise RecipeError(f"model '{model}': no config.json found (not a file, a local folder with config.json, or a "
                          f"Hub id of a shipped config: {known}); pass --model path/to/config.json")
    shown = candidates[0].resolve()
    shown = shown.relative_to(REPO_ROOT) if shown.is_relative_to(REPO_ROOT) else candidates[0]
    try:
        return json.loads(candidates[0].read_text(encoding="utf-8")), str(shown)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{candidates[0]}: invalid JSON ({e.msg} at line {e.lineno})") from None


def architecture(model: str) -> Architecture:
    """Shapes of `model` (config.json path, local folder or Hub id) from a meta-device instance."""
    config_dict, source = resolve_config(model)  # before the heavy imports: a wrong name fails at once
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except (KeyError, ValueError, TypeError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{source}: not a causal LM config transformers can build ({problem[:200]})") from None
    text_config = config.get_text_config()
    layers = next(m for n, m in meta.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == text_config.num_hidden_layers)
    layer = layers[0]
    linears = tuple(Linear(n, m.in_features, m.out_features) for n, m in layer.named_modules()
                    if isinstance(m, torch.nn.Linear))
    # which linears read the same tensor (q, k and v; gate and up): one forward on the meta device tells
    calls = []  # (name, input) in call order; holding the inputs keeps their identities distinct
    hooks = [m.register_forward_pre_hook(lambda _, args, name=n: calls.append((name, args[0])))
             for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        meta(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    for hook in hooks:
        hook.remove()
    groups: list[tuple[list[str], object]] = []
    for name, tensor in calls:
        if groups and groups[-1][1] is tensor:
            groups[-1][0].append(name)
        else:
            groups.append(([name], tensor))
    out_width = {lin.name.rpartition(".")[2]: lin.out_features for lin in linears}
    norms = []
    for n, m in layer.named_modules():
        weight = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and weight is not None and weight.dim() == 1:
            # per-head q/k norms (Qwen3, Gemma 3) see every head of their projection's output
            short = n.rpartition(".")[2]
            norms.append(out_width.get(short.replace("norm", "proj"), weight.numel())
                         if weight.numel() != text_config.hidden_size else weight.numel())
    final_norm = meta.get_decoder().norm if hasattr(meta.get_decoder(), "norm") else None
    return Architecture(
        name=model,
        source=source,
        model_type=text_config.model_type,
        hidden=text_config.hidden_size,
        vocab=meta.get_output_embeddings().weight.shape[0],
        layers=len(layers),
        heads=text_config.num_attention_heads,
        layer_linears=linears,
        input_groups=tuple(tuple(names) for names, _ in groups),
        layer_norm_widths=tuple(norms),
        final_norm_width=final_norm.weight.numel() if final_norm is not None else text_config.hidden_size,
        total_params=sum(p.numel() for p in meta.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        tied_embeddings=meta.get_output_embeddings().weight is meta.get_input_embeddings().weight,
    )


# ---------------------------------------------------------------------------------------------------------------
# The run: the settings that move memory
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    quant: str = "4bit"  # "4bit", "8bit" or "none"
    double_quant: bool = True
    dtype: str = "bfloat16"  # unquantised weights; also the compute dtype without mixed precision
    mixed_precision: str | None = None  # "bf16" or "fp16" autocast (TrainingArguments bf16 / fp16)
    use_peft: bool = True
    lora_r: int = 16
    lora_dropout: float = 0.0  # the recipes' default (docs/performance.md)
    lora_target_modules: str | list[str] | None = "all-linear"
    max_length: int = 2048
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    strategy: str = "ddp"  # with world_size > 1: "ddp", "fsdp" (full shard), "zero1", "zero2" or "zero3"
    activation_checkpointing: bool = True
    optim: str = "adamw_torch_fused"
    attn_implementation: str = "sdpa"
    device: str = "cuda"  # "cuda" or "cpu"

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision else DTYPE_BYTES[self.dtype]

    @property
    def adapter_bytes(self) -> int:
        """TRL casts QLoRA adapters to bf16; PEFT upcasts plain LoRA adapters to fp32; full fine-tuning: the dtype."""
        if not self.use_peft:
            return DTYPE_BYTES[self.dtype]
        return 2 if self.quant != "none" else 4

    @property
    def tokens(self) -> int:
        return self.per_device_train_batch_size * self.max_length


def optimizer_state_bytes(optim: str, param_bytes: int) -> float:
    """Optimizer state bytes per trainable parameter."""
    name = optim.lower()
    if "sgd" in name:
        return 0
    if "adafactor" in name:  # factored second moment: rows + columns, negligible per parameter
        return 0
    states = 1 if "lion" in name else 2
    if "8bit" in name:
        return states * 1
    if "32bit" in name or "bnb" in name:
        return states * 4
    return states * param_bytes  # torch Adam/AdamW keep their states in the parameter's dtype


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    arch: Architecture
    setup: Setup
    parts: dict[str, float] = field(default_factory=dict)  # component -> bytes at the peak
    notes: dict[str, str] = field(default_factory=dict)
    activations_if_checkpointing: float = 0.0
    activations_without_checkpointing: float = 0.0
    trainable_params: int = 0
    head_bytes: float = 0.0  # the fused LM head's saved inputs and backward buffers
    layer_backward_bytes: float = 0.0  # a decoder layer's backward: recomputed activations, gradients, dequantised
    peak_in_head: bool = True

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def peak_without_runtime(self) -> float:
        return self.peak - self.parts["framework"]


def weight_bytes(arch: Architecture, setup: Setup) -> tuple[float, float]:
    """(weights as stored, of which quantisation constants)."""
    dtype_bytes = DTYPE_BYTES[setup.dtype]
    linear, rows = arch.linear_params, arch.linear_rows
    other = arch.total_params - linear
    if setup.quant == "4bit":
        blocks = linear / NF4_BLOCK
        constants = blocks * 1 + blocks / NESTED_BLOCK * 4 if setup.double_quant else blocks * 4
        return linear / 2 + constants + other * dtype_bytes, constants
    if setup.quant == "8bit":
        return linear + rows * 4 + other * dtype_bytes, rows * 4
    return arch.total_params * dtype_bytes, 0.0


def layer_activation_bytes(arch: Architecture, setup: Setup, first_layer: bool = False) -> float:
    """Bytes per token that one decoder layer keeps for backward (its whole forward, not checkpointed)."""
    b = setup.compute_bytes
    adapter_in = b if setup.mixed_precision else setup.adapter_bytes  # adapters see inputs cast to their dtype
    mask = 1 if setup.device == "cuda" else adapter_in  # native dropout keeps a bool mask; CPU a scaled noise tensor
    # the first layer's input is the frozen embedding output: without checkpointing nothing upstream needs its grad
    no_input_grad = first_layer and not setup.activation_checkpointing

    total = sum(4 * width for width in arch.layer_norm_widths)  # RMSNorm keeps its input in fp32
    if no_input_grad:
        total -= 4 * arch.layer_norm_widths[0]

    by_name = {lin.name: lin for lin in arch.layer_linears}
    groups = [[by_name[name] for name in names] for names in arch.input_groups]
    attn = [g for g in groups if "att" in g[0].parent]
    mlp = [g for g in groups if "att" not in g[0].parent]

    # attention: q, k, v (or fused qkv) and the output; eager also keeps the fp32 probabilities and their cast
    total += b * (sum(lin.out_features for lin in attn[0]) + sum(g[0].in_features for g in attn[1:]))
    if setup.attn_implementation == "eager":
        total += arch.heads * setup.max_length * (4 + b)

    # MLP: the outputs of the input projections (gate and up, fused gate_up, or fc1) and of the activation
    total += b * (sum(lin.out_features for lin in mlp[0]) + sum(g[0].in_features for g in mlp[1:]))

    # adapters (or, for full fine-tuning, the weight gradients): the input each one needs for backward
    targets = set(arch.targets(setup.lora_target_modules) if setup.use_peft else arch.layer_linears)
    for group in groups:
        members = [lin for lin in group if lin in targets]
        if not members:
            continue
        width = members[0].in_features
        if setup.use_peft and setup.lora_dropout > 0:
            # dropout keeps its mask only where its input needs a gradient: not on the first layer's q/k/v, whose
            # input comes from the frozen embeddings (unless checkpointing makes them require one)
            masks = 0 if no_input_grad and group is groups[0] else len(members) * mask
            total += width * (len(members) * adapter_in + masks)
        elif adapter_in == b or not setup.use_peft:
            total += width * b  # the same input tensor, kept once for the whole group
        else:
            total += width * adapter_in * len(members)  # one cast copy per adapter
        if setup.use_peft:
            total += len(members) * setup.lora_r * setup.adapter_bytes
    return total


def unit_bytes(arch: Architecture, setup: Setup) -> tuple[float, float]:
    """(one decoder layer, the LM head with the final norm) as stored, without quantisation constants: what an
    all-gather makes whole on every device under FSDP / ZeRO-3."""
    dtype_bytes = DTYPE_BYTES[setup.dtype]
    linear = sum(lin.in_features * lin.out_features for lin in arch.layer_linears)
    per_weight = {"4bit": 0.5, "8bit": 1}.get(setup.quant, dtype_bytes)
    layer = linear * per_weight + (arch.layer_params - linear) * dtype_bytes
    if setup.use_peft:
        layer += setup.lora_r * sum(lin.in_features + lin.out_features
                                    for lin in arch.targets(setup.lora_target_modules)) * setup.adapter_bytes
    return layer, (arch.vocab * arch.hidden + arch.final_norm_width) * dtype_bytes


def shard_parts(p: Plan, constants: float) -> None:
    """Divide the static parts of `p` as its strategy splits them across `world_size` processes."""
    setup, n = p.setup, p.setup.world_size
    if n == 1:
        return
    strategy = setup.strategy
    if strategy not in STRATEGIES:
        raise RecipeError(f"strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")
    if strategy in ("ddp", "zero0"):  # data parallel keeps a bucketed copy of the gradients for the all-reduce
        p.parts["gradients"] *= 2
        return
    if strategy in SHARDED_WEIGHTS:
        p.parts["weights"] = (p.parts["weights"] - constants) / n + constants
        p.parts["adapter"] /= n
        p.notes["weights"] = f"1/{n} of each" + (f"; {constants / GiB:.2f} GiB quantisation constants whole"
                                                 if constants else "")
        layer, head = unit_bytes(p.arch, setup)
        p.parts["gathered"] = 2 * layer + head
        p.notes["gathered"] = "2 decoder layers + LM head, all-gathered"
    if strategy in SHARDED_GRADIENTS:
        p.parts["gradients"] /= n
    if strategy in SHARDED_OPTIMIZER:
        trainable = p.trainable_params
        if strategy != "fsdp" and setup.mixed_precision:  # DeepSpeed: fp32 master weights and fp32 states
            p.parts["optimizer"] = trainable * (4 + optimizer_state_bytes(setup.optim, 4))
            p.notes["optimizer"] = "fp32 master copy + fp32 states (DeepSpeed)"
        p.parts["optimizer"] /= n


def plan(arch: Architecture, setup: Setup) -> Plan:
    """The peak memory of one training step, by component."""
    p = Plan(arch, setup)
    n = setup.tokens
    b = setup.compute_bytes

    # static: weights, adapters, their gradients and optimizer states
    weights, constants = weight_bytes(arch, setup)
    if setup.use_peft:
        trainable = arch.layers * setup.lora_r * sum(lin.in_features + lin.out_features
                                                     for lin in arch.targets(setup.lora_target_modules))
    else:
        trainable = arch.total_params
    p.trainable_params = trainable
    p.parts["weights"] = weights
    p.notes["weights"] = (f"incl. {constants / GiB:.2f} GiB quantisation constants" if constants else setup.dtype)
    p.parts["adapter"] = trainable * setup.adapter_bytes if setup.use_peft else 0.0
    p.parts["gradients"] = trainable * setup.adapter_bytes
    p.parts["optimizer"] = trainable * optimizer_state_bytes(setup.optim, setup.adapter_bytes)
    shard_parts(p, constants)

    # activations, both ways
    per_layer = layer_activation_bytes(arch, setup)
    first = layer_activation_bytes(arch, setup, first_layer=True)
    all_layers = n * (first + (arch.layers - 1) * per_layer)
    checkpoints = n * arch.layers * arch.hidden * b
    p.activations_without_checkpointing = all_layers
    p.activations_if_checkpointing = checkpoints + n * per_layer

    # logits and loss: the fused head keeps the final norm's fp32 input and a copy of the hidden states; its
    # backward holds a tile (in place on CUDA, ~7 fp32 copies on CPU) and the fp32 hidden-state gradient
    rows = min(n, HEAD_TOKENS)
    tile = rows * min(arch.vocab, HEAD_VOCAB)
    head_saved = n * (4 * arch.final_norm_width + b * arch.hidden)
    head_backward = rows * HEAD_VOCAB * b + n * arch.hidden * (4 + b)  # the tile buffer is allocated full width
    if setup.device == "cpu":
        head_backward += CPU_HEAD_TILE_COPIES * tile * 4

    # transient: a dequantised weight, and the gradients flowing through one layer
    largest = max(lin.in_features * lin.out_features for lin in arch.layer_linears)
    dequantised = largest * b if setup.quant != "none" else 0
    widest = max(lin.in_features for lin in arch.layer_linears)
    layer_grads = n * b * (3 * widest + 2 * arch.hidden)

    # the peak is either in the LM head's backward (every saved activation still alive) or in the backward of the
    # last decoder layer (recomputed when checkpointing); the breakdown shows the moment that is higher
    saved = checkpoints if setup.activation_checkpointing else all_layers
    recomputed = n * per_layer if setup.activation_checkpointing else 0.0
    at_head = head_saved + head_backward
    in_layer = recomputed + layer_grads + dequantised
    p.head_bytes, p.layer_backward_bytes = at_head, in_layer
    p.peak_in_head = at_head >= in_layer
    p.parts["activations"] = saved + (0.0 if p.peak_in_head else recomputed)
    p.parts["logits and loss"] = at_head if p.peak_in_head else 0.0
    p.parts["transient"] = 0.0 if p.peak_in_head else layer_grads + dequantised

    dynamic = sum(p.parts.values())
    if setup.device == "cuda":
        p.parts["framework"] = CUDA_CONTEXT + CUDA_ALLOCATOR_SLACK * dynamic
        p.notes["framework"] = "CUDA context + allocator slack (assumed)"
    else:
        p.parts["framework"] = CPU_RUNTIME
        p.notes["framework"] = "Python + torch + transformers after import"
    return p


def parse_memory(text: str) -> float:
    """'24GB', '24GiB', '80G', '24' (GiB; GPUs are sold in binary units) or '16000MB' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise RecipeError(f"gpu_memory '{text}': expected a size such as 24GB, 80GiB or 16000MB")
    unit = match.group(2) or "gb"
    return float(match.group(1)) * (2**20 if unit.startswith("m") else GiB)


def largest_batch(arch: Architecture, setup: Setup, budget: float) -> tuple[int, int] | None:
    """(per-device batch, accumulation) with the same sequences per device per step that fits `budget`, or None."""
    per_step = setup.per_device_train_batch_size * setup.gradient_accumulation_steps
    for batch in sorted((d for d in range(1, per_step + 1) if per_step % d == 0), reverse=True):
        if plan(arch, replace(setup, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=per_step // batch)).peak <= budget:
            return batch, per_step // batch
    return None


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def describe(plan_on: Plan, plan_off: Plan, budget: float | None = None) -> str:
    """The breakdown with checkpointing on and off, and what fits `budget` bytes."""
    arch, s = plan_on.arch, plan_on.setup
    quant = {"4bit": "4-bit NF4" + (" + double quant" if s.double_quant else ""), "8bit": "8-bit",
             "none": "not quantised"}[s.quant]
    adapters = (f"LoRA r={s.lora_r} on {len(arch.targets(s.lora_target_modules)) * arch.layers} linear layers "
                f"({plan_on.trainable_params / 1e6:.1f}M parameters)" if s.use_peft else "full fine-tuning")
    compute = {"bf16": "bfloat16", "fp16": "float16"}.get(s.mixed_precision, s.dtype)
    lines = [
        f"Memory plan for {arch.name} ({arch.source}): {arch.total_params / 1e9:.2f}B parameters, {arch.layers} "
        f"layers, hidden {arch.hidden}, vocab {arch.vocab}",
        f"  {quant} base, compute {compute}, {adapters}, {s.attn_implementation} attention",
        f"  {s.per_device_train_batch_size} sequences x {s.max_length} tokens per device, {s.optim}, on "
        f"{s.device.upper()}" + (f", {s.world_size} processes ({STRATEGY_WORDS[s.strategy]})" if s.world_size > 1
                                 else ""),
        "",
        f"{'':34}{'checkpointing on':>18}{'checkpointing off':>19}",
    ]
    rows = [
        ("weights as stored", "weights"),
        ("whole units for compute", "gathered"),
        ("LoRA parameters", "adapter"),
        ("their gradients", "gradients"),
        ("optimizer states", "optimizer"),
        ("activations", "activations"),
        ("logits and loss buffers", "logits and loss"),
        ("transient (dequantised weight, grads)", "transient"),
        ("framework overhead", "framework"),
    ]
    for label, key in rows:
        if key not in plan_on.parts:
            continue
        lines.append(f"{label:<38}{_gib(plan_on.parts[key])}{_gib(plan_off.parts[key]):>19}   "
                     f"{plan_on.notes.get(key, '')}".rstrip())
    lines.append(f"{'peak':<38}{_gib(plan_on.peak)}{_gib(plan_off.peak):>19}")
    moment = {True: "LM head backward", False: "layer backward"}
    lines.append(f"{'peak moment':<38}{moment[plan_on.peak_in_head]:>12}{moment[plan_off.peak_in_head]:>19}")
    lines.append(f"{'logits and loss at the LM head':<38}{_gib(plan_on.head_bytes)}{_gib(plan_off.head_bytes):>19}"
                 "   (fused head: no full logits)")
    if budget is not None:
        per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps
        lines.append("")
        for setting, label in ((True, "checkpointing on"), (False, "checkpointing off")):
            fit = largest_batch(arch, replace(s, activation_checkpointing=setting), budget)
            if fit is None:
                one = plan(arch, replace(s, activation_checkpointing=setting, per_device_train_batch_size=1))
                lines.append(f"{budget / GiB:.0f} GiB, {label}: does not fit even 1 sequence per device "
                             f"(needs {one.peak / GiB:.1f} GiB): shorten max_length"
                             + ("" if s.quant == "4bit" else " or quantise to 4-bit")
                             + (" or shard the model across the processes (accelerate_configs/fsdp_qlora.yaml)"
                                if s.world_size > 1 and s.strategy not in SHARDED_WEIGHTS else ""))
            else:
                lines.append(f"{budget / GiB:.0f} GiB, {label}: per_device_train_batch_size {fit[0]} x "
                             f"gradient_accumulation_steps {fit[1]} keeps {per_step} sequences per device per step "
                             f"(global batch {per_step * s.world_size})")
    if s.world_size > 1 and s.strategy not in ("ddp", "zero0"):
        lines.append(f"Not modelled ({s.strategy}): communication buffers ("
                     + ("all-gather / reduce-scatter" if s.strategy == "fsdp" else "DeepSpeed's bucket sizes and "
                        "stage3_max_live_parameters, from its JSON") + ") and CPU offloading")
    return "\n".join(lines)


def report(arch: Architecture, setup: Setup, budget: float | None = None) -> str:
    on = plan(arch, replace(setup, activation_checkpointing=True))
    off = plan(arch, replace(setup, activation_checkpointing=False))
    return describe(on, off, budget)


def setup_from_args(training_args, model_args) -> Setup:
    """The Setup a recipe's parsed arguments describe (its YAML + command line and the launch)."""
    from .distributed import launch_strategy

    quant = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else "none"
    dtype = model_args.dtype if model_args.dtype in DTYPE_BYTES else "bfloat16"
    mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    return Setup(
        quant=quant,
        double_quant=model_args.use_bnb_nested_quant,
        dtype=dtype,
        mixed_precision=mixed,
        use_peft=model_args.use_peft,
        lora_r=model_args.lora_r,
        lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules,
        max_length=training_args.max_length or 1024,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        world_size=training_args.world_size,
        strategy=launch_strategy(training_args) if training_args.world_size > 1 else "ddp",
        activation_checkpointing=bool(training_args.activation_checkpointing),
        optim=str(getattr(training_args.optim, "value", training_args.optim)),
        attn_implementation=model_args.attn_implementation or "sdpa",
        device="cpu" if training_args.use_cpu else "cuda",
    )


def dry_run_without_gpu(argv: list[str], config_path: Path) -> bool:
    """Whether `argv` asks for a dry run of a config meant for a GPU, on a machine without one."""
    import torch
    import yaml

    asked = False
    for i, arg in enumerate(argv):
        if arg.split("=")[0] == "--dry_run":
            value = arg.partition("=")[2] or (argv[i + 1] if argv[i + 1:] and not argv[i + 1].startswith("--")
                                               else "true")
            asked = value.lower() in ("true", "1", "yes")
    if not asked or torch.cuda.is_available() or any(arg.split("=")[0] == "--use_cpu" for arg in argv):
        return False
    return not (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("use_cpu", False)


def dry_run(training_args, model_args) -> str:
    """The plan a recipe prints for `--dry_run true`, for the GPU it would run on when one is visible."""
    import torch

    setup = setup_from_args(training_args, model_args)
    budget = None
    if setup.device == "cuda" and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory
    text = report(architecture(model_args.model_name_or_path), setup, budget)
    if budget is None:
        text += ("\n\nNo GPU visible: for the largest batch that fits a given GPU, run recipes/plan_memory.py with "
                 "--gpu_memory (e.g. 24GB)")
    chosen = "on" if setup.activation_checkpointing else "off"
    return f"{text}\n\nThis run: checkpointing {chosen}. Dry run: nothing was loaded; drop --dry_run to train."


def fraction_error(planned: float, measured: float) -> float:
    return abs(planned - measured) / measured if measured else math.inf
