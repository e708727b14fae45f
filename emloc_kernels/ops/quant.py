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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4")
GROUP_SIZES = (64, 128)


@dataclass
class PackedFactor:
    """A quantised N×K factor in the layout above."""

    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    fmt: str
    shape: tuple[int, int]
    group_size: int = 0  # int4 only

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def dequantize_reference(p: PackedFactor) -> torch.Tensor:
    """Unpack to an N×K tensor of ``p.dtype`` (plain torch, the readable reference)."""
    n, k = p.shape
    if p.fmt == "int8":
        return (p.qweight.to(torch.float32) * p.scale.to(torch.float32)).to(p.dtype)
    low, high = p.qweight & 0xF, p.qweight >> 4
    nib = torch.stack((low, high), dim=-1).reshape(n, -1).to(torch.float32)
    groups = nib.reshape(n, -1, p.group_size)
    m = groups * p.scale.float()[..., None] + p.offset.float()[..., None]
    return m.reshape(n, -1)[:, :k].to(p.dtype)
