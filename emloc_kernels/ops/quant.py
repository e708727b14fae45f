"""Quantised emulator factors: the packed layout shared by the CUDA extension, the
Triton kernels and the modules.

A factor ``M`` (N×K) is always used as ``a · Mᵀ`` or ``b · M`` and is quantised along its
last dimension K (the reduction dimension of ``a · Mᵀ``):

* ``int8``: ``qweight`` int8 N×K, ``scale`` N×1 (symmetric, one scale per row):
  ``M[n, k] ≈ qweight[n, k] · scale[n, 0]``.
* ``int4``: groups of ``group_size`` (64 or 128) along K, K zero-padded to a multiple of the
  group size (``Kp``); ``qweight`` uint8 N×(Kp/2), byte ``j`` holds element ``2j`` in its low
  nibble and ``2j+1`` in its high nibble (unsigned 0..15); ``scale`` and ``offset`` N×(Kp/g)
  (asymmetric min/max): ``M[n, k] ≈ nibble[n, k] · scale[n, k//g] + offset[n, k//g]``.

``scale``/``offset`` have the factor's floating dtype (fp16/bf16/fp32).

Quantisation (all implementations agree bit for bit; arithmetic in fp32):

* int8: ``scale = amax|row| / 127``; int4: ``offset = min(group)``,
  ``scale = (max − min) / 15``. The zero padding of the last int4 group takes part in its
  min/max (so padded elements dequantise to about 0).
* The scale is rounded *up* to the storage dtype, so every element lies on the grid's
  range and round-to-nearest-even keeps ``|M − dequant(M)| ≤ scale / 2`` (fp32 arithmetic).
* All-zero rows (int8) and constant groups (int4) get ``scale = 0`` and dequantise exactly.
* Dequantisation is ``q · scale`` (int8) or ``nibble · scale + offset`` (int4), a separate
  fp32 multiply and add (no fused multiply-add), then a round-to-nearest cast to the dtype.
* :func:`quantize` refuses non-finite input and factors whose top grid value would overflow
  the dtype (values within a fraction of a percent of its largest number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from .. import ext

FORMATS = ("int8", "int4")
GROUP_SIZES = (64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# largest grid value per format: q·scale (+ offset) must stay finite in the storage dtype
_GRID_TOP = {"int8": 127, "int4": 15}
_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for integers (host side; ``triton.cdiv`` costs microseconds a call)."""
    return -(-a // b)


def packed_shapes(n: int, k: int, fmt: str, group_size: int = 128) -> dict[str, tuple[int, int]]:
    """Shapes of ``qweight``, ``scale`` (and ``offset`` for int4) for an N×K factor."""
    if fmt == "int8":
        return {"qweight": (n, k), "scale": (n, 1)}
    kp = cdiv(k, group_size) * group_size
    return {"qweight": (n, kp // 2), "scale": (n, kp // group_size), "offset": (n, kp // group_size)}


def qweight_dtype(fmt: str) -> torch.dtype:
    return torch.int8 if fmt == "int8" else torch.uint8


@dataclass(frozen=True)
class PackedFactor:
    """A quantised N×K factor in the layout above (checked on construction; immutable, so it
    stays valid: make a new one with ``dataclasses.replace``)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    fmt: str
    shape: tuple[int, int]
    group_size: int = 0  # int4 only

    def __post_init__(self) -> None:
        check_format(self.fmt, self.group_size)
        if self.scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"PackedFactor: scale dtype must be one of {FLOAT_DTYPES}, got {self.scale.dtype}")
        if (self.offset is None) != (self.fmt == "int8"):
            raise ValueError(
                f"PackedFactor: offset must be {'None' if self.fmt == 'int8' else 'a tensor'} for {self.fmt}"
            )
        n, k = self.shape
        tensors = {"qweight": self.qweight, "scale": self.scale, "offset": self.offset}
        dtypes = {"qweight": qweight_dtype(self.fmt), "scale": self.scale.dtype, "offset": self.scale.dtype}
        for name, shape in packed_shapes(n, k, self.fmt, self.group_size).items():
            t = tensors[name]
            assert t is not None  # offset is listed for int4 only, where it was required above
            if tuple(t.shape) != shape or t.dtype != dtypes[name] or t.device != self.qweight.device:
                raise ValueError(
                    f"PackedFactor: {name} of a {self.fmt} {n}×{k} factor (group_size {self.group_size}) must be "
                    f"{dtypes[name]} {shape} on {self.qweight.device}; got {t.dtype} {tuple(t.shape)} on {t.device}"
                )

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device


# kernel constexpr for a packed right operand (0: a float tensor)
QUANT_MODES = {"int8": 1, "int4": 2}


class PackedOperand(NamedTuple):
    """A packed factor ``F`` (N_f×K_f) used as the K×N right operand ``Fᵀ`` (``trans``) or ``F``."""

    factor: PackedFactor
    trans: bool

    @property
    def shape(self) -> tuple[int, int]:
        n_f, k_f = self.factor.shape
        return (k_f, n_f) if self.trans else (n_f, k_f)


Right = Union[torch.Tensor, PackedOperand]


def check_format(fmt: str, group_size: int) -> None:
    """Raise a clear error for an unknown format or an unsupported int4 group size."""
    if fmt not in FORMATS:
        raise ValueError(f"quantisation format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def quantize(w: torch.Tensor, fmt: str, group_size: int = 128) -> PackedFactor:
    """Quantise an N×K factor (fp16/bf16/fp32) to ``fmt``; ``group_size`` is used by int4 only.

    The one dispatch point: the extension's op (CUDA kernel or C++ CPU code) when it is
    loaded for ``w``'s device, else :func:`quantize_reference`.
    """
    check_format(fmt, group_size)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D tensor (N×K), got {getattr(w, 'shape', type(w))}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w dtype must be one of {FLOAT_DTYPES}, got {w.dtype}")
    w = w.detach()
    if not torch.isfinite(w).all():
        raise ValueError("w must be finite (it holds inf or nan)")
    group_size = group_size if fmt == "int4" else 0
    if ext.supports(w.device):
        lib = torch.ops.emloc_ext
        if fmt == "int8":
            q, scale = lib.quantize_int8(w.contiguous())
            offset = None
        else:
            q, scale, offset = lib.quantize_int4(w.contiguous(), group_size)
        p = PackedFactor(q, scale, offset, fmt, (w.shape[0], w.shape[1]), group_size)
    else:
        p = quantize_reference(w, fmt, group_size)
    top = p.scale.float() * _GRID_TOP[fmt] + (0 if p.offset is None else p.offset.float())
    if not torch.isfinite(top.to(p.dtype)).all():
        raise ValueError(
            f"{fmt} quantisation of this {w.dtype} tensor overflows: its values (int4: the max−min range of a group) "
            f"come too close to the largest {w.dtype} number; rescale it or quantise a float32 copy"
        )
    return p


def dequantize(p: PackedFactor) -> torch.Tensor:
    """Unpack to an N×K tensor of ``p.dtype``: the extension's op when loaded for the device,
    else :func:`dequantize_reference`."""
    if ext.supports(p.device):
        lib = torch.ops.emloc_ext
        if p.fmt == "int8":
            return lib.dequantize_int8(p.qweight, p.scale)
        return lib.dequantize_int4(p.qweight, p.scale, p.offset, p.group_size, p.shape[1])
    return dequantize_reference(p)


def _scale_rounded_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales ``s ≥ 0`` rounded up to ``dtype`` (next representable value when the
    nearest one is below), so the grid covers every element of its row/group."""
    d = s.to(dtype)
    up = (d.view(_SAME_SIZE_INT[dtype]) + 1).view(dtype)
    return torch.where(d.float() < s, up, d)


def _quotient(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``a / scale`` rounded to nearest even in fp32; 0 where the scale is 0."""
    s = scale.float()
    return torch.where(s > 0, a / s, 0.0).round()


def quantize_reference(w: torch.Tensor, fmt: str, group_size: int = 128) -> PackedFactor:
    """Quantise in plain torch (the readable reference for the extension's ops)."""
    n, k = w.shape
    x = w.detach().float()
    if fmt == "int8":
        scale = _scale_rounded_up(x.abs().amax(dim=1, keepdim=True) / 127, w.dtype)
        q = _quotient(x, scale).clamp(-127, 127).to(torch.int8)
        return PackedFactor(q, scale, None, fmt, (n, k))
    kp = packed_shapes(n, k, fmt, group_size)["qweight"][1] * 2
    groups = F.pad(x, (0, kp - k)).reshape(n, kp // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = _scale_rounded_up((high - low) / 15, w.dtype)
    nib = _quotient(groups - low[..., None], scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, kp)
    q = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return PackedFactor(q, scale, low.to(w.dtype), fmt, (n, k), group_size)


def dequantize_reference(p: PackedFactor) -> torch.Tensor:
    """Unpack to an N×K tensor of ``p.dtype`` (plain torch, the readable reference)."""
    n, k = p.shape
    if p.fmt == "int8":
        return (p.qweight.to(torch.float32) * p.scale.to(torch.float32)).to(p.dtype)
    assert p.offset is not None  # int4
    low, high = p.qweight & 0xF, p.qweight >> 4
    nib = torch.stack((low, high), dim=-1).reshape(n, -1).to(torch.float32)
    groups = nib.reshape(n, -1, p.group_size)
    m = groups * p.scale.float()[..., None] + p.offset.float()[..., None]
    return m.reshape(n, -1)[:, :k].to(p.dtype)
