"""Stage 3 beyond the paper: LoRA transfer that looks at the activations the original model sees.

The paper's correction (:mod:`.correction`) only knows the weights: it fixes ``W − W_E`` on
span(A), which on real activations is many times the LoRA's own output and can raise the
mismatch it is meant to remove.  Two closed-form, inference-only alternatives, both writing a
standard PEFT adapter for the original model (``PeftModel.from_pretrained(original, dir)``):

**Activation-aware correction** (:func:`correct_adapter_aware`).  Per module, with ``A = lora_Aᵀ``
(in×ρ), ``B = lora_Bᵀ`` (ρ×out), ``A = U_a Σ_a V_aᵀ``, ``A_o = U_a``, ``B_o = Σ_a V_aᵀ B``,
``Δ = W − W_E`` and ``G = Σ xᵀx`` over the inputs ``x`` the *original* linear sees on
calibration texts::

    B′ = B_o − λ·(A_oᵀ G A_o + μ′I)⁻¹ A_oᵀ G Δᵀ / s,   μ′ = μ·tr(A_oᵀ G A_o)/ρ

(DESIGN §7 writes the same in lora_B shape, ``Δ G A_o (A_oᵀ G A_o + μ′I)⁻¹``).  With λ = 1,
μ = 0 it is the least-squares fit of ``x Wᵀ + s·x A_o B′ ≈ x W_Eᵀ + s·x A B`` over the
calibration inputs; with ``G = I`` it is the paper's unclamped correction.

**Layer-streamed transfer** (:func:`transfer_adapter`).  The blocks are walked in order with two
hidden streams: ``X_T``, what the emulator + trained LoRA sees, and ``X_S``, what the original +
*new* LoRA sees (the new LoRA of a block is applied as soon as it is solved, so later blocks fit
the drift of earlier ones).  Per adapted linear, with ``P = s·lora_B·lora_A`` (out×in), rows of
``X`` = tokens::

    R_λ = (1−λ)·X_T Pᵀ + λ·(X_T (W_E + P)ᵀ − X_S Wᵀ) = X_T (P + λW_E)ᵀ − λ·X_S Wᵀ
    M   = R_λᵀ X_S G_S⁻¹,   G_S = X_Sᵀ X_S (+ ridge),   S_S S_Sᵀ = G_S (Cholesky)
    L   = [M S_S]_ρ S_S⁻¹                      (the rank-ρ minimiser of ‖R_λ − X_S Lᵀ‖)

and ``L = s·lora_B′·lora_A′``.  λ = 0 reproduces the LoRA's own effect from the original's
inputs; λ = 1 makes original + L reproduce emulator + LoRA, emulator error included.  Only the
Gram matrices ``X_Sᵀ X_S``, ``X_Tᵀ X_S``, ``X_Tᵀ X_T`` are kept (fp64), never a backward pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .conventions import LORA_A_KEY, LORA_B_KEY, PEFT_KEY_PREFIX, check_probe, load_model, out_in_weight
from .correction import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PathLike,
    _Emulator,
    _is_path,
    _load_adapter,
    _lora_paths,
    _Original,
    lora_scaling,
    weights_for,
)
from .emulator.build import Grams, InputRecorder
from .emulator.calibration import as_batches, capture_block_inputs, find_blocks, to_device, token_mask
from .files import check_output, copy_tokenizer, write_dir_atomically
from .modules import LowRankLinear

__all__ = ["collect_grams", "correct_adapter_aware", "correct_lora_aware", "reduced_rank_lora", "transfer_adapter"]

Lam = float | Mapping[str, float]
AWARE_REPORT = "correction_report.json"
TRANSFER_REPORT = "transfer_report.json"


# --------------------------------------------------------------------------- shared helpers


def _check_number(value: Any, name: str, *, low: float = -math.inf, nonneg: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (nonneg and value < 0):
        raise ValueError(f"{name} must be a finite {'non-negative ' if nonneg else ''}number, got {value!r}")
    return float(value)


def _lam_per_module(lam: Lam, paths: list[str]) -> dict[str, float]:
    """λ of each module: one number, or ``{regex: λ}`` where the first pattern found in the
    module's path wins and a module that matches none keeps λ = 0 (no correction).  A pattern
    that matches no adapted module is an error (a typo would otherwise silently do nothing)."""
    if not isinstance(lam, Mapping):
        value = _check_number(lam, "lam")
        return dict.fromkeys(paths, value)
    if not lam:
        raise ValueError("lam mapping is empty: give a number or {regex: λ}")
    rules = [(p, _check_number(v, f"lam[{p!r}]")) for p, v in lam.items()]
    for p, _ in rules:
        if not any(re.search(p, path) for path in paths):
            raise ValueError(f"lam pattern {p!r} matches no adapted module (e.g. {paths[0]!r})")
    return {path: next((v for p, v in rules if re.search(p, path)), 0.0) for path in paths}


def _compute_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no fp64


def _linear_weight(module: nn.Module, path: str) -> torch.Tensor:
    """out×in weight of a dense or low-rank (possibly quantised) linear, in fp64."""
    if isinstance(module, LowRankLinear):  # QuantLowRankLinear dequantises in its dense_weight
        return module.dense_weight(torch.float64)
    if isinstance(module, (nn.Linear, Conv1D)):
        return out_in_weight(module).detach().double()
    raise TypeError(
        f"module {path} is {type(module).__name__}; expected nn.Linear, Conv1D or LowRankLinear "
        f"(pass the emulator without its LoRA, or as the PeftModel that holds it)"
    )


def _linear_at(model: nn.Module, path: str, role: str) -> nn.Module:
    """The linear at ``path``, seen through a PEFT LoRA wrapper (whose adapters are disabled
    while the model runs here)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the adapter targets {path}, which the {role} does not have") from None
    module = cast(Any, module).get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"{role} module {path} is {type(module).__name__}; expected a linear layer "
            f"(pass the {role} without LoRA wrappers, or as the PeftModel that holds them)"
        )
    return module


@contextlib.contextmanager
def _adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The model to run, with any PEFT adapters it carries switched off."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextlib.contextmanager
def _restore_mode(model: nn.Module, training: bool) -> Iterator[None]:
    try:
        yield
    finally:
        model.train(training)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _as_model(x: nn.Module | PathLike, role: str) -> nn.Module:
    if isinstance(x, nn.Module):
        return x
    if _is_path(x):
        if role == "emulator":
            from .emulator import load_emulator

            return load_emulator(x)
        return load_model(x)
    raise TypeError(f"{role} must be a model or a directory, got {type(x).__name__}")


def _home(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _lora_hook(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> Callable:
    """Forward hook adding ``s·x Aᵀ Bᵀ`` to a linear's output (a LoRA without wrapping the module)."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a, b = lora_a.to(x.device, x.dtype), lora_b.to(x.device, x.dtype)
        return out + scaling * ((x @ a.T) @ b.T)

    return hook


def _check_fits_original(
    path: str, lora_a: torch.Tensor, lora_b: torch.Tensor, original: nn.Module, emulator: nn.Module
) -> None:
    """Refuse a LoRA whose out×in differs from the original's linear, and an original other than
    the one the emulator was built from (the probe recorded at build time)."""
    module = original.get_submodule(path)
    weight = out_in_weight(module)
    if tuple(weight.shape) != (lora_b.shape[0], lora_a.shape[1]):
        raise ValueError(
            f"{path}: the adapter is out×in = {(lora_b.shape[0], lora_a.shape[1])}, the original "
            f"{tuple(weight.shape)}; the adapter, emulator and original must belong to the same model"
        )
    metadata = getattr(emulator, "emloc_metadata", None) or {}
    check_probe(weight, (metadata.get("modules") or {}).get(path) or {}, path, metadata.get("original_model"))


def _write_adapter(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    report: Mapping[str, Any],
    report_name: str,
    overwrite: bool,
    inputs: Sequence[object],
) -> None:
    """The same files as :func:`.correction.correct_adapter` writes, atomically (with the
    tokenizer of the original's directory)."""

    def write(directory: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"}
        )
        (directory / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        (directory / report_name).write_text(json.dumps(report, indent=2))
        copy_tokenizer(config.get("base_model_name_or_path"), directory)

    write_dir_atomically(out_dir, write, overwrite=overwrite, inputs=inputs, kind="adapter")


def _out_config(config: Mapping[str, Any], name: str, conv1d_seen: bool) -> dict[str, Any]:
    out = dict(config, base_model_name_or_path=name)
    if conv1d_seen:  # PEFT stores the original's Conv1D in×out; the LoRA factors keep their shapes
        out["fan_in_fan_out"] = True
    return out


# --------------------------------------------------------------------------- (a) activation-aware correction


def correct_lora_aware(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weight_delta: torch.Tensor,
    scaling: float,
    gram: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
    mu: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Correct one LoRA pair for ``weight_delta = W − W_E`` (out×in), weighting by the inputs' Gram.

    Minimises ``Σ_x ‖x Δᵀ − s·x A_o D‖²`` over ``D`` (ρ×out) for the inputs summarised by
    ``gram = Σ xᵀx`` (in×in; ``None`` = identity, the paper's case), then returns
    ``B′ = B_o − λ·D`` in PEFT shapes: ``(lora_a_o = A_oᵀ, lora_b′ = B′ᵀ, stats)``, in the inputs'
    dtypes on ``weight_delta``'s device (math in fp64).  ``mu`` is a ridge relative to the mean
    eigenvalue of ``A_oᵀ G A_o`` (shrinks the correction where the inputs barely reach span(A)).
    """
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_a must be ρ×in and lora_b out×ρ; got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    rank, n_in = lora_a.shape
    if tuple(weight_delta.shape) != (lora_b.shape[0], n_in):
        raise ValueError(
            f"weight_delta must be out×in = {(lora_b.shape[0], n_in)} to match the LoRA; "
            f"got {tuple(weight_delta.shape)}"
        )
    if rank > n_in:
        raise ValueError(f"LoRA rank {rank} exceeds in_features {n_in}")
    if gram is not None and tuple(gram.shape) != (n_in, n_in):
        raise ValueError(f"gram must be in×in = {(n_in, n_in)}; got {tuple(gram.shape)}")
    if not (math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"scaling must be finite and nonzero, got {scaling}")
    lam = _check_number(lam, "lam")
    mu = _check_number(mu, "mu", nonneg=True)

    device = _compute_device(weight_delta.device)
    a = lora_a.to(device, torch.float64).T  # in×ρ
    b = lora_b.to(device, torch.float64).T  # ρ×out
    a_o, sigma, v_h = torch.linalg.svd(a, full_matrices=False)
    b_o = sigma[:, None] * (v_h @ b)
    delta_t = weight_delta.to(device, torch.float64).T  # in×out
    if gram is None:
        g_a = a_o  # G A_o with G = I
    else:
        g_a = gram.to(device, torch.float64) @ a_o  # in×ρ
    h = a_o.T @ g_a  # A_oᵀ G A_o (ρ×ρ)
    if mu > 0:
        h = h + (mu * torch.trace(h) / rank) * torch.eye(rank, dtype=h.dtype, device=device)
    rhs = g_a.T @ delta_t / scaling  # A_oᵀ G Δᵀ / s  (ρ×out)
    d = torch.linalg.lstsq(h, rhs).solution if gram is not None or mu > 0 else rhs
    applied = lam * d
    b_new = b_o - applied
    stats = {
        "rows": rank,
        "lam": lam,
        "mu": mu,
        "lora_norm": b_o.norm().item(),
        "correction_norm": d.norm().item(),  # ‖D‖ (λ = 1)
        "applied_norm": applied.norm().item(),
    }
    return a_o.T.to(lora_a.dtype).contiguous(), b_new.T.to(lora_b.dtype).contiguous(), stats


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    calibration: Any,
    paths: list[str] | None = None,
    *,
    tokenizer: Any = None,
    max_length: int = 512,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{path: G = Σ xᵀx}`` (fp32, on the work device) of the inputs each linear inside the
    model's blocks sees on the calibration data (padding excluded), streamed one block at a time
    as the emulator build does.  Linears that read the same tensor (q/k/v, gate/up) share one
    ``G`` object.  ``paths`` limits the set (default: every linear in the blocks)."""
    wrapper, model = model, _base(model)
    blocks_name, blocks = find_blocks(model)
    linears: dict[str, nn.Module] = {}
    for n, m in blocks.named_modules():
        if any(n.startswith(k + ".") for k in linears):
            continue  # inside a LoRA wrapper already listed (its lora_A/lora_B are linears too)
        if hasattr(m, "get_base_layer"):
            m = m.get_base_layer()
        if isinstance(m, (nn.Linear, Conv1D)):
            linears[n] = m
    linears = {f"{blocks_name}.{n}": m for n, m in linears.items()}
    if paths is not None:
        missing = [p for p in paths if p not in linears]
        if missing:
            raise ValueError(f"paths names modules that are not linears inside {blocks_name!r}: {missing[:3]}")
        linears = {p: linears[p] for p in paths}
    batches = as_batches(calibration, tokenizer, max_length, model=model)
    home = _home(model)
    work = torch.device(device) if device is not None else home
    masks = [token_mask(b) for b in batches]
    grams: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    with _adapters_off(wrapper), _restore_mode(model, was_training):
        calls = capture_block_inputs(model, blocks, batches)
        hidden = [to_device(c[0][0], work) for c in calls]
        for i, block in enumerate(tqdm(blocks, desc="calibration Grams", unit="block", disable=not progress)):
            prefix = f"{blocks_name}.{i}."
            mine = {p: m for p, m in linears.items() if p.startswith(prefix)}
            block.to(work)
            recorder = InputRecorder()
            handles = [m.register_forward_pre_hook(recorder.hook(p)) for p, m in mine.items()]
            sums: dict[str, Grams] = {}
            try:
                for b, call in enumerate(calls):
                    mask = None if masks[b] is None else cast(torch.Tensor, masks[b]).to(work)
                    _, args, kwargs = call[i]
                    out = block(hidden[b], *to_device(args, work), **to_device(kwargs, work))
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                    for lead, x in recorder.take().items():
                        rows = x[mask] if mask is not None and mask.shape == x.shape[:-1] else x
                        sums.setdefault(lead, Grams()).add(rows.reshape(-1, x.shape[-1]), None)
            finally:
                for h in handles:
                    h.remove()
                block.to(home)
            for lead, g in sums.items():
                g.check_finite(lead)
            for p in mine:
                grams[p] = cast(torch.Tensor, sums[recorder.leader[p]].oo)
    return grams


def correct_adapter_aware(
    adapter: PeftModel | PathLike,
    emulator: nn.Module | PathLike,
    original: nn.Module | PathLike,
    calibration: Any,
    out_dir: PathLike,
    *,
    lam: Lam = 1.0,
    mu: float = 0.0,
    tokenizer: Any = None,
    max_length: int = 512,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Activation-aware correction of a LoRA trained on ``emulator``, for ``original``; written to ``out_dir``.

    As :func:`.correction.correct_adapter` (same inputs, same output files, with
    ``correction_report.json``), but each module's correction is the least-squares fit over
    the inputs the original's linear sees on ``calibration`` (:func:`correct_lora_aware`).
    ``lam``: a number or ``{regex: λ}`` (first match wins, unmatched modules λ = 0), the
    fraction of the fitted correction applied.  ``mu``: relative ridge (≥ 0).  ``original``
    must be runnable: a model or an HF directory (loaded whole).
    """
    mu = _check_number(mu, "mu", nonneg=True)
    inputs = [adapter, emulator, original]
    out_dir = check_output(out_dir, inputs, overwrite=overwrite, option="out_dir")
    config, state = _load_adapter(adapter)
    paths = _lora_paths(state)
    lams = _lam_per_module(lam, paths)
    emu = _Emulator(emulator)
    model = _as_model(original, "original")
    orig = _Original(model)
    if emu.architecture and orig.architecture and emu.architecture != orig.architecture:
        raise ValueError(f"the emulator was built from a {emu.architecture}, but the original is a {orig.architecture}")
    blocks_name, _ = find_blocks(orig.model)
    corrected = [p for p in paths if not emu.kept_dense(p) and p.startswith(blocks_name + ".")]
    grams = (
        collect_grams(
            model, calibration, corrected, tokenizer=tokenizer, max_length=max_length, device=device, progress=progress
        )
        if corrected
        else {}
    )

    out_state = dict(state)
    modules: dict[str, dict[str, Any]] = {}
    unchanged = [p for p in paths if p not in grams]
    conv1d_seen = False
    for path in tqdm(corrected, desc="aware correction", unit="module", disable=not progress):
        key_a, key_b = PEFT_KEY_PREFIX + path + LORA_A_KEY, PEFT_KEY_PREFIX + path + LORA_B_KEY
        lora_a, lora_b = state[key_a], state[key_b]
        r, s = lora_scaling(config, path)
        if lora_a.shape[0] != r:
            raise ValueError(f"{path}: the adapter config gives rank {r}, but its lora_A has rank {lora_a.shape[0]}")
        w, w_e, conv1d = weights_for(emu, orig, path, lora_a, lora_b)
        gram = grams[path]
        delta = w.to(gram.device, torch.float64) - w_e.to(gram.device)
        a_o, b_c, stats = correct_lora_aware(lora_a, lora_b, delta, s, gram, lam=lams[path], mu=mu)
        out_state[key_a], out_state[key_b] = a_o.cpu(), b_c.cpu()
        modules[path] = {"rank": r, "scaling": s, **stats}
        conv1d_seen |= conv1d

    out_config = _out_config(config, orig.name or emu.metadata.get("original_model", ""), conv1d_seen)
    lora_total = math.sqrt(sum(m["lora_norm"] ** 2 for m in modules.values()))
    applied_total = math.sqrt(sum(m["applied_norm"] ** 2 for m in modules.values()))
    report = {
        "original": out_config["base_model_name_or_path"],
        "method": "activation_aware",
        "lam": dict(lam) if isinstance(lam, Mapping) else lam,
        "mu": mu,
        "modules": modules,
        "unchanged": unchanged,
        "totals": {
            "modules": len(modules),
            "lora_norm": lora_total,
            "applied_norm": applied_total,
            "applied_ratio": applied_total / lora_total if lora_total > 0 else None,
        },
    }
    _write_adapter(out_dir, out_state, out_config, report, AWARE_REPORT, overwrite, inputs)
    return report


# --------------------------------------------------------------------------- (b) layer-streamed transfer


def reduced_rank_lora(
    target_cross: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    ridge: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``L`` (out×in) minimising ``‖R − X Lᵀ‖`` as PEFT factors.

    ``target_cross = Rᵀ X`` (out×in) and ``gram = Xᵀ X`` (in×in) summarise the regression;
    ``ridge`` adds ``ridge·tr(G)/in·I`` to ``G`` (keeps the Cholesky defined when the data do
    not span the input space).  Returns ``(lora_a ρ×in, lora_b out×ρ, σ)`` (fp64) with
    ``scaling·lora_b·lora_a = L = [M S]_ρ S⁻¹``, ``M = Rᵀ X G⁻¹``, ``S Sᵀ = G``, and σ the
    singular values of ``M S`` (``Σ_{i≤ρ} σ_i²`` is the part of ``‖R‖²`` the fit explains).
    """
    out_f, n_in = target_cross.shape
    if tuple(gram.shape) != (n_in, n_in):
        raise ValueError(f"gram must be in×in = {(n_in, n_in)}; got {tuple(gram.shape)}")
    if not 0 < rank <= min(out_f, n_in):
        raise ValueError(f"rank must be in [1, {min(out_f, n_in)}], got {rank}")
    if not (math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"scaling must be finite and nonzero, got {scaling}")
    ridge = _check_number(ridge, "ridge", nonneg=True)
    return _reduced_rank_from_root(target_cross, _ridged_cholesky(gram, ridge), rank, scaling)


def _ridged_cholesky(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Lower ``S`` with ``S Sᵀ = G + ε·I``, ``ε = ridge·tr(G)/in``, raised until it is defined."""
    g = gram.double()
    n_in = g.shape[0]
    eps: torch.Tensor | float = ridge * torch.trace(g) / n_in
    for _ in range(6):  # a numerically singular G: raise the ridge until the Cholesky holds
        s_chol, info = torch.linalg.cholesky_ex(g + eps * torch.eye(n_in, dtype=g.dtype, device=g.device))
        if int(info) == 0:
            return s_chol
        eps = max(eps * 100, 1e-10 * float(torch.trace(g) / n_in) or 1e-12)
    raise ValueError("the input Gram matrix is not positive definite even with a ridge (NaN or all-zero inputs?)")


def _reduced_rank_from_root(
    target_cross: torch.Tensor, s_chol: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # M S = Rᵀ X G⁻¹ S = Rᵀ X S⁻ᵀ: solve S Y = Xᵀ R, then M S = Yᵀ
    m_s = torch.linalg.solve_triangular(s_chol, target_cross.double().T, upper=False).T  # out×in
    u, sigma, v_h = torch.linalg.svd(m_s, full_matrices=False)
    root = sigma[:rank].sqrt()
    # lora_a = Σ^{1/2} V_ρᵀ S⁻¹ = (S⁻ᵀ V_ρ Σ^{1/2})ᵀ
    a = torch.linalg.solve_triangular(s_chol.T, v_h[:rank].T * root, upper=True).T  # ρ×in
    b = u[:, :rank] * (root / scaling)  # out×ρ
    return a, b, sigma


class _Stream:
    """One model walked block by block: the per-batch arguments each block receives and the
    hidden states entering the current block (on the work device)."""

    def __init__(self, model: nn.Module, batches: list[dict], work: torch.device) -> None:
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        self.home = _home(model)
        self.calls = capture_block_inputs(model, self.blocks, batches)
        self.hidden = [to_device(c[0][0], work) for c in self.calls]
        self.work = work

    def run(self, i: int, b: int) -> torch.Tensor:
        _, args, kwargs = self.calls[b][i]
        out = self.blocks[i](self.hidden[b], *to_device(args, self.work), **to_device(kwargs, self.work))
        return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    pass


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = x[mask] if mask is not None and mask.shape == x.shape[:-1] else x
    return rows.reshape(-1, x.shape[-1])


def _input_groups(stream: _Stream, i: int, linears: Mapping[str, nn.Module]) -> list[list[str]]:
    """The linears of block ``i`` in execution order, grouped by the input tensor they share
    (q/k/v, o, gate/up, down for a Llama), from one forward of the first batch."""
    groups: dict[tuple, list[str]] = {}
    alive: list[torch.Tensor] = []  # keeps the inputs alive so data_ptr identity is sound

    def hook(path: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            alive.append(x)
            members = groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), [])
            if path not in members:
                members.append(path)

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in linears.items()]
    try:
        stream.run(i, 0)
    finally:
        for h in handles:
            h.remove()
    seen = [p for g in groups.values() for p in g]
    missing = [p for p in linears if p not in seen]
    if missing or len(seen) != len(set(seen)):
        raise RuntimeError(f"block {i}: the linears {missing or seen} do not each read one input per forward")
    return list(groups.values())


def _capture(stream: _Stream, i: int, b: int, linears: list[nn.Module], mask: torch.Tensor | None) -> torch.Tensor:
    """The rows entering the first of ``linears`` (which share one input) that runs in block
    ``i`` on batch ``b``; the forward stops there, so only the part of the block before it runs."""
    rows: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        rows.append(_masked_rows(args[0], mask))
        raise _Stop

    handles = [m.register_forward_pre_hook(grab) for m in linears]
    try:
        stream.run(i, b)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not rows:
        raise RuntimeError(f"block {i}: none of its linears {linears} ran on batch {b}")
    return rows[0]


@torch.no_grad()
def transfer_adapter(
    adapter_dir: PeftModel | PathLike,
    emulator: nn.Module | PathLike,
    original: nn.Module | PathLike,
    calibration: Any,
    out_dir: PathLike,
    *,
    lam: Lam = 1.0,
    ridge: float = 1e-6,
    tokenizer: Any = None,
    max_length: int = 512,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Layer-streamed transfer of a LoRA trained on ``emulator`` to ``original``; written to ``out_dir``.

    Walks the blocks in order with the emulator + trained LoRA (stream T) and the original +
    new LoRA (stream S) side by side on ``calibration`` (texts with ``tokenizer``, token
    tensors or dicts, as for ``build_emulator``), and fits each adapted linear's new rank-ρ
    LoRA in closed form (module docstring).  Within a block the linears are solved in
    execution order, one input group at a time (q/k/v, then o, gate/up, then down for a
    Llama): each group's ``X_S`` is recaptured with the new LoRAs of the earlier groups
    already applied, so o_proj fits the attention output the new q/k/v produce.

    ``lam``: a number or ``{regex: λ}`` (first match wins; unmatched modules λ = 0): 0 keeps
    the LoRA's own effect, 1 reproduces emulator + LoRA.  ``ridge``: relative ridge on
    ``G_S``.  ``device``: where each block runs (default: where the original is); only one
    block of each model is moved there at a time.  The models are used as given (a
    ``PeftModel`` has its adapters switched off while it runs here) and restored.

    ``out_dir`` receives a PEFT adapter for ``original`` with the input's rank and config
    (``PeftModel.from_pretrained(original, out_dir)``) and ``transfer_report.json``, whose
    content is returned.  LoRA pairs outside the blocks (e.g. ``lm_head``) and tensors that
    are not LoRA pairs are copied unchanged.
    """
    ridge = _check_number(ridge, "ridge", nonneg=True)
    inputs = [adapter_dir, emulator, original]
    out_dir = check_output(out_dir, inputs, overwrite=overwrite, option="out_dir")
    config, state = _load_adapter(adapter_dir)
    paths = _lora_paths(state)
    lams = _lam_per_module(lam, paths)
    emu_model = _as_model(emulator, "emulator")
    orig_model = _as_model(original, "original")
    if emu_model is orig_model:
        raise ValueError("emulator and original are the same object; pass two models (a copy of the original is fine)")
    emu_arch = (getattr(emu_model, "emloc_metadata", None) or {}).get("architecture")
    orig_arch = type(_base(orig_model)).__name__
    if emu_arch and emu_arch != orig_arch:
        raise ValueError(f"the emulator was built from a {emu_arch}, but the original is a {orig_arch}")
    batches = as_batches(calibration, tokenizer, max_length, model=_base(orig_model))
    masks = [token_mask(b) for b in batches]

    with _adapters_off(emu_model), _adapters_off(orig_model):
        # paths are relative to the model a PeftModel wraps; its layers have their adapters off
        emu_model, orig_model = _base(emu_model), _base(orig_model)
        blocks_name, blocks = find_blocks(orig_model)
        if len(find_blocks(emu_model)[1]) != len(blocks):
            raise ValueError("the emulator and the original have different numbers of blocks")
        work = torch.device(device) if device is not None else _home(orig_model)
        inside = [p for p in paths if p.startswith(blocks_name + ".")]
        trained: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for path in inside:
            lora_a, lora_b = state[PEFT_KEY_PREFIX + path + LORA_A_KEY], state[PEFT_KEY_PREFIX + path + LORA_B_KEY]
            r, s = lora_scaling(config, path)
            if lora_a.shape[0] != r:
                raise ValueError(
                    f"{path}: the adapter config gives rank {r}, but its lora_A has rank {lora_a.shape[0]}"
                )
            _check_fits_original(path, lora_a, lora_b, orig_model, emu_model)
            trained[path] = (lora_a, lora_b, s)
        modes = (emu_model.training, orig_model.training)
        emu_model.eval()
        orig_model.eval()
        try:
            new, modules, conv1d_seen = _stream_blocks(
                emu_model, orig_model, batches, masks, work, blocks_name, inside, trained, lams, ridge, progress
            )
        finally:
            emu_model.train(modes[0])
            orig_model.train(modes[1])

    out_state = dict(state)
    for path, (lora_a, lora_b) in new.items():
        key_a, key_b = PEFT_KEY_PREFIX + path + LORA_A_KEY, PEFT_KEY_PREFIX + path + LORA_B_KEY
        out_state[key_a] = lora_a.to(state[key_a].dtype).cpu()
        out_state[key_b] = lora_b.to(state[key_b].dtype).cpu()
    name = str(
        getattr(orig_model, "name_or_path", "")
        or (getattr(emu_model, "emloc_metadata", None) or {}).get("original_model", "")
    )
    out_config = _out_config(config, name, conv1d_seen)
    tokens = sum(int(m.sum()) if m is not None else b["input_ids"].numel() for m, b in zip(masks, batches))
    target = sum(m["target_norm"] ** 2 for m in modules.values())
    residual = sum(m["residual_norm"] ** 2 for m in modules.values())
    report = {
        "original": name,
        "method": "layer_streamed",
        "lam": dict(lam) if isinstance(lam, Mapping) else lam,
        "ridge": ridge,
        "calibration": {"samples": sum(b["input_ids"].shape[0] for b in batches), "tokens": tokens},
        "modules": modules,
        "unchanged": [p for p in paths if p not in new],
        "totals": {"modules": len(modules), "relative_residual": residual / target if target > 0 else None},
    }
    _write_adapter(out_dir, out_state, out_config, report, TRANSFER_REPORT, overwrite, inputs)
    return report


def _stream_blocks(
    emu_model: nn.Module,
    orig_model: nn.Module,
    batches: list[dict],
    masks: list[torch.Tensor | None],
    work: torch.device,
    blocks_name: str,
    inside: list[str],
    trained: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    lams: Mapping[str, float],
    ridge: float,
    progress: bool,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, Any]], bool]:
    """The block walk of :func:`transfer_adapter`: ``({path: (lora_a, lora_b)}, per-module stats, Conv1D seen)``.

    Per block and input group, both streams run batch by batch up to the group's linears
    (stopping there) and only the fp64 Grams ``X_Sᵀ X_S``, ``X_Tᵀ X_S``, ``X_Tᵀ X_T`` are kept, so
    memory does not grow with the calibration set beyond its hidden states.
    """
    emu, orig = _Stream(emu_model, batches, work), _Stream(orig_model, batches, work)
    compute = _compute_device(work)
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, dict[str, Any]] = {}
    conv1d_seen = False
    for i in tqdm(range(len(orig.blocks)), desc="LoRA transfer", unit="block", disable=not progress):
        prefix = f"{blocks_name}.{i}."
        mine = [p for p in inside if p.startswith(prefix)]
        emu_lin = {p: _linear_at(emu_model, p, "emulator") for p in mine}
        orig_lin = {p: _linear_at(orig_model, p, "original") for p in mine}
        emu.blocks[i].to(work)
        orig.blocks[i].to(work)
        handles = [emu_lin[p].register_forward_hook(_lora_hook(*trained[p])) for p in mine]  # stream T: emulator + LoRA
        try:
            for group in _input_groups(emu, i, emu_lin) if mine else []:
                g_ss = g_ts = g_tt = None
                for b in range(len(batches)):
                    mask = None if masks[b] is None else cast(torch.Tensor, masks[b]).to(work)
                    x_t = _capture(emu, i, b, [emu_lin[p] for p in group], mask).to(compute, torch.float64)
                    x_s = _capture(orig, i, b, [orig_lin[p] for p in group], mask).to(compute, torch.float64)
                    if x_t.shape != x_s.shape:
                        raise RuntimeError(f"{group[0]}: the emulator and the original saw different token counts")
                    if g_ss is None or g_ts is None or g_tt is None:
                        g_ss, g_ts, g_tt = x_s.T @ x_s, x_t.T @ x_s, x_t.T @ x_t
                    else:
                        g_ss.addmm_(x_s.T, x_s), g_ts.addmm_(x_t.T, x_s), g_tt.addmm_(x_t.T, x_t)
                assert g_ss is not None and g_ts is not None and g_tt is not None  # batches is never empty
                if not (torch.isfinite(g_ss).all() and torch.isfinite(g_tt).all()):
                    raise ValueError(f"calibration activations entering {group[0]} contain NaN or inf")
                s_chol = _ridged_cholesky(g_ss, ridge)  # one per group: its linears share X_S
                for p in group:
                    module = orig_lin[p]
                    conv1d_seen |= isinstance(module, Conv1D)
                    w = out_in_weight(module).detach().to(compute, torch.float64)
                    w_e = _linear_weight(emu_lin[p], p).to(compute)
                    if w.shape != w_e.shape:
                        raise ValueError(f"{p}: the emulator is {tuple(w_e.shape)}, the original {tuple(w.shape)}")
                    a, b_, s = trained[p]
                    lam = lams[p]
                    a64, b64 = a.to(compute, torch.float64), b_.to(compute, torch.float64)
                    k = s * (b64 @ a64) + lam * w_e  # R_λ = X_T Kᵀ − λ X_S Wᵀ,  K = P + λW_E,  P = s·BA
                    k_ts, w_ss = k @ g_ts, w @ g_ss
                    cross = k_ts - lam * w_ss  # R_λᵀ X_S
                    new_a, new_b, sigma = _reduced_rank_from_root(cross, s_chol, a.shape[0], s)
                    # ‖R_λ‖² = tr(K G_TT Kᵀ) − 2λ tr(K G_TS Wᵀ) + λ² tr(W G_SS Wᵀ)
                    target = (
                        (torch.sum((k @ g_tt) * k) - 2 * lam * torch.sum(k_ts * w) + lam**2 * torch.sum(w_ss * w))
                        .clamp_min(0)
                        .item()
                    )
                    residual = max(target - float((sigma[: a.shape[0]] ** 2).sum()), 0.0)
                    own = (s * s * torch.sum(((a64 @ g_tt @ a64.T) @ b64.T) * b64.T)).clamp_min(0).item()  # ‖X_T Pᵀ‖²
                    new[p] = (new_a, new_b)
                    # applied at once: the next groups of this block, and the next blocks, see it
                    handles.append(module.register_forward_hook(_lora_hook(new_a.float(), new_b.float(), s)))
                    modules[p] = {
                        "rank": a.shape[0],
                        "scaling": s,
                        "lam": lam,
                        "target_norm": math.sqrt(target),
                        "lora_output_norm": math.sqrt(own),
                        "residual_norm": math.sqrt(residual),
                        "relative_residual": residual / target if target > 0 else None,
                    }
            # advance both streams, every new LoRA of this block in place
            for b in range(len(batches)):
                emu.hidden[b], orig.hidden[b] = emu.run(i, b), orig.run(i, b)
        finally:
            for h in handles:
                h.remove()
            emu.blocks[i].to(emu.home)
            orig.blocks[i].to(orig.home)
    return new, modules, conv1d_seen
