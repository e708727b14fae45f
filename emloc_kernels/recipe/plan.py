"""How much memory LoRA fine-tuning of an emulator needs, from a model's ``config.json`` alone,
and the largest emulator ratio (and the least quantisation) that fits a budget (``emloc plan``).

Memory model (bytes; ``T = seq·batch`` tokens, ``d`` bytes of ``--dtype``, ``L`` blocks,
``h`` hidden size, ``i`` MLP width, ``a`` query width (heads·head_dim), ``kv`` key/value width,
``V`` vocabulary, ``ρ`` LoRA rank). The peak of a training step with gradient checkpointing is

    weights + LoRA state + block inputs + max(one block recomputed, logits and loss) + overhead

* weights: the non-block weights (embeddings, the untied output layer, norms, the position
  table) dense in ``d``; each block linear ``out×in`` as the factors of rank
  ``r = ⌊in·out·ratio/(in+out)⌋`` (:func:`~emloc_kernels.emulator.svd.rank_for`), ``r·(in+out)``
  elements in ``d``, or packed as :mod:`emloc_kernels.ops.quant` packs them (int8: one byte an
  element and a scale per row; int4: half a byte, the row padded to the group size, a scale
  and an offset per group), plus biases in ``d``. Every linear gets the rank of its ratio
  (``--allocate uniform``; ``block`` moves ranks between a block's linears at about the same size).
* LoRA state: PEFT's LoRA on every block linear, ``ρ·(in+out)`` parameters, kept in fp32
  (PEFT upcasts half-precision adapters): parameters, gradients and AdamW's two moments,
  16 bytes a parameter.
* block inputs: non-reentrant gradient checkpointing keeps each block's input (and the last
  block's output, entering the final norm): ``(L+1)·h·T·d``, plus the rotary cos/sin shared by
  all blocks (``2·head_dim·T·d``) and, in half precision, the fp32 copy the final RMSNorm saves.
* one block recomputed, during its backward, per token in ``d``: the two norm outputs and the
  residual between them (``3h``); q, k, v after the rotary embedding (``a + 2kv``); k and v
  repeated to every head when ``kv < a`` (``2a``: transformers' SDPA path for a padded batch);
  the attention output and its contiguous copy (``2a``); the MLP's gate, up, activation and
  product (``4i``; a plain MLP: ``2i``) and the gradients alive with them (``2i``; plain
  ``i``); the incoming and the residual gradient (``2h``). Also each linear's LoRA
  intermediate ``x·Aᵀ`` (``ρ`` in fp32) and, in half precision, the fp32 copy each RMSNorm
  saves (``2·4h`` bytes). Attention scores are not kept (flash/memory-efficient SDPA).
* logits and loss: ``P·V·12`` bytes with ``P = T`` (loss on every position, as in causal-LM
  fine-tuning) or ``P = batch`` (loss on the last position, as ``emloc finetune``'s label
  task): the loss is computed in fp32 and, while its backward runs, the saved log-softmax, its
  incoming gradient and the gradient of the logits are alive at once (3 fp32 copies; the
  forward holds at most the logits in ``d`` with two fp32 copies, ≤ 12 bytes too). These
  buffers are freed before the last block is recomputed, hence the ``max``.
* overhead: :data:`OVERHEAD_BYTES`, fixed, calibrated against measured peaks (see there).

The two references use the same LoRA state and activations: LoRA on the original keeps every
weight dense in ``d``; QLoRA keeps the block linears in 4-bit NF4 with double-quantised
scales (:data:`NF4_BYTES_PER_PARAM`) and the rest dense in ``d``. Both run PEFT's own LoRA
layers, which in half precision keep an fp32 copy of each linear's input (``4·Σin`` bytes a
token more in the recomputed block); the emulator's fused layers keep none.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from ..emulator.svd import rank_for

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTS = ("none", "int8", "int4")  # least to most quantised: --quant auto prefers them in this order
GROUP_SIZES = (64, 128)
RATIO_STEP = Fraction(1, 100)  # ratios are searched on this grid
MAX_RATIO = 0.5  # above about half the parameters an emulator saves little over LoRA on the original
LORA_BYTES_PER_PARAM = 16  # fp32 parameter, gradient and AdamW's two moments
LOSS_BYTES_PER_LOGIT = 12  # three fp32 copies while the loss's backward runs
# 4-bit codes, an 8-bit absmax per 64 weights and an fp32 scale per 256 absmax (QLoRA's
# double quantisation, bitsandbytes' defaults)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# What the measured peaks hold beyond the model above (the tokenizer, Python objects of the
# model and of PEFT, the allocator's slack): calibrated on SmolLM2-135M-Instruct in fp32 on the
# CPU, where four settings left 41-52 MiB (bench/plan_check.py, bench/RESULTS.md). On a GPU the
# recipe measures allocated bytes; the CUDA context (0.3-0.6 GiB of device memory a process) and
# the caching allocator's reserve come on top: leave that margin in the budget.
OVERHEAD_BYTES = 48 * 2**20

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
SUPPORTED = (*_LLAMA_LIKE, "gpt2")
_TIED_BY_DEFAULT = ("gemma", "gpt2")  # transformers' default of tie_word_embeddings per model type
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]+)", re.IGNORECASE)


def parse_size(text: str, option: str = "--budget") -> int:
    """Bytes of ``24GB`` (10⁹), ``24GiB`` (2³⁰), ``500MB``, ``0.5GiB`` or a plain count of bytes;
    anything else is a ``ValueError`` naming ``option``, so that a typo is not read as a size."""
    form = "a size such as 24GB, 24GiB, 500MB, 0.5GiB or a whole number of bytes"
    s = text.strip()
    if s.isdigit():
        value = int(s)
    else:
        m = _SIZE.fullmatch(s)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{option} must be {form}; got {text!r}")
        value = math.floor(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{option} must be more than 0 bytes; got {text!r}")
    return value


@dataclass(frozen=True)
class Linear:
    n_in: int
    n_out: int
    bias: bool


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a model, read from its ``config.json``."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    query_width: int  # heads · head_dim
    kv_width: int  # key/value heads · head_dim
    head_dim: int
    vocab: int
    gated: bool  # gate · up MLP (llama-like) or a plain one (GPT-2)
    rms_norm: bool  # RMSNorm upcasts to fp32 and saves the copy
    rotary: bool
    block_linears: tuple[Linear, ...]  # one block's
    other_params: int  # embeddings, untied output layer, norms, position table

    @property
    def dense_block_params(self) -> int:
        return self.layers * sum(m.n_in * m.n_out + m.n_out * m.bias for m in self.block_linears)


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json of a {config.get('model_type')} model has no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def architecture(config: Mapping[str, Any]) -> Architecture:
    """The block layout of a supported model type (those the emulator build is tested on)."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} in config.json is not supported by emloc plan; supported: {SUPPORTED}")
    tied = bool(config.get("tie_word_embeddings", kind in _TIED_BY_DEFAULT))
    return _gpt2(config, tied) if kind == "gpt2" else _llama_like(config, kind, tied)


def _gpt2(config: Mapping[str, Any], tied: bool) -> Architecture:
    """Fused q/k/v (``c_attn``), a plain GELU MLP, biases everywhere, a learned position table."""
    h, layers, heads, vocab = (_int(config, k) for k in ("n_embd", "n_layer", "n_head", "vocab_size"))
    i = _int(config, "n_inner", 4 * h)
    linears = (Linear(h, 3 * h, True), Linear(h, h, True), Linear(h, i, True), Linear(i, h, True))
    other = vocab * h * (1 if tied else 2) + _int(config, "n_positions", 1024) * h + 2 * h + layers * 4 * h
    return Architecture("gpt2", layers, h, i, h, h, h // heads, vocab, False, False, False, linears, other)


def _llama_like(config: Mapping[str, Any], kind: str, tied: bool) -> Architecture:
    """Grouped-query attention with rotary positions, a gated MLP, RMSNorm (Phi-3 fuses q/k/v and
    gate/up into one linear each)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    h, i, layers, heads, vocab = (_int(config, k) for k in keys)
    kv_heads = _int(config, "num_key_value_heads", heads)
    head_dim = _int(config, "head_dim", h // heads)
    a, kv = heads * head_dim, kv_heads * head_dim
    attn_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    qkv_bias = True if kind == "qwen2" else attn_bias
    linears: tuple[Linear, ...]
    if kind == "phi3":
        linears = (Linear(h, a + 2 * kv, False), Linear(a, h, False), Linear(h, 2 * i, False), Linear(i, h, False))
    else:
        attention = (Linear(h, a, qkv_bias), Linear(h, kv, qkv_bias), Linear(h, kv, qkv_bias), Linear(a, h, attn_bias))
        linears = attention + (Linear(h, i, mlp_bias), Linear(h, i, mlp_bias), Linear(i, h, mlp_bias))
    norms = 2 * h + (2 * head_dim if kind == "qwen3" else 0)  # qwen3 also normalises q and k per head
    other = vocab * h * (1 if tied else 2) + h + layers * norms
    return Architecture(kind, layers, h, i, a, kv, head_dim, vocab, True, True, True, linears, other)


@dataclass(frozen=True)
class Workload:
    """One training step's shape: tokens, LoRA rank, dtype, which positions the loss reads."""

    seq: int
    batch: int
    lora_rank: int
    dtype: str = "bfloat16"
    loss_positions: str = "all"  # all: causal-LM loss; last: the last position (emloc finetune's task)

    def __post_init__(self) -> None:
        for name in ("seq", "batch", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.loss_positions not in ("all", "last"):
            raise ValueError(f"--loss-positions must be all or last, got {self.loss_positions!r}")

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one training step, by part (see the module docstring)."""

    label: str
    weights: int
    lora: int
    block_inputs: int
    block: int
    logits: int
    overhead: int = OVERHEAD_BYTES

    @property
    def recompute(self) -> int:
        """The larger of the two buffers never alive together."""
        return max(self.block, self.logits)

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.block_inputs + self.recompute + self.overhead


def factor_bytes(n: int, k: int, quant: str, group_size: int, dtype_bytes: int) -> int:
    """Bytes of an N×K factor as stored: dense, or packed along K as in :mod:`emloc_kernels.ops.quant`."""
    if quant == "none":
        return n * k * dtype_bytes
    if quant == "int8":
        return n * k + n * dtype_bytes
    groups = -(-k // group_size)
    return n * groups * group_size // 2 + 2 * n * groups * dtype_bytes


def emulator_weight_bytes(arch: Architecture, ratio: float, quant: str, group_size: int, dtype_bytes: int) -> int:
    """Non-block weights dense, block linears as factors u (out×r) and v (r×in) at ``ratio``."""
    per_block = 0
    for m in arch.block_linears:
        r = rank_for(m.n_in, m.n_out, ratio)
        per_block += factor_bytes(m.n_out, r, quant, group_size, dtype_bytes)
        per_block += factor_bytes(r, m.n_in, quant, group_size, dtype_bytes) + m.bias * m.n_out * dtype_bytes
    return arch.other_params * dtype_bytes + arch.layers * per_block


def lora_params(arch: Architecture, rank: int) -> int:
    """PEFT's ``all-linear`` LoRA: every block linear (the output layer is left out)."""
    return arch.layers * sum(rank * (m.n_in + m.n_out) for m in arch.block_linears)


def activation_bytes(arch: Architecture, w: Workload, peft_layers: bool = False) -> tuple[int, int, int]:
    """(block inputs, one block recomputed with its backward, logits and loss), in bytes.

    ``peft_layers``: the LoRA runs in PEFT's own layers (on the original, on NF4), which in half
    precision cast each linear's input to the fp32 adapter's dtype and keep that copy; the
    emulator's fused layers do not copy."""
    d, t, h = w.dtype_bytes, w.tokens, arch.hidden
    half = d < 4 and arch.rms_norm  # RMSNorm's fp32 copy is the input itself in fp32
    inputs = t * ((arch.layers + 1) * h * d + (2 * arch.head_dim * d if arch.rotary else 0) + (4 * h if half else 0))
    a, kv, i = arch.query_width, arch.kv_width, arch.intermediate
    attention = 3 * h + a + 2 * kv + (2 * a if kv < a else 0) + 2 * a
    mlp = 6 * i if arch.gated else 3 * i
    per_token = (attention + mlp + 2 * h) * d + len(arch.block_linears) * w.lora_rank * 4 + (8 * h if half else 0)
    if peft_layers and d < 4:
        per_token += 4 * sum(m.n_in for m in arch.block_linears)
    positions = t if w.loss_positions == "all" else w.batch
    return inputs, t * per_token, positions * arch.vocab * LOSS_BYTES_PER_LOGIT


def _estimate(label: str, weights: int, arch: Architecture, w: Workload, peft_layers: bool = False) -> Estimate:
    inputs, block, logits = activation_bytes(arch, w, peft_layers)
    return Estimate(label, weights, LORA_BYTES_PER_PARAM * lora_params(arch, w.lora_rank), inputs, block, logits)


def emulator_estimate(
    arch: Architecture, w: Workload, ratio: float, quant: str = "none", group_size: int = 128
) -> Estimate:
    """LoRA fine-tuning of the emulator at ``ratio`` with factors stored as ``quant``."""
    if quant not in QUANTS or group_size not in GROUP_SIZES:
        raise ValueError(f"quant must be one of {QUANTS} and group size one of {GROUP_SIZES}")
    weights = emulator_weight_bytes(arch, ratio, quant, group_size, w.dtype_bytes)
    label = f"emulator {ratio:.2f}" + ("" if quant == "none" else f" {quant_name(quant, group_size)}")
    return _estimate(label, weights, arch, w)


def lora_estimate(arch: Architecture, w: Workload) -> Estimate:
    """LoRA on the original: every weight dense in the dtype."""
    weights = (arch.other_params + arch.dense_block_params) * w.dtype_bytes
    return _estimate("LoRA on the original", weights, arch, w, peft_layers=True)


def qlora_estimate(arch: Architecture, w: Workload) -> Estimate:
    """QLoRA-style: block linears in NF4 (biases and the rest dense in the dtype)."""
    n_bias = arch.layers * sum(m.n_out * m.bias for m in arch.block_linears)
    nf4 = math.ceil((arch.dense_block_params - n_bias) * NF4_BYTES_PER_PARAM)
    weights = nf4 + (arch.other_params + n_bias) * w.dtype_bytes
    return _estimate("QLoRA (NF4)", weights, arch, w, peft_layers=True)


def quant_name(quant: str, group_size: int) -> str:
    return f"int4-g{group_size}" if quant == "int4" else quant


def ratio_grid(arch: Architecture, max_ratio: float = MAX_RATIO) -> list[float]:
    """Ratios on :data:`RATIO_STEP` up to ``max_ratio`` that keep at least rank 1 of every
    block linear (what ``build_emulator`` accepts), ascending."""
    if not 0 < max_ratio < 1:
        raise ValueError(f"--max-ratio must be in (0, 1), got {max_ratio!r}")
    smallest = max(Fraction(m.n_in + m.n_out, m.n_in * m.n_out) for m in arch.block_linears)
    top = math.floor(Fraction(repr(float(max_ratio))) / RATIO_STEP)
    return [float(k * RATIO_STEP) for k in range(1, top + 1) if k * RATIO_STEP >= smallest]


@dataclass(frozen=True)
class Choice:
    ratio: float
    quant: str
    group_size: int
    estimate: Estimate


def choose(
    arch: Architecture,
    w: Workload,
    budget: int,
    quant: str = "auto",
    group_size: int = 128,
    max_ratio: float = MAX_RATIO,
) -> Choice:
    """The largest ratio on the grid whose estimate fits ``budget``; with ``quant="auto"`` the
    least quantisation that reaches that ratio (no quantisation when it fits as well).

    Memory grows with the ratio, so the ratio chosen never shrinks as the budget grows. An error
    names the smallest budget that would fit."""
    options = QUANTS if quant == "auto" else (quant,)
    if any(q not in QUANTS for q in options):
        raise ValueError(f"--quant must be auto or one of {QUANTS}, got {quant!r}")
    grid = ratio_grid(arch, max_ratio)
    if not grid:
        raise ValueError(f"--max-ratio {max_ratio} is below the smallest ratio that keeps rank 1 of every linear")
    best: Choice | None = None
    for q in options:  # least quantised first: a later option must reach a strictly larger ratio
        for ratio in reversed(grid):
            e = emulator_estimate(arch, w, ratio, q, group_size)
            if e.total <= budget:
                if best is None or ratio > best.ratio:
                    best = Choice(ratio, q, group_size, e)
                break
    if best is None:
        need, least = min((emulator_estimate(arch, w, grid[0], q, group_size).total, q) for q in options)
        raise ValueError(
            f"nothing fits --budget {format_bytes(budget)}: the smallest emulator (ratio {grid[0]:.2f}, "
            f"{quant_name(least, group_size)}) needs {format_bytes(need)}; give --budget {math.ceil(need / 10**6)}MB "
            "or more, or a shorter --seq or smaller --batch"
        )
    return best


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def read_config(source: str) -> tuple[dict[str, Any], str]:
    """``config.json`` of a model directory, a Hub id in the local cache or ``demo`` (the
    embedded SmolLM2-135M-Instruct), and the model's name; nothing is downloaded."""
    from .models import check_model_source

    if source == "demo":
        from .demo import smollm2_path

        path: str | None = str(smollm2_path() / "config.json")
    else:
        found = check_model_source(source, "MODEL")
        if Path(found).is_dir():
            path = str(Path(found) / "config.json")
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(found, "config.json")
            path = cached if isinstance(cached, str) else None
    if path is None:
        raise FileNotFoundError(f"MODEL {source}: no config.json in the local Hugging Face cache")
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config, f"{Path(path).parent.name} (demo)" if source == "demo" else source


def format_plan(arch: Architecture, w: Workload, budget: int, choice: Choice, name: str, source: str = "MODEL") -> str:
    """The table ``emloc plan`` prints: the chosen emulator beside LoRA and QLoRA estimates, and
    the ``emloc build`` command of that emulator for ``source``."""
    columns = [choice.estimate, lora_estimate(arch, w), qlora_estimate(arch, w)]
    mib = lambda n: f"{n / 2**20:,.0f}"
    rows = [
        ("weights", [e.weights for e in columns]),
        ("LoRA: parameters, gradients, AdamW (fp32)", [e.lora for e in columns]),
        ("activations: block inputs (checkpoints)", [e.block_inputs for e in columns]),
        ("activations: max(one block recomputed, logits + loss)", [e.recompute for e in columns]),
        ("framework overhead", [e.overhead for e in columns]),
        ("**total**", [e.total for e in columns]),
    ]
    header = f"| MiB | {' | '.join(e.label for e in columns)} |"
    lines = [
        f"{name}: {arch.model_type}, {arch.layers} blocks, hidden {arch.hidden}, vocabulary {arch.vocab}; "
        f"seq {w.seq} × batch {w.batch}, LoRA rank {w.lora_rank}, {w.dtype}, loss on {w.loss_positions} positions",
        "",
        header,
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {label} | {' | '.join(mib(v) for v in values)} |" for label, values in rows]
    block, logits = choice.estimate.block, choice.estimate.logits
    lines += [
        "",
        f"(one block recomputed {mib(block)} MiB, logits + loss {mib(logits)} MiB: never alive together)",
        f"for a budget of {format_bytes(budget)}: emulator ratio {choice.ratio:.2f}, "
        f"{'no quantisation' if choice.quant == 'none' else quant_name(choice.quant, choice.group_size)} "
        f"(estimate {format_bytes(choice.estimate.total)})",
    ]
    if columns[1].total <= budget:
        lines.append("LoRA on the original fits this budget too: an emulator is not needed for memory")
    build = f"--ratio {choice.ratio:.2f}"
    if choice.quant != "none":
        build += f" --quant {choice.quant}" + (f" --group-size {choice.group_size}" if choice.quant == "int4" else "")
    data = "demo" if source == "demo" else "FILE"
    lines.append(f"build it with: emloc build {source} --data {data} {build} --dtype {w.dtype} --out DIR")
    return "\n".join(lines)
