"""Shared fixtures for the kernel tests.

Run them in their own process: ``TRITON_INTERPRET=1 python3 -m pytest tests/kernels`` runs the
Triton kernels on CPU tensors (triton reads the variable when the kernels are decorated);
``cuda`` tests run them for real.  A test parametrized by ``device`` is a kernel test: its
``cpu`` case is skipped without the interpreter (else both sides would run the torch
reference), and it fails if it finished without launching a kernel, unless it is marked
``no_launch`` (it runs the torch reference, or an empty grid, on purpose).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_launch: a device test that launches no kernel on purpose")


class LaunchLog:
    """Grids of the Triton kernel launches made during one test: ``(kernel, tiles, split)``."""

    def __init__(self) -> None:
        self.grids: list[tuple[str, int, int]] = []

    def split(self, kernel: str) -> list[int]:
        return [s for k, _, s in self.grids if k == kernel]


class _Recorded:
    def __init__(self, kernel, name: str, log: LaunchLog) -> None:
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.grids.append((self.name, *grid))
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> LaunchLog:
    """The log of this test's kernel launches."""
    log = LaunchLog()
    if INTERPRET or torch.cuda.is_available():
        from emloc_kernels.ops import _triton_gemm

        for name in ("_gemm_2k_kernel", "_gemm_2n_kernel"):
            monkeypatch.setattr(_triton_gemm, name, _Recorded(getattr(_triton_gemm, name), name, log))
    return log


@pytest.fixture(autouse=True)
def kernels_must_run(request):
    """A kernel test (parametrized by ``device``) must really launch a kernel."""
    spec = getattr(request.node, "callspec", None)
    if spec is None or "device" not in spec.params or request.node.get_closest_marker("no_launch"):
        yield
        return
    if spec.params["device"] == "cpu" and not INTERPRET:
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (else both sides run the torch reference)")
    log = request.getfixturevalue("launches")
    yield
    assert log.grids, "the test finished without launching a Triton kernel"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel never writes fails the comparison."""
    if not (INTERPRET or torch.cuda.is_available()):
        return
    from emloc_kernels.ops import _triton_gemm

    monkeypatch.setattr(
        _triton_gemm,
        "_alloc",
        lambda shape, strides, dtype, device: torch.empty_strided(shape, strides, dtype=dtype, device=device).fill_(
            math.nan
        ),
    )
