"""Tolerances and tensor helpers shared by the kernel tests."""

from __future__ import annotations

import os

import pytest
import torch

from emloc_kernels.ops.gemm import use_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tol(dtype: torch.dtype, device: str) -> float:
    """Relative Frobenius tolerance vs an fp64 reference (GPU fp32 may use tf32)."""
    if dtype == torch.float32:
        return 1e-5 if device == "cpu" else 1e-3
    return {torch.bfloat16: 1e-2, torch.float16: 5e-3}[dtype]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite values (unwritten output?)"
    want = want.double().to(got.device)
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: reversed dimension order, every other
    element of a 1-D tensor."""
    if t.ndim == 1:
        out = t.detach().new_empty(t.shape[0], 2)[:, 0]
        out.copy_(t)
    else:
        perm = list(reversed(range(t.ndim)))
        out = t.detach().permute(perm).contiguous().permute(perm)
    assert not out.is_contiguous() or min(t.shape) == 1
    return out.requires_grad_(t.requires_grad)


def kernels_ran(device: str) -> bool:
    return use_triton(torch.empty(0, device=device))
