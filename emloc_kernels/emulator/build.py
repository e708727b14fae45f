"""Stage 1: build the low-rank emulator of a model, one block at a time."""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .._version import __version__
from ..modules import LowRankLinear
from .calibration import as_batches, capture_block_inputs, find_blocks, to_device, token_mask
from .svd import Whitening, rank_for, truncated_factors

logger = logging.getLogger(__name__)
LINEAR_TYPES = (nn.Linear, Conv1D)


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The out×in weight of a linear; transformers' ``Conv1D`` stores it in×out."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _check_ratio(value: float, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"ratio{where} must be a number in (0, 1) (fraction of the layer's parameters kept), got {value!r}")
    return float(value)


def select_modules(
    blocks_name: str, blocks: nn.ModuleList, ratio: float | Mapping[str, float], targets: str | list[str] | None
) -> dict[str, tuple[nn.Module, float]]:
    """``{name: (linear, ratio)}`` for the linears inside the blocks that get compressed.

    ``targets`` (regexes searched in the full module name) narrows the set; with a
    ``{regex: ratio}`` mapping, the first matching pattern gives a module its ratio and
    modules that match none stay dense.  A pattern that matches nothing is an error.
    """
    candidates = {
        f"{blocks_name}.{name}": m
        for name, m in blocks.named_modules()
        if isinstance(m, LINEAR_TYPES) and not isinstance(m, LowRankLinear)
    }
    if not candidates:
        raise ValueError(f"no linear layers inside {blocks_name!r} (already an emulator?)")
    if targets is not None:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        selected = {}
        for p in patterns:
            hits = {n: m for n, m in candidates.items() if re.search(p, n)}
            if not hits:
                raise ValueError(f"targets pattern {p!r} matches no linear inside the blocks (e.g. {next(iter(candidates))!r})")
            selected.update(hits)
        candidates = {n: candidates[n] for n in candidates if n in selected}
    if isinstance(ratio, Mapping):
        if not ratio:
            raise ValueError("ratio mapping is empty: give {regex: ratio}")
        rules = [(p, _check_ratio(r, f"[{p!r}]")) for p, r in ratio.items()]
        for p, _ in rules:
            if not any(re.search(p, n) for n in candidates):
                raise ValueError(f"ratio pattern {p!r} matches no targeted linear (e.g. {next(iter(candidates))!r})")
        chosen = {}
        for n, m in candidates.items():
            r = next((r for p, r in rules if re.search(p, n)), None)
            if r is not None:
                chosen[n] = (m, r)
        return chosen
    r = _check_ratio(ratio, "")
    return {n: (m, r) for n, m in candidates.items()}


class GramCollector:
    """Accumulates ``G = Σ xᵀx`` (fp32) per group of linears that read the same input.

    q/k/v (and gate/up) receive the very same tensor; the first batch groups them by
    tensor identity so each group gets one ``G`` and, later, one whitening.
    """

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}
        self.leader: dict[str, str] = {}
        self._seen: dict[tuple, str] = {}
        self._alive: list[torch.Tensor] = []  # keeps inputs alive so data_ptr identity is sound
        self.mask: torch.Tensor | None = None

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.leader:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                self.leader[name] = self._seen.setdefault(key, name)
                self._alive.append(x)
            if self.leader[name] != name:
                return
            rows = x[self.mask] if self.mask is not None and self.mask.shape == x.shape[:-1] else x
            rows = rows.reshape(-1, x.shape[-1]).float()
            g = self.gram.get(name)
            self.gram[name] = rows.T @ rows if g is None else g.addmm_(rows.T, rows)

        return pre_hook

    def check_finite(self) -> None:
        """NaN/inf in any activation row shows up in its ``G``: one check per group."""
        for name, g in self.gram.items():
            if not torch.isfinite(g).all():
                raise ValueError(f"calibration activations entering {name} contain NaN or inf")

    def end_forward(self) -> None:
        self._seen.clear()
        self._alive.clear()


def _compress(name: str, module: nn.Module, ratio: float, whitening: Whitening) -> tuple[LowRankLinear, dict]:
    weight = dense_weight_of(module)
    out_features, in_features = weight.shape
    rank = rank_for(in_features, out_features, ratio)
    factors = truncated_factors(weight, rank, whitening)
    bias = module.bias
    layer = LowRankLinear.from_factors(
        factors.u.to(weight.dtype).contiguous(), factors.v.to(weight.dtype).contiguous(), bias
    )
    info = {
        "in_features": in_features,
        "out_features": out_features,
        "rank": rank,
        "ratio": ratio,
        "kept_fraction": rank * (in_features + out_features) / (in_features * out_features),
        "bias": bias is not None,
        "transposed": isinstance(module, Conv1D),
        "quant": None,
        "group_size": 0,
        "calibration_error": factors.error,
    }
    return layer, info


def _compress_block(model: nn.Module, mine: dict, collector: GramCollector, quant: str | None, group_size: int) -> dict:
    """Replace one block's targeted linears; returns their report entries."""
    whitening = {n: Whitening.from_gram(g) for n, g in collector.gram.items()}
    report = {}
    for name, (module, r) in mine.items():
        layer, info = _compress(name, module, r, whitening[collector.leader[name]])
        if quant is not None:
            from ..modules.quantized import QuantLowRankLinear

            layer = QuantLowRankLinear.from_lowrank(layer, quant, group_size)
            info.update(quant=quant, group_size=group_size if quant == "int4" else 0)
        _replace(model, name, layer)
        report[name] = info
    return report


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def build_emulator(
    model: nn.Module,
    calibration: Any,
    ratio: float | Mapping[str, float] = 0.4,
    *,
    tokenizer=None,
    targets: str | list[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    quant: str | None = None,
    group_size: int = 128,
    max_length: int = 512,
) -> nn.Module:
    """Replace the linears inside ``model``'s blocks by whitened-SVD ``LowRankLinear`` s, in place.

    ``calibration``: texts (with ``tokenizer``), token tensors or dicts of tensors.
    ``ratio``: fraction of each layer's parameters kept, or ``{regex: ratio}``.
    ``device``: where each block is processed (default: where the model is); only the
    block in work and the calibration activations are moved there.
    ``quant``: ``"int8"`` or ``"int4"`` packs the factors after the SVD.
    Returns the same model, with ``model.emloc_metadata`` holding the per-module report.
    """
    if quant is not None:
        from ..ops.quant import FORMATS

        if quant not in FORMATS:
            raise ValueError(f"quant must be one of {FORMATS} or None, got {quant!r}")
    blocks_name, blocks = find_blocks(model)
    plan = select_modules(blocks_name, blocks, ratio, targets)
    batches = as_batches(calibration, tokenizer, max_length)
    home = next(model.parameters()).device
    work = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    calls = capture_block_inputs(model, blocks, batches)
    masks = [token_mask(b) for b in batches]
    hidden = [to_device(c[0][0], work) for c in calls]
    report: dict[str, dict] = {}
    bar = tqdm(blocks, desc="emulator", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        prefix = f"{blocks_name}.{i}."
        # popped, not copied: a replaced original must not outlive its block (on a GPU it
        # would stay there, and on the CPU the whole original would stay beside the emulator)
        mine = {n: plan.pop(n) for n in [n for n in plan if n.startswith(prefix)]}
        block.to(work)
        collector = GramCollector()
        handles = [m.register_forward_pre_hook(collector.hook(n)) for n, (m, _) in mine.items()]
        try:
            for b, call in enumerate(calls):
                collector.mask = None if masks[b] is None else masks[b].to(work)
                _, args, kwargs = call[i]
                out = block(hidden[b], *to_device(args, work), **to_device(kwargs, work))
                hidden[b] = out[0] if isinstance(out, tuple) else out
                collector.end_forward()
        finally:
            for h in handles:
                h.remove()
        collector.check_finite()
        report.update(_compress_block(model, mine, collector, quant, group_size))
        block.to(home)
        del collector, mine
    model.train(was_training)
    tokens = sum(int(m.sum()) if m is not None else b["input_ids"].numel() for m, b in zip(masks, batches))
    model.emloc_metadata = {
        "format_version": 1,
        "library_version": __version__,
        "original_model": str(getattr(model, "name_or_path", "") or getattr(model.config, "name_or_path", "") or ""),
        "architecture": type(model).__name__,
        "calibration": {"samples": sum(b["input_ids"].shape[0] for b in batches), "tokens": tokens},
        "modules": report,
    }
    logger.info("emulator: %d linears compressed, mean calibration error %.4f", len(report),
                sum(r["calibration_error"] for r in report.values()) / max(1, len(report)))
    return model
