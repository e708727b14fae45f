"""Stage 1: build the low-rank emulator of a model, one block at a time."""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .._version import __version__
from ..conventions import LINEAR_TYPES, attach_quantizer, emulator_quantization_config, weight_probe
from ..conventions import out_in_weight as dense_weight_of
from ..conventions import replace_submodule as _replace
from ..modules import LowRankLinear
from .calibration import HELDOUT_EVERY, as_batches, batch_token_mask, capture_block_inputs, find_blocks, to_device
from .checkpoint import BlockCheckpoint, digest
from .distill import Distillation, distill_emulator, final_states
from .svd import WhitenedSVD, Whitening, allocate_ranks, output_error, rank_for, regression_target

logger = logging.getLogger(__name__)
ALLOCATIONS = ("uniform", "block")


def _check_ratio(value: float, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"ratio{where} must be a number in (0, 1) (fraction of the layer's parameters kept), got {value!r}"
        )
    return float(value)


def _compile(pattern: object, what: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{what} pattern must be a string (a regular expression), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} pattern {pattern!r} is not a valid regular expression: {e}") from None


def _at_least(x: Fraction, digits: int = 3) -> str:
    """``x`` rounded up to ``digits`` significant digits, as a decimal."""
    scale = Fraction(10) ** (digits - 1 - math.floor(math.log10(x)))
    return repr(float(Fraction(math.ceil(x * scale)) / scale))


def check_modules(plan: Mapping[str, tuple[nn.Module, float]]) -> None:
    """Refuse, before any work, a ratio that keeps less than rank 1 of a linear and a linear
    whose weight or bias holds NaN or inf (its decomposition would fail or be meaningless)."""
    check_ranks(plan)
    for name, (module, _) in plan.items():
        check_finite(name, module)


def check_ranks(plan: Mapping[str, tuple[nn.Module, float]]) -> None:
    """Refuse a ratio that keeps less than rank 1 of a linear (shapes only: works on meta modules)."""
    too_small = {}
    for name, (module, ratio) in plan.items():
        n_out, n_in = dense_weight_of(module).shape
        smallest = Fraction(n_in + n_out, n_in * n_out)  # the ratio that keeps rank 1 (rank_for)
        if Fraction(repr(float(ratio))) < smallest:
            too_small[name] = (ratio, n_out, n_in, smallest)
    if too_small:
        name, (ratio, n_out, n_in, _) = next(iter(too_small.items()))
        others = f" (and {len(too_small) - 1} other linears)" if len(too_small) > 1 else ""
        needed = max(smallest for *_, smallest in too_small.values())
        raise ValueError(
            f"ratio {ratio!r} keeps less than one rank of {name}{others}: out×in = {n_out}×{n_in} gives rank "
            f"⌊in·out·ratio/(in+out)⌋ = 0; rank 1 needs a ratio of at least {_at_least(needed)}"
        )


def check_finite(name: str, module: nn.Module) -> None:
    """Refuse a linear whose weight or bias holds NaN or inf."""
    for part in ("weight", "bias"):
        tensor = getattr(module, part, None)
        if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"the {part} of {name} contains NaN or inf; an emulator needs finite weights (check the checkpoint)"
            )


class Originals:
    """Where the original's tensors come from while the blocks are processed.

    This one: the model holds them already, and :meth:`load` and :meth:`release` do nothing.
    A streaming source (:class:`~emloc_kernels.emulator.stream.SafetensorsOriginals`) keeps
    the blocks on the meta device and materialises a module's tensors on :meth:`load` (a
    block, or a single linear) and puts them back on the meta device on :meth:`release`;
    the build drops a replaced linear itself, so only one block's originals exist at a time.
    """

    def load(self, module: nn.Module, name: str) -> None:
        """Materialise the tensors of ``module`` (named ``name`` in the model) and of its submodules."""

    def release(self, module: nn.Module) -> None:
        """Free what :meth:`load` materialised for ``module``."""


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
            regex = _compile(p, "targets")
            hits = {n: m for n, m in candidates.items() if regex.search(n)}
            if not hits:
                raise ValueError(
                    f"targets pattern {p!r} matches no linear inside the blocks (e.g. {next(iter(candidates))!r})"
                )
            selected.update(hits)
        candidates = {n: candidates[n] for n in candidates if n in selected}
    if isinstance(ratio, Mapping):
        if not ratio:
            raise ValueError("ratio mapping is empty: give {regex: ratio}")
        rules = [(_compile(p, "ratio"), _check_ratio(r, f"[{p!r}]")) for p, r in ratio.items()]
        for pattern, _ in rules:
            if not any(pattern.search(n) for n in candidates):
                raise ValueError(
                    f"ratio pattern {pattern.pattern!r} matches no targeted linear (e.g. {next(iter(candidates))!r})"
                )
        chosen: dict[str, tuple[nn.Module, float]] = {}
        for n, m in candidates.items():
            r = next((r for pattern, r in rules if pattern.search(n)), None)
            if r is not None:
                chosen[n] = (m, r)
        return chosen
    r = _check_ratio(ratio, "")
    return {n: (m, r) for n, m in candidates.items()}


def dense_top_blocks(model: nn.Module, ratio: float, blocks: int) -> dict[str, float]:
    """The ``{regex: ratio}`` that keeps the linears of ``model``'s last ``blocks`` blocks dense
    and compresses those below at the one ratio that spends ``ratio``'s parameters on all of
    them: LoRA trained on the emulator's top blocks then acts on the original's own weights."""
    name, layers = find_blocks(model)
    ratio, n = _check_ratio(ratio, ""), len(layers)
    if not (isinstance(blocks, int) and 1 <= blocks < n):
        raise ValueError(f"dense top blocks must be from 1 to {n - 1} (the model has {n} blocks), got {blocks!r}")

    def params(i: int) -> int:
        return sum(dense_weight_of(m).numel() for m in layers[i].modules() if isinstance(m, LINEAR_TYPES))

    top, low = sum(params(i) for i in range(n - blocks, n)), sum(params(i) for i in range(n - blocks))
    lower = (ratio * (top + low) - top) / low
    if lower <= 0:
        raise ValueError(
            f"{blocks} dense blocks of {n} hold more parameters than ratio {ratio} keeps of all: "
            "keep fewer blocks dense or give a larger ratio"
        )
    return {rf"^{re.escape(name)}\.(?:{'|'.join(map(str, range(n - blocks)))})\.": lower}


class InputRecorder:
    """Records, for one forward of a block, the input each group of linears reads.

    q/k/v (and gate/up) receive the very same tensor; the first forward groups them by
    tensor identity, so each group gets one set of Gram matrices and, later, one whitening.
    """

    def __init__(self) -> None:
        self.leader: dict[str, str] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}
        self._alive: list[torch.Tensor] = []  # keeps inputs alive so data_ptr identity is sound

    def hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.leader:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                self.leader[name] = self._seen.setdefault(key, name)
                self._alive.append(x)
            if self.leader[name] == name:
                self.rows[name] = x

        return pre_hook

    def take(self) -> dict[str, torch.Tensor]:
        rows, self.rows = self.rows, {}
        self._seen.clear()
        self._alive.clear()
        return rows


class Grams:
    """``G_OO = X_OᵀX_O``, ``G_OE = X_OᵀX_E``, ``G_EE = X_EᵀX_E`` (fp32) of one input group.

    ``X_O`` are the rows the original layer reads, ``X_E`` those the emulator's layer reads
    at the same tokens; without error propagation they are the same rows and one matrix
    serves for all three.
    """

    def __init__(self) -> None:
        self.oo: torch.Tensor | None = None
        self.oe: torch.Tensor | None = None
        self.ee: torch.Tensor | None = None
        self.tokens = 0

    def add(self, xo: torch.Tensor, xe: torch.Tensor | None) -> None:
        xo = xo.float()
        self.tokens += xo.shape[0]
        self.oo = xo.T @ xo if self.oo is None else self.oo.addmm_(xo.T, xo)
        if xe is None:
            self.oe = self.ee = self.oo
            return
        xe = xe.float()
        self.oe = xo.T @ xe if self.oe is None else self.oe.addmm_(xo.T, xe)
        self.ee = xe.T @ xe if self.ee is None else self.ee.addmm_(xe.T, xe)

    @property
    def paired(self) -> bool:
        return self.ee is not self.oo

    def __add__(self, other: "Grams") -> "Grams":
        if self.oo is None:
            return other
        if other.oo is None:
            return self
        total = Grams()
        total.tokens = self.tokens + other.tokens
        total.oo = self.oo + other.oo
        if self.paired:
            assert self.oe is not None and self.ee is not None and other.oe is not None and other.ee is not None
            total.oe, total.ee = self.oe + other.oe, self.ee + other.ee
        else:
            total.oe = total.ee = total.oo
        return total

    def check_finite(self, name: str) -> None:
        """NaN/inf in any activation row shows up in its ``G``."""
        for g in {id(g): g for g in (self.oo, self.oe, self.ee)}.values():
            if not torch.isfinite(cast(torch.Tensor, g)).all():
                raise ValueError(f"calibration activations entering {name} contain NaN or inf")


SHRINKAGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def _fit(weight: torch.Tensor, grams: Grams, whitening: Whitening) -> WhitenedSVD:
    """Whitened SVD of the best rank-unconstrained target for ``grams`` (whitened by ``G_EE``)."""
    target = regression_target(weight, cast(torch.Tensor, grams.oe), whitening) if grams.paired else weight
    return WhitenedSVD.of(target, whitening)


def _error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, grams: Grams) -> float:
    assert grams.oo is not None and grams.oe is not None and grams.ee is not None
    return output_error(weight, u @ v, grams.oo, grams.oe, grams.ee)


def _compress_block(
    model: nn.Module,
    mine: dict,
    leader: dict[str, str],
    fit: dict[str, Grams],
    held: dict[str, Grams],
    *,
    shrinkage: float | str,
    allocate: str,
    quant: str | None,
    group_size: int,
    reserve_rank: int,
) -> dict:
    """Replace one block's targeted linears; returns their report entries."""
    weights = {n: dense_weight_of(m) for n, (m, _) in mine.items()}
    target = {n: rank_for(weights[n].shape[1], weights[n].shape[0], r) for n, (_, r) in mine.items()}
    uniform = {n: max(1, target[n] - reserve_rank) for n in mine}
    reserved = {n: target[n] - uniform[n] for n in mine}  # what the distillation may add back
    groups: dict[str, list[str]] = {}
    for n in mine:
        groups.setdefault(leader[n], []).append(n)
    whitenings: dict[tuple[str, float, bool], Whitening] = {}  # one per input group, shrinkage, data part
    partial: dict[tuple[str, float], WhitenedSVD] = {}  # fits without the held-out samples

    def whitening(lead: str, gamma: float, grams: Grams, whole: bool) -> Whitening:
        if (lead, gamma, whole) not in whitenings:
            whitenings[lead, gamma, whole] = Whitening.from_gram(cast(torch.Tensor, grams.ee), shrinkage=gamma)
        return whitenings[lead, gamma, whole]

    def partial_fit(n: str, gamma: float) -> WhitenedSVD:
        if (n, gamma) not in partial:
            lead = leader[n]
            partial[n, gamma] = _fit(weights[n], fit[lead], whitening(lead, gamma, fit[lead], False))
        return partial[n, gamma]

    chosen: dict[str, float] = {}
    for lead, names in groups.items():
        if shrinkage != "auto":
            chosen[lead] = float(shrinkage)
        elif held[lead].oo is None:
            chosen[lead] = SHRINKAGE_GRID[len(SHRINKAGE_GRID) // 2]  # nothing held out: a middle value
        else:
            scores = {
                gamma: sum(_error(weights[n], *partial_fit(n, gamma).factors(uniform[n]), held[lead]) for n in names)
                for gamma in SHRINKAGE_GRID
            }
            chosen[lead] = min(scores, key=scores.__getitem__)
            for n in names:  # only the chosen shrinkage's fits are used again
                for gamma in SHRINKAGE_GRID:
                    if gamma != chosen[lead]:
                        del partial[n, gamma]
    total = {lead: fit[lead] + held[lead] for lead in groups}
    svds = {}
    for n in mine:
        lead = leader[n]
        svds[n] = _fit(weights[n], total[lead], whitening(lead, chosen[lead], total[lead], True))
    if allocate == "block":
        costs = {n: sum(weights[n].shape) for n in mine}
        caps = {n: max(1, math.prod(weights[n].shape) // costs[n] - reserve_rank) for n in mine}
        budget = sum(uniform[n] * costs[n] for n in mine)
        ranks = allocate_ranks({n: svds[n].sigma for n in mine}, costs, budget, caps)
    else:
        ranks = uniform
    report = {}
    # each linear's fits, and each input group's statistics after its last linear, are dropped
    # once used: the fp64 in×in matrices dominate a block's working memory
    last = {leader[n]: n for n in mine}
    for name, (module, r) in mine.items():
        weight, lead, rank = weights[name], leader[name], ranks[name]
        u, v = svds.pop(name).factors(rank)
        calibration_error = _error(weight, u, v, total[lead])
        if last[lead] == name:
            del total[lead], whitenings[lead, chosen[lead], True]
        heldout = None
        if held[lead].oo is not None:  # the fit without the held-out samples, scored on them
            heldout = _error(weight, *partial_fit(name, chosen[lead]).factors(rank), held[lead])
            del partial[name, chosen[lead]]
        if last[lead] == name:
            for key in [k for k in whitenings if k[0] == lead]:
                del whitenings[key]
        layer = LowRankLinear.from_factors(
            u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous(), module.bias
        )
        out_features, in_features = weight.shape
        info = {
            "in_features": in_features,
            "out_features": out_features,
            "rank": rank,
            "ratio": r,
            "kept_fraction": rank * (in_features + out_features) / (in_features * out_features),
            "bias": module.bias is not None,
            "transposed": isinstance(module, Conv1D),
            "quant": None,
            "group_size": 0,
            "shrinkage": chosen[lead],
            "original_probe": weight_probe(weight),
            "calibration_error": calibration_error,
            "heldout_error": heldout,
        }
        if reserve_rank:
            info["reserved_rank"] = reserved[name]
        if quant is not None:
            from ..modules.quantized import QuantLowRankLinear

            layer = QuantLowRankLinear.from_lowrank(layer, quant, group_size)
            info.update(quant=quant, group_size=group_size if quant == "int4" else 0)
        _replace(model, name, layer)
        report[name] = info
    return report


def quantize_emulator(model: nn.Module, quant: str, group_size: int = 128) -> nn.Module:
    """Pack the float factors of an emulator (e.g. after distillation) as ``quant``, in place."""
    from ..modules.quantized import QuantLowRankLinear
    from ..ops.quant import check_format

    check_format(quant, group_size)
    modules = getattr(model, "emloc_metadata", {}).get("modules", {})
    for name, module in list(model.named_modules()):
        if type(module) is LowRankLinear:
            _replace(model, name, QuantLowRankLinear.from_lowrank(module, quant, group_size))
            if name in modules:
                modules[name].update(quant=quant, group_size=group_size if quant == "int4" else 0)
    if modules and hasattr(model, "config"):
        attach_quantizer(model, emulator_quantization_config(cast(Any, model).emloc_metadata))
    return model


def _replay(block: nn.Module, calls: list, i: int, hidden: list[torch.Tensor], work: torch.device) -> None:
    """Carry each calibration batch's activations through ``block`` (the ``i``-th), in place."""
    for b, call in enumerate(calls):
        _, args, kwargs = call[i]
        out = block(hidden[b], *to_device(args, work), **to_device(kwargs, work))
        hidden[b] = out[0] if isinstance(out, tuple) else out


def _check_calibration_size(batches: list[dict[str, torch.Tensor]], plan: dict) -> None:
    """Refuse calibration without tokens; warn when it has fewer tokens than the widest linear
    has inputs: then its Gram matrix is singular and the whitening rests on the ridge alone."""
    tokens = sum(int(batch_token_mask(b).sum()) for b in batches)
    if tokens == 0:
        raise ValueError("calibration holds no tokens (every attention mask is zero): pass non-empty samples")
    widest = max((dense_weight_of(m).shape[1] for m, _ in plan.values()), default=0)
    if tokens < widest:
        warnings.warn(
            f"calibration has {tokens} tokens, fewer than the {widest} inputs of the widest linear: the emulator "
            "will fit them but generalise poorly (see heldout_error in the report); use more or longer samples",
            RuntimeWarning,
            stacklevel=3,
        )


def _heldout_masks(batches: list[dict], every: int) -> list[torch.Tensor | None]:
    """(B, 1) masks of the samples held out of the fit: every ``every``-th sample overall."""
    total = sum(b["input_ids"].shape[0] for b in batches)
    if every <= 0 or total < every:
        return [None] * len(batches)
    masks: list[torch.Tensor | None] = []
    seen = 0
    for b in batches:
        n = b["input_ids"].shape[0]
        masks.append((torch.arange(seen, seen + n) % every == every - 1)[:, None])
        seen += n
    return masks


def _rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x[keep.expand(x.shape[:-1])]


@torch.no_grad()
def build_emulator(
    model: nn.Module,
    calibration: Any,
    ratio: float | Mapping[str, float] = 0.4,
    *,
    tokenizer: Any = None,
    targets: str | list[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    quant: str | None = None,
    group_size: int = 128,
    max_length: int = 512,
    propagate: bool = False,
    shrinkage: float | str = 0.0,
    allocate: str = "uniform",
    heldout: bool = True,
    checkpoint: str | os.PathLike | None = None,
    reserve_rank: int = 0,
    distill: Distillation | None = None,
) -> nn.Module:
    """Replace the linears inside ``model``'s blocks by whitened-SVD ``LowRankLinear`` s, in place.

    ``calibration``: texts (with ``tokenizer``), token tensors or dicts of tensors.
    ``ratio``: fraction of each layer's parameters kept, or ``{regex: ratio}``.
    ``device``: where each block is processed (default: where the model is); only the
    block in work and the calibration activations are moved there.
    ``quant``: ``"int8"`` or ``"int4"`` packs the factors after the SVD.
    ``propagate``: fit each block on the inputs the emulator built so far produces, to the
    original's outputs (reduced-rank regression), so that later blocks compensate the error
    of earlier ones; without it every block sees the original's activations.
    ``shrinkage``: ``γ`` in ``G + γ·tr(G)/n·I``, or ``"auto"`` to choose it per input group
    among ``SHRINKAGE_GRID`` by the error on held-out calibration samples.
    ``allocate``: ``"uniform"`` gives every linear the rank of its ratio; ``"block"`` spends
    the same parameters per block where the whitened spectra say they remove most error.
    ``heldout``: hold every 4th sample out of a second fit to report ``heldout_error``.
    ``reserve_rank``: build each linear at its ratio's rank minus this many (at least 1),
    leaving them to :func:`~emloc_kernels.emulator.distill.distill_emulator`.
    ``distill``: a :class:`~emloc_kernels.emulator.distill.Distillation`: reserve its rank,
    compute the original's outputs on its texts while passing the blocks, and distil the
    emulator toward them after the build (then quantise, with ``quant``).
    ``checkpoint``: a directory where each finished block is kept; a build with the same
    settings and checkpoint resumes after the last kept block, with a bit-identical result
    (same machine and thread count). Removing the directory afterwards is the caller's choice.
    Returns the same model, with ``model.emloc_metadata`` holding the per-module report.
    :func:`~emloc_kernels.emulator.stream.build_emulator_from_pretrained` builds the same
    emulator from a model directory with one block of the original in memory at a time.
    """
    built = _build(
        model,
        calibration,
        ratio,
        Originals(),
        tokenizer=tokenizer,
        targets=targets,
        device=device,
        progress=progress,
        quant=quant,
        group_size=group_size,
        max_length=max_length,
        propagate=propagate,
        shrinkage=shrinkage,
        allocate=allocate,
        heldout=heldout,
        checkpoint=checkpoint,
        reserve_rank=reserve_rank,
        distill=distill,
    )
    return finish_build(built)


Teacher = tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]  # distillation texts and the original's outputs


@dataclass
class Built:
    """What :func:`_build` leaves for :func:`finish_build`: the emulator, the original's
    outputs on the distillation texts, the distillation and the quantisation still to do."""

    model: nn.Module
    teacher: Teacher | None
    distill: Distillation | None
    quant: str | None
    group_size: int
    progress: bool
    checkpoint: BlockCheckpoint | None = None  # where the finished blocks are kept


def finish_build(built: Built) -> nn.Module:
    """After :func:`_build` (and, streaming, after the output embeddings are read): distil and
    quantise when asked."""
    model, distill = built.model, built.distill
    if distill is not None and built.teacher is not None:
        batches, states = built.teacher
        distill_emulator(
            model,
            batches,
            states,
            rank=distill.rank,
            steps=distill.steps,
            lr=distill.lr,
            seed=distill.seed,
            progress=built.progress,
        )
    if built.quant is not None:
        quantize_emulator(model, built.quant, built.group_size)
    return model


def _build(
    model: nn.Module,
    calibration: Any,
    ratio: float | Mapping[str, float],
    originals: Originals,
    *,
    tokenizer: Any = None,
    targets: str | list[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    quant: str | None = None,
    group_size: int = 128,
    max_length: int = 512,
    propagate: bool = False,
    shrinkage: float | str = 0.0,
    allocate: str = "uniform",
    heldout: bool = True,
    checkpoint: str | os.PathLike | None = None,
    reserve_rank: int = 0,
    distill: Distillation | None = None,
    offload: bool = False,
) -> Built:
    """:func:`build_emulator` with the original's block tensors taken from ``originals``: each
    planned linear is loaded (and released) once to check it and take its probe, then each
    block is loaded when its turn comes; the linears it replaces are dropped with it.

    ``offload`` (streaming into a directory): every tensor outside the blocks is put on the
    meta device once the calibration has passed it, and each block once it is kept in the
    ``checkpoint``, so that neither the original nor the emulator is ever held whole; the
    caller reads the former back from ``originals`` and the latter from the checkpoint."""
    if quant is not None:
        from ..ops.quant import FORMATS

        if quant not in FORMATS:
            raise ValueError(f"quant must be one of {FORMATS} or None, got {quant!r}")
    if not isinstance(reserve_rank, int) or isinstance(reserve_rank, bool) or reserve_rank < 0:
        raise ValueError(f"reserve_rank must be an integer >= 0, got {reserve_rank!r}")
    if distill is not None:
        if not isinstance(distill, Distillation):
            raise TypeError(f"distill must be a Distillation or None, got {type(distill).__name__}")
        if reserve_rank:
            raise ValueError("give reserve_rank or distill, not both (distill reserves its own rank)")
        reserve_rank = distill.rank
    if offload and (checkpoint is None or distill is not None):
        raise ValueError("offload needs a checkpoint (where the blocks go) and no distillation (which trains them all)")
    # with a distillation, the factors are quantised after it (finish_build), else in the build
    quant, quant_after = (None, quant) if distill is not None else (quant, None)
    if allocate not in ALLOCATIONS:
        raise ValueError(f"allocate must be one of {ALLOCATIONS}, got {allocate!r}")
    if shrinkage != "auto" and not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage < 1e3):
        raise ValueError(f"shrinkage must be 'auto' or a number >= 0 (relative ridge), got {shrinkage!r}")
    blocks_name, blocks = find_blocks(model)
    plan = select_modules(blocks_name, blocks, ratio, targets)
    check_ranks(plan)
    probes = []  # recognise the original in a checkpoint's settings
    for name, (module, _) in plan.items():  # one linear at a time, before any work
        originals.load(module, name)
        check_finite(name, module)
        if checkpoint is not None:
            probes.append(weight_probe(dense_weight_of(module)))
        originals.release(module)
    batches = as_batches(calibration, tokenizer, max_length, model=model)
    _check_calibration_size(batches, plan)
    # the distillation's texts, when not the calibration, flow through the original blocks too
    extra = (
        None
        if distill is None or distill.texts is None
        else as_batches(distill.texts, tokenizer, max_length, model=model)
    )
    # where the model's tensors are (a streamed model's blocks wait on the meta device)
    home = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    work = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    calls = capture_block_inputs(model, blocks, batches)
    extra_calls = None if extra is None else capture_block_inputs(model, blocks, extra)
    extra_hidden = None if extra_calls is None else [to_device(c[0][0], work) for c in extra_calls]
    if offload:  # the embeddings are not needed again (the blocks' inputs are captured)
        model.to("meta")
    real = [batch_token_mask(b).to(work) for b in batches]
    split = _heldout_masks(batches, HELDOUT_EVERY if (heldout or shrinkage == "auto") else 0)
    hidden = [to_device(c[0][0], work) for c in calls]
    hidden_e = list(hidden) if propagate else None
    kept = None
    if checkpoint is not None:
        settings = [ratio, targets, quant, group_size, max_length, propagate, shrinkage, allocate, heldout]
        settings += [reserve_rank] if reserve_rank else []  # checkpoints of earlier builds stay valid
        version = [__version__, torch.__version__, torch.get_num_threads(), str(work)]
        calibration_digest = [t for b in batches for t in (b["input_ids"], batch_token_mask(b))]
        kept = BlockCheckpoint(checkpoint, digest(settings, probes, version, *calibration_digest))
        if kept.finished():
            logger.warning("resuming the build: %d of %d blocks kept in %s", kept.finished(), len(blocks), checkpoint)
    report: dict[str, dict] = {}
    bar = tqdm(blocks, desc="emulator", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        prefix = f"{blocks_name}.{i}."
        # popped, not copied: a replaced original must not outlive its block (on a GPU it
        # would stay there, and on the CPU the whole original would stay beside the emulator)
        mine = {n: plan.pop(n) for n in [n for n in plan if n.startswith(prefix)]}
        originals.load(block, f"{blocks_name}.{i}")
        block.to(work)
        if extra_hidden is not None:  # the original block, on the distillation's texts
            _replay(block, cast(list, extra_calls), i, extra_hidden, work)
        loaded = kept.load(i, work) if kept is not None and kept.done(i) else None
        if loaded is not None:  # replay the forward passes the build made here
            _replay(block, calls, i, hidden, work)
            BlockCheckpoint.place(model, loaded[0])
            report.update(loaded[1])
            if hidden_e is not None:
                _replay(block, calls, i, hidden_e, work)
            block.to("meta" if offload else home)
            del mine
            continue
        recorder = InputRecorder()
        handles = [m.register_forward_pre_hook(recorder.hook(n)) for n, (m, _) in mine.items()]
        fit: dict[str, Grams] = {}
        held: dict[str, Grams] = {}
        try:
            for b, call in enumerate(calls):
                _, args, kwargs = call[i]
                args, kwargs = to_device(args, work), to_device(kwargs, work)
                out = block(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                xo = recorder.take()
                xe = None
                if hidden_e is not None:
                    block(hidden_e[b], *args, **kwargs)  # the original block on the emulator's stream
                    xe = recorder.take()
                keep = {
                    "fit": real[b] if split[b] is None else real[b] & ~cast(torch.Tensor, split[b]).to(work),
                    "held": None if split[b] is None else real[b] & cast(torch.Tensor, split[b]).to(work),
                }
                for lead, x in xo.items():
                    for part, grams in (("fit", fit), ("held", held)):
                        grams.setdefault(lead, Grams())
                        if (mask := keep[part]) is not None and mask.any():
                            grams[lead].add(_rows(x, mask), None if xe is None else _rows(xe[lead], mask))
        finally:
            for h in handles:
                h.remove()
        for lead, g in fit.items():
            (g + held[lead]).check_finite(lead)
        report.update(
            _compress_block(
                model,
                mine,
                recorder.leader,
                fit,
                held,
                shrinkage=shrinkage,
                allocate=allocate,
                quant=quant,
                group_size=group_size,
                reserve_rank=reserve_rank,
            )
        )
        if kept is not None:
            kept.save(i, model, {n: report[n] for n in mine})
        if hidden_e is not None:  # the emulator's own stream flows on through the emulated block
            _replay(block, calls, i, hidden_e, work)
        block.to("meta" if offload else home)
        del recorder, mine, fit, held
    model.train(was_training)
    tokens = sum(int(m.sum()) for m in real)
    model.emloc_metadata = {  # type: ignore[assignment]  # torch types Module.__setattr__ as Tensor | Module; any value works
        "format_version": 1,
        "library_version": __version__,
        "original_model": str(getattr(model, "name_or_path", "") or getattr(model.config, "name_or_path", "") or ""),
        "architecture": type(model).__name__,
        "calibration": {"samples": sum(b["input_ids"].shape[0] for b in batches), "tokens": tokens},
        "build": {"propagate": propagate, "shrinkage": shrinkage, "allocate": allocate, "reserve_rank": reserve_rank},
        "modules": report,
    }
    if hasattr(model, "config"):  # its save_pretrained writes a directory that loads as this emulator
        attach_quantizer(model, emulator_quantization_config(cast(Any, model).emloc_metadata))
    logger.info(
        "emulator: %d linears compressed, mean calibration error %.4f",
        len(report),
        sum(r["calibration_error"] for r in report.values()) / max(1, len(report)),
    )
    teacher = None
    if distill is not None:
        texts, last = (batches, hidden) if extra is None else (extra, cast(list, extra_hidden))
        teacher = (texts, final_states(model, blocks, texts, last))
    return Built(model, teacher, distill, quant_after, group_size, progress, kept)
