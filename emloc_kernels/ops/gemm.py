"""The two generic GEMMs every fused op is built from, with their torch references.

* ``two_k`` (``gemm_2k``): ``C = α₁·A₁B₁ + α₂·A₂B₂ + bias`` -- two K segments accumulated into one
  fp32 tile (e.g. ``[t_v | s·t_A]·[u | B]ᵀ``) without concatenating anything in memory.
* ``two_n`` (``gemm_2n``): ``C₁ = A·B₁``, ``C₂ = α₂·A·B₂`` -- two N segments fed by one read of ``A``
  (e.g. ``x·[v; A]ᵀ``).

Right operands are K×N: any strided tensor view (a transposed weight is just ``w.t()``)
or a :class:`PackedOperand` that the Triton kernels dequantise inside the tile loop.
Operands may have different dtypes: two 16-bit operands of the same dtype are multiplied
on tensor cores, anything else in fp32 (tf32 when torch allows it); accumulation is fp32.

``use_triton`` is the single dispatch point: Triton for CUDA tensors, Triton's
interpreter for CPU tensors under ``TRITON_INTERPRET=1``, the torch reference otherwise,
in a process started with ``EMLOC_FORCE_REFERENCE=1`` or inside ``force_reference()``.

Shapes are not checked here: the ops that call these GEMMs validate their arguments once,
with messages that name them, and a second check per GEMM would cost host time on every
call of every layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType
from typing import Iterator

import torch

from .quant import Right, cdiv
from .reference import gemm_2k_reference, gemm_2n_reference


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels() -> ModuleType:
    """The Triton launchers, imported on first use (the package imports without triton); a
    cached lookup, not an import statement per call (microseconds each)."""
    from . import _triton_gemm

    return _triton_gemm


@functools.lru_cache(maxsize=None)
def _interpreter() -> bool:
    """Whether CPU tensors run the kernels: ``TRITON_INTERPRET=1`` and Triton importable, read
    once (Triton too reads the variable once, when it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and _triton_importable()


# read once, as Triton reads TRITON_INTERPRET: an environment read costs every call of every
# layer about a microsecond; ``force_reference`` switches at run time
_FORCE_REFERENCE = os.environ.get("EMLOC_FORCE_REFERENCE", "0") == "1"


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Inside the block every op runs its torch reference (``enabled=False``: its kernels again),
    in every thread; for debugging, and for tests that run an op many times."""
    global _FORCE_REFERENCE
    saved, _FORCE_REFERENCE = _FORCE_REFERENCE, enabled
    try:
        yield
    finally:
        _FORCE_REFERENCE = saved


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on ``t``'s device runs the Triton kernels (else the torch reference)."""
    if _FORCE_REFERENCE:
        return False
    if t.is_cuda:
        return _triton_importable()
    return t.is_cpu and _interpreter()


def aligned_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """A copy of the 2-D ``t`` whose row stride is a multiple of ``multiple`` elements.

    Do it once when a frozen factor is built: with ranks like 819 or 1274 a contiguous
    ``u`` (out×r) has misaligned rows, which stops the kernels' vectorised, pipelined loads.
    """
    if t.ndim != 2:
        raise ValueError(f"aligned_rows: t must be 2-D, got shape {tuple(t.shape)}")
    cols = cdiv(t.shape[1], multiple) * multiple
    out = t.new_zeros(t.shape[0], cols)[:, : t.shape[1]]
    out.copy_(t)
    return out


def _autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off around a reference GEMM (the ops cast their inputs already; the kernels
    never see autocast), entered only when it is on: the context costs host time."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


_UNPLANNED = object()  # Gemms._replayed(): no prepared launch for this call


class Gemms:
    """The two GEMMs as an op's body calls them, in a fixed order.

    * ``two_k``: ``C = α₁·A₁B₁ + α₂·A₂B₂ + bias`` (M×N, ``out_dtype`` or A₁'s dtype); segment 2
      optional (a2 and b2 both given or both None).
    * ``two_n``: ``(A·B₁, α₂·A·B₂)`` with one pass over ``A``; dtypes default to A's.

    ``Gemms(triton)`` plans each call afresh (``triton=False``: the torch references).
    ``Gemms(True, launches)`` is one pass of a replay: the i-th call of the pass uses
    ``launches[i]``, the Triton launch prepared on the first pass (and appended to the list
    then), so that a later call of the same body on operands of the same layout skips the
    launch planning.  The caller keys ``launches`` by everything the layouts follow from.
    """

    __slots__ = ("triton", "launches", "i")

    def __init__(self, triton: bool, launches: list | None = None) -> None:
        self.triton, self.launches, self.i = triton, launches, 0

    def t(self, t: torch.Tensor) -> torch.Tensor:
        """``tᵀ`` as an operand of the next GEMM: a view, except when that GEMM replays a
        prepared launch, which reads only the data pointer (the transposed strides are in its
        plan) -- so a replayed call makes no views (microseconds each)."""
        launches, i = self.launches, self.i
        if launches is not None and i < len(launches) and launches[i] is not None:
            return t
        return t.t()

    def _replayed(self):
        """The replay's prepared launch for this call (None: nothing to launch), or
        :data:`_UNPLANNED` when the call is planned now (no replay, or its first pass)."""
        launches, i = self.launches, self.i
        if launches is None or i == len(launches):
            return _UNPLANNED
        self.i = i + 1
        return launches[i]

    def _record(self, launch):
        """A launch planned now, kept for the replay's later passes."""
        if self.launches is not None:
            self.launches.append(launch)
            self.i += 1
        return launch

    def two_k(
        self,
        a1: torch.Tensor,
        b1: Right,
        a2: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        *,
        alpha1: float = 1.0,
        alpha2: float = 1.0,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        launch = self._replayed()
        if launch is _UNPLANNED:
            launch = self._record(
                _kernels().prepare_2k(a1, b1, a2, b2, alpha1, alpha2, bias, out_dtype or a1.dtype)
                if self.triton
                else None
            )
        if launch is None:
            with _autocast_off(a1):
                return gemm_2k_reference(a1, b1, a2, b2, alpha1, alpha2, bias, out_dtype)
        return launch(a1, b1, a2, b2, bias)

    def two_n(
        self,
        a: torch.Tensor,
        b1: Right,
        b2: torch.Tensor,
        *,
        alpha2: float = 1.0,
        out_dtypes: tuple[torch.dtype, torch.dtype] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        launch = self._replayed()
        if launch is _UNPLANNED:
            launch = self._record(
                _kernels().prepare_2n(a, b1, b2, alpha2, out_dtypes or (a.dtype, a.dtype)) if self.triton else None
            )
        if launch is None:
            with _autocast_off(a):
                return gemm_2n_reference(a, b1, b2, alpha2, out_dtypes)
        return launch(a, b1, b2)
