"""The readable torch references of every op: what the Triton kernels and the CUDA extension
compute, and what CPU tensors run without ``TRITON_INTERPRET=1``.

The quantisation references (:func:`quantize_reference`, :func:`dequantize_reference`) live
beside the packed layout they define, in :mod:`.quant`, and are re-exported here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .quant import PackedFactor, PackedOperand, Right, dequantize_reference, quantize_reference

__all__ = [
    "dense",
    "gemm_2k_reference",
    "gemm_2n_reference",
    "lowrank_lora_reference",
    "dense_lora_reference",
    "quantize_reference",
    "dequantize_reference",
    "linear_cross_entropy_reference",
    "linear_kl_div_reference",
]


def dense(b: Right) -> torch.Tensor:
    """The right operand as a plain K×N tensor (dequantised when packed)."""
    if isinstance(b, PackedOperand):
        w = dequantize_reference(b.factor)
        return w.t() if b.trans else w
    return b


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in their common dtype; mixed dtypes are promoted (a bf16 · b fp32 → fp32)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt) @ b.to(dt)


def gemm_2k_reference(
    a1: torch.Tensor,
    b1: Right,
    a2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    alpha1: float = 1.0,
    alpha2: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``α₁·A₁B₁ + α₂·A₂B₂ + bias`` in plain torch, summed in fp32 and cast once."""
    acc = alpha1 * _mm(a1, dense(b1)).float()
    if a2 is not None and b2 is not None:
        acc = acc + alpha2 * _mm(a2, dense(b2)).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or a1.dtype)


def gemm_2n_reference(
    a: torch.Tensor,
    b1: Right,
    b2: torch.Tensor,
    alpha2: float = 1.0,
    out_dtypes: Optional[tuple[torch.dtype, torch.dtype]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A·B₁, α₂·A·B₂)`` in plain torch."""
    d1, d2 = out_dtypes or (a.dtype, a.dtype)
    return _mm(a, dense(b1)).to(d1), (alpha2 * _mm(a, dense(b2)).float()).to(d2)


def lowrank_lora_reference(
    x: torch.Tensor,
    u: Union[torch.Tensor, PackedFactor],
    v: Union[torch.Tensor, PackedFactor],
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x vᵀ uᵀ + s·x Aᵀ Bᵀ + b`` in plain torch (A: ρ×in, B: out×ρ, PEFT shapes).

    The LoRA branch runs in the adapter's dtype (as PEFT does) and is cast back to x's;
    packed factors are dequantised first.
    """
    u, v = (dequantize_reference(f).to(x.dtype) if isinstance(f, PackedFactor) else f for f in (u, v))
    y = F.linear(F.linear(x, v), u, bias)
    if lora_a is not None and lora_b is not None:
        y = y + scaling * F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b).to(y.dtype)
    return y


def dense_lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x Wᵀ + s·x Aᵀ Bᵀ + b`` in plain torch."""
    y = F.linear(x, weight, bias)
    return y + scaling * F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b).to(y.dtype)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the whole logits ``hidden Wᵀ + b`` (what :func:`.linear_loss.linear_cross_entropy` computes)."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index, reduction=reduction)


def linear_kl_div_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher ‖ student) of the whole logits' next-token distributions (what :func:`.linear_loss.linear_kl_div` computes)."""
    log_q = F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1).flatten(0, -2)
    with torch.no_grad():  # the teacher's distribution is a target: no gradient through it
        log_p = F.log_softmax(F.linear(teacher_hidden, weight, bias).float(), dim=-1).flatten(0, -2)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return kl if reduction == "sum" else kl / max(log_q.shape[0], 1)
