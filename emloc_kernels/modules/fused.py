"""The one place that chooses the fused op for a LoRA around a base linear."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .lowrank import LowRankLinear


def fusable(base: nn.Module) -> bool:
    """Whether :func:`fused_lora` takes ``base`` (a subclass of ``nn.Linear`` other than ours may
    compute something else: it keeps its own forward)."""
    return isinstance(base, LowRankLinear) or type(base) is nn.Linear


def fused_lora(
    base: nn.Linear, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``base(x) + scaling·x lora_aᵀ lora_bᵀ`` in one fused op: :func:`ops.lowrank_lora` for a
    :class:`LowRankLinear` (its quantised form included), :func:`ops.dense_lora` for a plain
    ``nn.Linear`` (PEFT shapes: ``lora_a`` ρ×in, ``lora_b`` out×ρ)."""
    if isinstance(base, LowRankLinear):
        return ops.lowrank_lora(x, *base.factors(), lora_a, lora_b, scaling, base.bias)
    if type(base) is nn.Linear:
        return ops.dense_lora(x, base.weight, lora_a, lora_b, scaling, base.bias)
    raise TypeError(f"fused_lora: base must be an nn.Linear or LowRankLinear, got {type(base).__name__}")
