"""Stage 3 of EMLoC: turn a LoRA trained on the emulator into a LoRA for the original model.

For each adapted module (PEFT shapes: ``lora_A`` ρ×in, ``lora_B`` out×ρ; ``A = lora_Aᵀ``,
``B = lora_Bᵀ``, scaling ``s``), with original weight ``W`` and emulated weight ``W_E`` (out×in):

    A = U_a Σ_a V_aᵀ (thin SVD),  A_o = U_a,  B_o = Σ_a V_aᵀ B,  C = A_oᵀ (W − W_E)ᵀ / s,
    rows of C clamped relative to B_o,  B_c = B_o − C.

Without clamping, ``x Wᵀ + s·x A_o B_c = x W_Eᵀ + s·x A B`` for every row vector ``x`` in
span(A): on the inputs the LoRA reacts to, the original behaves as the tuned emulator did.

Inputs are models or directories; directories are read one module at a time with
``safetensors.safe_open`` (peak memory ≈ one module of each model plus the adapter).  The
math runs in fp64 on the original weight's device: beyond the fp32 the method needs, this
makes the result independent of TF32/reduced-precision matmul flags a trainer may have set,
without touching those global flags.  The result is written to a new directory through a
temporary sibling so that a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union, cast

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .conventions import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EMULATOR_METADATA,
    LINEAR_TYPES,
    LORA_A_KEY,
    LORA_B_KEY,
    PEFT_KEY_PREFIX,
    check_probe,
    load_model,
)
from .files import check_output, copy_tokenizer, write_dir_atomically
from .modules import LowRankLinear

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = ["correct_adapter", "merge_adapter", "correct_lora", "lora_scaling", "check_plain_lora", "emulated_weight"]

REPORT = "correction_report.json"

PathLike = Union[str, "os.PathLike[str]"]


def _is_path(x: object) -> TypeIs[str | os.PathLike[str]]:
    return isinstance(x, (str, os.PathLike))


# --------------------------------------------------------------------------- per-module math


def correct_lora(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weight_delta: torch.Tensor,
    scaling: float,
    clamp: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Correct one LoRA pair for ``weight_delta = W − W_E`` (out×in); the math runs in fp64.

    ``lora_a`` is ρ×in and ``lora_b`` out×ρ (PEFT shapes).  Returns ``(lora_a_o, lora_b_c,
    stats)`` with ``lora_a_o = A_oᵀ``, ``lora_b_c = B_cᵀ`` in the dtypes of the inputs, on
    ``weight_delta``'s device.

    Clamp (``L = clamp``): row ``i`` of ``C`` is scaled by ``min(1, L·b_i/c_i)`` with
    ``b_i = mean|B_o[i]|``, ``c_i = mean|C[i]|``.  A row with ``b_i = 0`` (a direction the LoRA
    does not use) therefore gets no correction at all, and a row with ``c_i = 0`` is left as
    it is; no division by zero occurs.  ``clamp=None`` disables the clamp.
    """
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_a must be ρ×in and lora_b out×ρ; got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    rank, n_in = lora_a.shape
    if tuple(weight_delta.shape) != (lora_b.shape[0], n_in):
        raise ValueError(
            f"weight_delta must be out×in = {(lora_b.shape[0], n_in)} to match the LoRA; got {tuple(weight_delta.shape)}"
        )
    if rank > n_in:
        raise ValueError(f"LoRA rank {rank} exceeds in_features {n_in}; the thin SVD of A would change the rank")
    if not (math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"scaling must be finite and nonzero, got {scaling}")
    _check_clamp(clamp)

    device = weight_delta.device
    a = lora_a.to(device, torch.float64).T  # in×ρ
    b = lora_b.to(device, torch.float64).T  # ρ×out
    a_o, sigma, v_h = torch.linalg.svd(a, full_matrices=False)
    b_o = sigma[:, None] * (v_h @ b)
    c = (weight_delta.to(torch.float64) @ a_o).T / scaling  # A_oᵀ (W − W_E)ᵀ / s
    b_row, c_row = b_o.abs().mean(dim=1), c.abs().mean(dim=1)
    if clamp is None:
        clamped = torch.zeros_like(c_row, dtype=torch.bool)
        factor = torch.ones_like(c_row)
    else:
        clamped = c_row > clamp * b_row  # implies c_row > 0
        factor = torch.where(clamped, clamp * b_row / torch.where(clamped, c_row, 1.0), 1.0)
    applied = factor[:, None] * c
    b_c = b_o - applied

    used = b_row > 0
    stats = {
        "rows": rank,
        "rows_clamped": int(clamped.sum()),
        "median_row_ratio": (c_row[used] / b_row[used]).median().item() if used.any() else None,  # rows with b_i > 0
        "lora_norm": b_o.norm().item(),  # ‖B_o‖ = ‖A B‖
        "correction_norm": c.norm().item(),  # ‖C‖ before the clamp
        "applied_norm": applied.norm().item(),  # ‖C‖ after it
    }
    return a_o.T.to(lora_a.dtype).contiguous(), b_c.T.to(lora_b.dtype).contiguous(), stats


def _check_clamp(clamp: float | None) -> None:
    number = isinstance(clamp, (int, float)) and not isinstance(clamp, bool)
    if clamp is not None and not (number and math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"clamp must be a positive finite number or None (no clamping), got {clamp!r}")


def lora_scaling(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    """``(r, s)`` of module ``path`` as PEFT computes them: ``rank_pattern``/``alpha_pattern``
    override ``r``/``lora_alpha``, then ``s = alpha/r`` or ``alpha/√r`` with ``use_rslora``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), path), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def emulated_weight(state: Mapping[str, torch.Tensor], info: Mapping[str, Any], name: str) -> torch.Tensor:
    """``W_E`` (out×in, fp64) of emulator module ``name`` from its own tensors.

    ``state`` holds the module's tensors by local name (``u``, ``v``, ``bias``): a live module's
    ``state_dict()`` and a saved emulator's ``name.*`` keys look the same, so this is the one
    place that knows how an emulator module stores its weight; ``info`` is its ``emloc.json``
    entry (``quant`` says whether the factors are quantised).  Returns a new tensor, which the
    caller may overwrite.
    """
    if info.get("quant") is not None:  # W_E is the dequantised product, as the emulator computes it
        from .emulator.io import empty_module_for
        from .modules import QuantLowRankLinear
        from .ops.quant import dequantize

        module = cast(
            QuantLowRankLinear, empty_module_for(info, state[next(k for k in state if k.endswith("_scale"))].dtype)
        )
        module.load_state_dict(state, assign=True)
        return dequantize(module.u_packed).double() @ dequantize(module.v_packed).double()
    if "u" not in state or "v" not in state:
        raise TypeError(
            f"emulator module {name} is not low-rank: it holds {sorted(state)}, expected the factors u and v of a LowRankLinear"
        )
    return LowRankLinear.from_factors(state["u"].double(), state["v"].double()).dense_weight()


# --------------------------------------------------------------------------- model sources


class _Checkpoint:
    """An HF safetensors directory (one file, or shards listed in ``model.safetensors.index.json``);
    only the key → file map is kept, tensors are read one at a time."""

    def __init__(self, directory: Path, role: str) -> None:
        if not directory.is_dir():
            raise FileNotFoundError(f"{role} directory {directory} does not exist")
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if (directory / EMULATOR_METADATA).is_file():  # an emulator: its recorded files, checksums verified
            from .emulator.io import _weight_files, read_metadata

            self.files = {}
            for file in _weight_files(directory, read_metadata(directory), verify=True):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: directory / name for key, name in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"{role} directory {directory} holds no *.safetensors weights")
        config = directory / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}

    def find(self, key: str) -> str | None:
        """``key`` itself, or the one stored key that differs from it by a leading model prefix
        (a base-model checkpoint stores ``h.0...`` where the LM model has ``transformer.h.0...``)."""
        if key in self.files:
            return key
        hits = [k for k in self.files if k.endswith("." + key) or key.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, seen through a PEFT wrapper layer if there is one."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return cast(Any, module).get_base_layer() if hasattr(module, "get_base_layer") else module


def _architecture(model: nn.Module) -> str:
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


class _Emulator:
    """``W_E`` of each module, from an emulator model or a ``save_emulator`` directory."""

    def __init__(self, emulator: nn.Module | PathLike) -> None:
        if _is_path(emulator):
            from .emulator.io import read_metadata

            self.checkpoint = _Checkpoint(Path(emulator), "emulator")
            try:  # emloc.json, or the quantization config of a directory save_pretrained wrote
                self.metadata = read_metadata(self.checkpoint.directory)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"emulator directory {emulator} has no {EMULATOR_METADATA} (nor an emloc quantization_config); "
                    "is it an EMLoC emulator?"
                ) from None
        elif isinstance(emulator, nn.Module):
            self.model = _unwrap(emulator)
            self.metadata = getattr(self.model, "emloc_metadata", None) or {}
        else:
            raise TypeError(f"emulator must be a model or a directory, got {type(emulator).__name__}")
        self.source = str(emulator) if _is_path(emulator) else type(emulator).__name__
        self.architecture = self.metadata.get("architecture")

    def info(self, path: str) -> Mapping[str, Any]:
        return (self.metadata.get("modules") or {}).get(path, {})

    def kept_dense(self, path: str) -> bool:
        """The emulator left this linear as it was (outside the blocks, or no ratio pattern)."""
        if hasattr(self, "checkpoint"):  # a compressed linear also stores an empty weight (emulator.hf)
            return not self.info(path) and self.checkpoint.find(path + ".weight") is not None
        return isinstance(_submodule(self.model, path), LINEAR_TYPES) and not isinstance(
            _submodule(self.model, path), LowRankLinear
        )

    def weight(self, path: str) -> torch.Tensor:
        if hasattr(self, "checkpoint"):
            prefix = path + "."
            keys = [k for k in self.checkpoint.files if k.startswith(prefix) and "." not in k[len(prefix) :]]
            state = {k[len(prefix) :]: self.checkpoint.get(k) for k in keys}
            if self.info(path):  # the empty weight a compressed linear is saved with (emulator.hf)
                state.pop("weight", None)
        else:
            module = _submodule(self.model, path)
            state = {} if module is None else module.state_dict()
        if not state:
            raise ValueError(f"the adapter targets {path}, which the emulator ({self.source}) does not have")
        return emulated_weight(state, self.info(path), path)


class _Original:
    """The original weight of each module (out×in), from a model or an HF directory."""

    def __init__(self, original: nn.Module | PathLike) -> None:
        if _is_path(original):
            self.checkpoint = _Checkpoint(Path(original), "original")
            self.name = str(original)
            self.architecture = (self.checkpoint.config.get("architectures") or [None])[0]
        elif isinstance(original, nn.Module):
            self.model = _unwrap(original)
            self.name = getattr(self.model, "name_or_path", "") or ""
            self.architecture = _architecture(self.model)
        else:
            raise TypeError(f"original must be a model or a directory, got {type(original).__name__}")
        self.source = self.name or type(original).__name__

    def weight(self, path: str, info: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
        """``(W, is_conv1d)``; a Conv1D stores ``W`` transposed (in×out).  From a directory the
        module type is unknown, so the emulator's ``transposed`` flag says which it is."""
        if hasattr(self, "checkpoint"):
            key = self.checkpoint.find(path + ".weight")
            if key is None:
                raise ValueError(
                    f"the adapter targets {path}, but the original ({self.source}) has no tensor {path}.weight"
                )
            if "transposed" not in info:
                raise ValueError(
                    f"cannot tell whether the original stores {path} as a Conv1D: the emulator's metadata has no "
                    f"modules[{path!r}].transposed; pass the original as a model instead of a directory"
                )
            conv1d = bool(info["transposed"])
            stored = self.checkpoint.get(key)
        else:
            module = _submodule(self.model, path)
            if module is None:
                raise ValueError(f"the adapter targets {path}, which the original ({self.source}) does not have")
            if isinstance(module, LowRankLinear):
                raise TypeError(f"original module {path} is a LowRankLinear: pass the original model, not the emulator")
            if not isinstance(module, LINEAR_TYPES):
                raise TypeError(f"original module {path} is {type(module).__name__}; expected nn.Linear or Conv1D")
            conv1d = isinstance(module, Conv1D)
            stored = module.weight.detach()
        return (stored.T if conv1d else stored), conv1d


# --------------------------------------------------------------------------- adapter I/O


def _load_adapter(adapter: PeftModel | PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config as a JSON dict, state dict with ``base_model.model.<path>.lora_A.weight`` keys)."""
    if isinstance(adapter, PeftModel):
        name = adapter.active_adapter
        config = adapter.peft_config[name].to_dict()
        # what PEFT's save_pretrained writes: sets as lists, enums as their values
        config = json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}))
        state = {k: v.detach() for k, v in get_peft_model_state_dict(adapter, adapter_name=name).items()}
    elif _is_path(adapter):
        directory = Path(adapter)
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (directory / file).is_file():
                raise FileNotFoundError(f"adapter directory {directory} has no {file}")
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    else:
        raise TypeError(f"adapter must be a PeftModel or a PEFT LoRA directory, got {type(adapter).__name__}")
    check_plain_lora(config, "corrected")
    return config, state


def check_plain_lora(config: Mapping[str, Any], use: str) -> None:
    """A ValueError unless the adapter config is a plain LoRA's (no DoRA, no lora_bias): what
    can be ``use`` (corrected, merged) from its A and B alone."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter must be a LoRA adapter, got peft_type={config.get('peft_type')!r}")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"adapter uses {flag}=True; only plain LoRA adapters can be {use}")


def _lora_paths(state: Mapping[str, torch.Tensor]) -> list[str]:
    paths = sorted(
        k[len(PEFT_KEY_PREFIX) : -len(LORA_A_KEY)]
        for k in state
        if k.startswith(PEFT_KEY_PREFIX) and k.endswith(LORA_A_KEY)
    )
    if not paths:
        raise ValueError("the adapter holds no lora_A/lora_B weights")
    for path in paths:
        if PEFT_KEY_PREFIX + path + LORA_B_KEY not in state:
            raise ValueError(f"the adapter has lora_A but no lora_B for {path}")
    return paths


def weights_for(
    emu: "_Emulator", orig: "_Original", path: str, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(W, W_E, conv1d)`` of module ``path``, refused unless both match the LoRA's out×in."""
    info = emu.info(path)
    w_e = emu.weight(path)
    w, conv1d = orig.weight(path, info)
    expected = (lora_b.shape[0], lora_a.shape[1])
    if tuple(w.shape) != expected or tuple(w_e.shape) != expected:
        raise ValueError(
            f"{path}: the adapter is out×in = {expected}, the emulator {tuple(w_e.shape)}, the original "
            f"{tuple(w.shape)}; the adapter, emulator and original must belong to the same model"
        )
    for name, t in (("original", w), ("emulator", w_e), ("adapter's lora_A", lora_a), ("adapter's lora_B", lora_b)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: the {name} weight holds NaN or inf; check that checkpoint (or the training run)")
    check_probe(w, info, f"{path} (original {orig.source})", emu.metadata.get("original_model"))
    return w, w_e, conv1d


# --------------------------------------------------------------------------- public entry points


def correct_adapter(
    adapter: PeftModel | PathLike,
    emulator: nn.Module | PathLike,
    original: nn.Module | PathLike,
    out_dir: PathLike,
    *,
    clamp: float | None = 3.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Correct a LoRA trained on ``emulator`` so that it works on ``original``; write it to ``out_dir``.

    ``adapter``: a PEFT LoRA directory or a ``PeftModel`` (its active adapter).  ``emulator``:
    the emulator model (a ``PeftModel`` around it is fine) or a ``save_emulator`` directory.
    ``original``: a model or an HF directory.  ``out_dir`` must not exist unless
    ``overwrite=True`` (then it is replaced as a whole); the inputs are never modified.

    ``out_dir`` receives ``adapter_model.safetensors`` and ``adapter_config.json`` (loadable with
    ``PeftModel.from_pretrained(original, out_dir)``) and ``correction_report.json``, whose
    content is also returned.  Adapter tensors that are not LoRA pairs (e.g. ``modules_to_save``)
    are copied unchanged.
    """
    _check_clamp(clamp)
    inputs = [adapter, emulator, original]
    out_dir = check_output(out_dir, inputs, overwrite=overwrite, option="out_dir")
    config, state = _load_adapter(adapter)
    emu, orig = _Emulator(emulator), _Original(original)
    if emu.architecture and orig.architecture and emu.architecture != orig.architecture:
        raise ValueError(f"the emulator was built from a {emu.architecture}, but the original is a {orig.architecture}")

    paths = _lora_paths(state)
    out_state = dict(state)
    modules: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    conv1d_seen = False
    for path in tqdm(paths, desc="LoRA correction", unit="module", disable=not progress):
        key_a, key_b = PEFT_KEY_PREFIX + path + LORA_A_KEY, PEFT_KEY_PREFIX + path + LORA_B_KEY
        lora_a, lora_b = state[key_a], state[key_b]
        r, s = lora_scaling(config, path)
        if lora_a.shape[0] != r:
            raise ValueError(f"{path}: the adapter config gives rank {r}, but its lora_A has rank {lora_a.shape[0]}")
        if emu.kept_dense(path):  # W_E = W: the LoRA already fits the original as it is
            unchanged.append(path)
            continue
        w, w_e, conv1d = weights_for(emu, orig, path, lora_a, lora_b)
        device = torch.device("cpu") if w.device.type == "mps" else w.device  # MPS has no fp64
        delta = w_e.to(device).neg_().add_(w.to(device))  # W − W_E, reusing W_E's fp64 buffer
        del w, w_e
        a_o, b_c, stats = correct_lora(lora_a, lora_b, delta, s, clamp)
        del delta
        out_state[key_a], out_state[key_b] = a_o.cpu(), b_c.cpu()
        modules[path] = {"rank": r, "scaling": s, **stats, **_ratios(stats)}
        conv1d_seen |= conv1d

    out_config = dict(config, base_model_name_or_path=orig.name or emu.metadata.get("original_model", ""))
    if conv1d_seen:
        out_config["fan_in_fan_out"] = True
    totals: dict[str, Any] = {"modules": len(modules)}
    for key in ("rows", "rows_clamped"):
        totals[key] = sum(m[key] for m in modules.values())
    for key in ("lora_norm", "correction_norm", "applied_norm"):
        totals[key] = math.sqrt(sum(m[key] ** 2 for m in modules.values()))
    totals.update(_ratios(totals))
    report = {
        "original": out_config["base_model_name_or_path"],
        "clamp": clamp,
        "modules": modules,
        "totals": totals,
        "unchanged": unchanged,
    }

    def write(directory: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in out_state.items()},
            str(directory / ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        (directory / ADAPTER_CONFIG).write_text(json.dumps(out_config, indent=2, sort_keys=True))
        (directory / REPORT).write_text(json.dumps(report, indent=2))
        copy_tokenizer(out_config["base_model_name_or_path"], directory)

    write_dir_atomically(out_dir, write, overwrite=overwrite, inputs=inputs, kind="adapter")
    return report


def _ratios(stats: Mapping[str, Any]) -> dict[str, float | None]:
    """‖C‖/‖B_o‖ before and after the clamp (None where the LoRA is zero)."""
    lora = stats["lora_norm"]
    return {
        "correction_ratio": stats["correction_norm"] / lora if lora > 0 else None,
        "applied_ratio": stats["applied_norm"] / lora if lora > 0 else None,
    }


def merge_adapter(original: nn.Module | PathLike, adapter_dir: PathLike) -> nn.Module:
    """``original`` (a model, merged in place, or an HF directory) with the LoRA in ``adapter_dir``
    merged into its weights (PEFT ``merge_and_unload``)."""
    model = load_model(original) if _is_path(original) else original
    _check_adapter_fits(Path(adapter_dir), model)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def _check_adapter_fits(directory: Path, model: nn.Module) -> None:
    """Refuse an adapter whose LoRA pairs do not fit ``model``'s linears (out×in), from the
    shapes in its safetensors header: one trained for another model would otherwise fail deep
    inside PEFT's state-dict loading."""
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"adapter directory {directory} has no {file}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        broken = [k for k in handle.keys() if not torch.isfinite(handle.get_tensor(k)).all()]
    if broken:
        raise ValueError(f"adapter {directory}: {broken[:3]} hold NaN or inf; it cannot be merged")
    base = _unwrap(model)
    for key, shape_a in shapes.items():
        if not (key.startswith(PEFT_KEY_PREFIX) and key.endswith(LORA_A_KEY)):
            continue
        path = key[len(PEFT_KEY_PREFIX) : -len(LORA_A_KEY)]
        shape_b = shapes.get(PEFT_KEY_PREFIX + path + LORA_B_KEY)
        module = _submodule(base, path)
        if module is None:
            raise ValueError(
                f"adapter {directory} targets {path}, which the original ({type(base).__name__}) does not have; "
                "was the adapter trained for another model?"
            )
        if shape_b is None:
            raise ValueError(f"adapter {directory} has a lora_A for {path} but no lora_B")
        rank = lora_scaling(config, path)[0]
        if shape_a[0] != rank:
            raise ValueError(
                f"adapter {directory}: its config gives {path} rank {rank}, but its lora_A has rank {shape_a[0]}"
            )
        if not isinstance(module, LINEAR_TYPES) or len(shape_a) != 2 or len(shape_b) != 2:
            continue  # PEFT reports what it cannot load
        stored = tuple(module.weight.shape)  # out×in, in×out for a Conv1D
        expected = stored[::-1] if isinstance(module, Conv1D) else stored
        if (shape_b[0], shape_a[1]) != expected:
            raise ValueError(
                f"adapter {directory} does not fit the original: its LoRA for {path} is out×in = "
                f"{(shape_b[0], shape_a[1])}, the original's linear is {expected}; was the adapter trained for "
                "another model?"
            )
