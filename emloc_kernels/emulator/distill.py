"""Stage 1b: distil the emulator toward its original on the calibration text.

Truncation leaves the emulator's next-token distribution far from the original's; a LoRA
trained on the emulator for a task then spends part of its rank repairing that gap, and the
repair does not transfer to the original.  Distillation trains a rank-ρ update of every
emulated linear so that the emulator's next-token distribution matches the original's on
the calibration tokens (KL divergence; the original's final hidden states are computed once,
while it is in memory for the build), then folds it into the factors: ``u ← [u | s·B]``,
``v ← [v; A]``.  Built with ``reserve_rank=ρ``, the emulator keeps its byte budget.

Memory: that of LoRA training on the emulator (with gradient checkpointing), plus the
original's final hidden states (calibration tokens × hidden size).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..conventions import (
    attach_quantizer,
    emulator_quantization_config,
    plain_output_head,
    replace_submodule,
    set_checkpointing,
)
from ..lora import LoraLinear
from ..modules import LowRankLinear
from ..ops import linear_kl_div
from .calibration import HELDOUT_EVERY, batch_token_mask, to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distillation:
    """``build_emulator(..., distill=Distillation(...))``: after the build, ``steps`` steps of
    :func:`distill_emulator` at ``rank`` (reserved from each linear's budget) on ``texts``
    (texts, token tensors or dicts; None: the calibration data), whose original outputs the
    build computes as it passes the blocks."""

    steps: int = 200
    rank: int = 8
    texts: Any = None
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"distill {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"distill lr must be a positive finite number, got {self.lr!r}")


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer under the output head (its output is the final, normalised hidden state)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise ValueError(f"{type(model).__name__} has no decoder under its output head (get_decoder())")
    return decoder


@torch.no_grad()
def teacher_states(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The original's final hidden states ``(B, T, hidden)`` on each calibration batch (on the CPU)."""
    decoder = _decoder(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    states = [decoder(**to_device(b, device)).last_hidden_state.float().cpu() for b in batches]
    model.train(was_training)
    return states


@torch.no_grad()
def final_states(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]], last: list[torch.Tensor]
) -> list[torch.Tensor]:
    """What the decoder makes of its last block's outputs ``last`` (one per batch): the model's
    final hidden states, computed with every block stubbed (the last returns ``last[b]``), so
    that only what runs outside the blocks (the final norm) is evaluated."""
    decoder = _decoder(model)
    device = next(p.device for p in decoder.parameters() if not p.is_meta)
    current: list[torch.Tensor] = []

    def stub(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            return current[0].to(hidden.device, hidden.dtype) if index == len(blocks) - 1 else hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = stub(i)
    try:
        states = []
        for batch, hidden in zip(batches, last):
            current[:] = [hidden]
            states.append(decoder(**to_device(batch, device), use_cache=False).last_hidden_state.float().cpu())
    finally:
        for block in blocks:
            del block.forward
    return states


def _micro_batches(
    batches: list[dict[str, torch.Tensor]], states: list[torch.Tensor], size: int
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The texts (batch rows) regrouped ``size`` at a time with their teacher states, each
    group right-padded (attention mask 0) to its longest text."""
    rows = []
    for b, s in zip(batches, states):
        mask = batch_token_mask(b)
        for i in range(b["input_ids"].shape[0]):
            n = int(mask[i].nonzero().max()) + 1 if mask[i].any() else 0
            if n:
                rows.append(({"input_ids": b["input_ids"][i, :n], "attention_mask": mask[i, :n].long()}, s[i, :n]))
    groups = []
    for j in range(0, len(rows), size):
        chunk = rows[j : j + size]
        width = max(r[1].shape[0] for r in chunk)
        pad = [width - r[1].shape[0] for r in chunk]
        batch = {k: torch.stack([F.pad(r[0][k], (0, p)) for r, p in zip(chunk, pad)]) for k in chunk[0][0]}
        groups.append((batch, torch.stack([F.pad(r[1], (0, 0, 0, p)) for r, p in zip(chunk, pad)])))
    return groups


def _kl(
    decoder: nn.Module, head: nn.Linear, batch: dict[str, torch.Tensor], teacher: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Mean over real tokens of KL(original ‖ emulator) of the next-token distributions, the
    logits over the vocabulary (49,152 wide for SmolLM2) made a chunk of positions at a time
    with their gradient (:func:`~emloc_kernels.ops.linear_kl_div`): never recomputed, never
    all in memory."""
    batch = to_device(batch, device)
    mask = batch_token_mask(batch)
    student = decoder(**batch).last_hidden_state[mask]
    target = teacher.to(device)[mask].to(student.dtype)
    return linear_kl_div(student, head.weight, target, head.bias)


def fold_lora(lora: LoraLinear) -> LowRankLinear:
    """The low-rank linear equal to ``lora`` around a :class:`LowRankLinear`:
    ``u v + s·B A = [u | s·B] [v; A]`` (rank r + ρ)."""
    base = lora.base_layer
    if type(base) is not LowRankLinear:
        raise TypeError(f"fold_lora needs a LoRA around a float LowRankLinear, got {type(base).__name__}")
    with torch.no_grad():
        u = torch.cat([base.u, (lora.scaling * lora.lora_B.weight).to(base.u.dtype)], dim=1)
        v = torch.cat([base.v, lora.lora_A.weight.to(base.v.dtype)], dim=0)
    return LowRankLinear.from_factors(u, v, base.bias)


def distill_emulator(
    emulator: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    teacher: list[torch.Tensor],
    *,
    rank: int = 8,
    steps: int = 200,
    lr: float = 1e-3,
    texts_per_step: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a rank-``rank`` update of each emulated linear toward the original's next-token
    distribution (``teacher``: :func:`teacher_states` on the same ``batches``), fold it into the
    factors in place, and return the training losses and the KL on held-out calibration texts
    (every ``HELDOUT_EVERY``-th, left out of the training) before and after.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"distill rank must be a positive integer, got {rank!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill steps must be a positive integer, got {steps!r}")
    if len(teacher) != len(batches) or any(t.shape[:2] != b["input_ids"].shape for t, b in zip(teacher, batches)):
        raise ValueError("teacher states must come from teacher_states() on the same calibration batches")
    emulated = {n: m for n, m in emulator.named_modules() if isinstance(m, LowRankLinear)}
    if not emulated:
        raise ValueError("the model has no emulated linears (LowRankLinear): build the emulator first")
    quantised = [n for n, m in emulated.items() if type(m) is not LowRankLinear]
    if quantised:
        raise ValueError(
            f"distillation needs float factors, but {quantised[0]} is quantised: distil before quantising "
            "(build_emulator(quant=None), then distill_emulator, then quantize_emulator)"
        )
    decoder, head = _decoder(emulator), plain_output_head(emulator)
    if head is None:
        raise ValueError(
            f"distillation needs logits that are a plain linear head of the final hidden state; "
            f"{type(emulator).__name__} scales, caps or adapts them: build without distillation"
        )
    device = next(emulator.parameters()).device
    items = _micro_batches(batches, teacher, 1)
    held_out = [len(items) >= HELDOUT_EVERY and i % HELDOUT_EVERY == HELDOUT_EVERY - 1 for i in range(len(items))]
    held = [it for it, out in zip(items, held_out) if out]
    train_rows = [it for it, out in zip(items, held_out) if not out]
    train_items = _micro_batches([b for b, _ in train_rows], [s for _, s in train_rows], texts_per_step)

    def heldout_kl() -> float | None:
        if not held:
            return None
        with torch.no_grad():
            return sum(_kl(decoder, head, b, s, device).item() for b, s in held) / len(held)

    was_training, config = emulator.training, getattr(emulator, "config", None)
    use_cache = getattr(config, "use_cache", None)
    emulator.eval()
    before = heldout_kl()
    frozen = {p: p.requires_grad for p in emulator.parameters()}
    for p in emulator.parameters():
        p.requires_grad_(False)
    added: dict[str, LoraLinear] = {}
    reports = (getattr(emulator, "emloc_metadata", None) or {}).get("modules", {})
    for name, module in emulated.items():
        # at most the ranks the build reserved (fewer where its ratio's rank was already small)
        budget = reports.get(name, {}).get("reserved_rank", rank)
        extra = min(rank, budget, min(module.in_features, module.out_features) - module.rank)
        if extra > 0:
            torch.manual_seed(seed + len(added))
            added[name] = LoraLinear(module, extra, float(extra))
            replace_submodule(emulator, name, added[name])
    params = [p for m in added.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    opt = torch.optim.AdamW(params, lr=lr)
    checkpointing = set_checkpointing(emulator, True)
    if config is not None and use_cache is not None:
        config.use_cache = False
    order = random.Random(seed)
    losses: list[float] = []
    pool: list[int] = []
    emulator.train()
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # also when called under no_grad, as from a build (restored below)
    try:
        bar = tqdm(range(steps), desc="distil emulator", unit="step", disable=not progress)
        for _ in bar:
            if not pool:
                pool = order.sample(range(len(train_items)), len(train_items))
            batch, states = train_items[pool.pop()]
            loss = _kl(decoder, head, batch, states, device)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
    finally:
        torch.set_grad_enabled(grad_was)
        emulator.eval()
        for name, lora in added.items():
            replace_submodule(emulator, name, fold_lora(lora))
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        if not checkpointing:
            set_checkpointing(emulator, False)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
    after = heldout_kl()
    emulator.train(was_training)
    result = {
        "rank": rank,
        "steps": steps,
        "lr": lr,
        "texts_per_step": texts_per_step,
        "heldout_kl_before": before,
        "heldout_kl_after": after,
        "losses": losses,
    }
    metadata = getattr(emulator, "emloc_metadata", None)
    if metadata is not None:
        for name, lora in added.items():
            metadata["modules"][name]["rank"] += lora.r
            module = metadata["modules"][name]
            module["kept_fraction"] = (
                module["rank"]
                * (module["in_features"] + module["out_features"])
                / (module["in_features"] * module["out_features"])
            )
        for module in metadata["modules"].values():
            module.pop("reserved_rank", None)  # given back
        metadata["build"]["distill"] = {k: v for k, v in result.items() if k != "losses"}
        if hasattr(emulator, "config"):
            attach_quantizer(emulator, emulator_quantization_config(metadata))
    logger.info("distillation: held-out KL %s → %s", before, after)
    return result
