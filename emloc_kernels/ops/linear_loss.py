"""Losses through the output head without its logits: the next-token cross-entropy and the
KL divergence between two next-token distributions, computed a chunk of rows at a time with
their gradients taken in the same pass.

Why: a causal LM's logits outweigh a small model's activations.  SmolLM2's 49,152-wide
vocabulary over 8 sequences of 192 tokens is 302 MB in fp32, and autograd keeps the logits,
their softmax and their gradient (~0.9 GB) for a model whose fine-tuning otherwise needs a
few hundred MB.  Here only one chunk's logits exist at a time (a chunk's logits about the
size of all the hidden states, at least 128 rows), and the gradient of the loss with respect to the hidden
states (and the head's weight and bias, when they require it) is computed while the logits
are there: the backward only scales it, so nothing is recomputed.

Readable references (the whole logits at once): :func:`.reference.linear_cross_entropy_reference`
and :func:`.reference.linear_kl_div_reference`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy", "linear_kl_div"]

REDUCTIONS = ("mean", "sum")


MIN_CHUNK_ROWS = 128  # each chunk reads the whole head: fewer rows make it memory-bound (1.7× slower at 16)


def chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows a chunk takes: its logits about the size of all the rows' hidden states, and at
    least :data:`MIN_CHUNK_ROWS`."""
    return max(MIN_CHUNK_ROWS, math.ceil(rows * hidden / vocab))


def _cross_entropy_chunk(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of fp32 ``logits`` and its gradient with respect to them, made in
    the logits' own buffer (softmax in place: one chunk-sized buffer in all)."""
    keep = target != ignore_index
    safe = target.masked_fill(~keep, 0)
    target_logit = logits.gather(1, safe[:, None])[:, 0]
    peak = logits.amax(dim=-1, keepdim=True)
    grad = logits.sub_(peak).exp_()
    total = grad.sum(dim=-1, keepdim=True)
    log_z = (peak + total.log())[:, 0]
    loss = ((log_z - target_logit) * keep).sum()
    grad.div_(total)
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))
    grad.mul_(keep[:, None])
    return loss, grad


def _kl_chunk(logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher ‖ student) of fp32 logits and its gradient with respect to the student's."""
    log_q = torch.log_softmax(logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    p = log_p.exp()
    loss = (p * (log_p - log_q)).sum()
    return loss, log_q.exp_().sub_(p)


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        kind: str,
        ignore_index: int,
    ) -> torch.Tensor:
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        rows = chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs_bias else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            if kind == "ce":
                loss, grad = _cross_entropy_chunk(logits, target[start : start + rows], ignore_index)
            else:
                teacher = F.linear(target[start : start + rows].to(weight.dtype), weight, bias).float()
                loss, grad = _kl_chunk(logits, teacher)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.t() @ h.float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None or bias is None else grad_bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (…, {hidden.shape[-1]}) does not match the head's weight {tuple(weight.shape)} (vocab, hidden)"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match the head's {weight.shape[0]} outputs")


def _tracked(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The inputs, detached under ``no_grad``: the forward computes the gradients of those that
    require grad, and a head that requires grad would otherwise cost a vocab × hidden buffer."""
    if torch.is_grad_enabled():
        return hidden, weight, bias
    return hidden.detach(), weight.detach(), None if bias is None else bias.detach()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=...)``
    without the logits: ``hidden`` (…, H), ``weight`` (V, H), ``targets`` (…) token ids.
    ``mean`` divides by the targets that are not ``ignore_index`` (0 when there is none)."""
    _check(hidden, weight, bias, reduction)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have the shape of hidden without its last dimension")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    total = _LinearLoss.apply(*_tracked(flat, weight, bias), flat_targets, "ce", ignore_index)
    if reduction == "sum":
        return total
    return total / (flat_targets != ignore_index).sum().clamp(min=1)


def linear_kl_div(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions that the head (``weight``,
    ``bias``) gives the student's ``hidden`` and the teacher's ``teacher_hidden`` (both (…, H)),
    without the logits; ``mean`` over the rows. The teacher's distribution is a target: no
    gradient flows through it (to ``teacher_hidden``, or to the head from its side)."""
    _check(hidden, weight, bias, reduction)
    if teacher_hidden.shape != hidden.shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must match hidden {tuple(hidden.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = _LinearLoss.apply(*_tracked(flat, weight, bias), teacher_hidden.detach().reshape(flat.shape), "kl", 0)
    return total if reduction == "sum" else total / max(flat.shape[0], 1)
