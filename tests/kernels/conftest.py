"""Shared helpers for the kernel tests.

Run them in their own process: ``TRITON_INTERPRET=1 python3 -m pytest tests/kernels`` runs the
Triton kernels on CPU tensors (triton reads the variable when the kernels are decorated);
without it CPU tensors take the torch reference.  ``cuda`` tests run the kernels for real.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel never writes fails the comparison."""
    if not (INTERPRET or torch.cuda.is_available()):
        return
    from emloc_kernels.ops import _triton_gemm

    monkeypatch.setattr(_triton_gemm, "_alloc", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))
