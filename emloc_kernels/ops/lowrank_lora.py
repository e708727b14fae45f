"""Low-rank emulator matmul with its LoRA branch, and dense + LoRA."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_lora_reference(x, u, v, lora_a=None, lora_b=None, scaling=1.0, bias=None):
    """``x vᵀ uᵀ + s·x Aᵀ Bᵀ + b`` in plain torch (A: ρ×in, B: out×ρ, PEFT shapes)."""
    y = F.linear(F.linear(x, v), u, bias)
    if lora_a is not None:
        y = y + scaling * F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b).to(y.dtype)
    return y


def dense_lora_reference(x, weight, lora_a, lora_b, scaling=1.0, bias=None):
    """``x Wᵀ + s·x Aᵀ Bᵀ + b`` in plain torch."""
    y = F.linear(x, weight, bias)
    return y + scaling * F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b).to(y.dtype)


def lowrank_lora(x, u, v, lora_a=None, lora_b=None, scaling=1.0, bias=None):
    return lowrank_lora_reference(x, u, v, lora_a, lora_b, scaling, bias)


def dense_lora(x, weight, lora_a, lora_b, scaling=1.0, bias=None):
    return dense_lora_reference(x, weight, lora_a, lora_b, scaling, bias)
