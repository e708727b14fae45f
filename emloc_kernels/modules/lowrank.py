"""The emulator's replacement for ``nn.Linear``: ``y = (x vᵀ) uᵀ + b``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import ops


class LowRankLinear(nn.Linear):
    """A linear layer of shape ``out_features × in_features`` stored as two frozen factors
    ``u`` (out×rank) and ``v`` (rank×in).

    It subclasses ``nn.Linear`` so that PEFT (``target_modules="all-linear"``) and
    transformers treat it as the linear it replaces; ``nn.Linear.__init__`` is skipped, so
    no dense weight is ever allocated.  ``weight`` is an empty tensor that only carries
    the device and dtype (what PEFT reads off a base layer); use :meth:`dense_weight` for
    the matrix ``u v``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}], got {rank}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False)
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Wrap given factors (``u``: out×r, ``v``: r×in) without copying them."""
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"u must be out×r and v r×in; got u {tuple(u.shape)}, v {tuple(v.shape)}")
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, device="meta", dtype=u.dtype)
        layer.u = nn.Parameter(u.detach(), requires_grad=False)
        layer.v = nn.Parameter(v.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        return layer

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Empty tensor with the layer's device and dtype (no dense weight exists)."""
        return self.u.new_empty(0)

    def reset_parameters(self) -> None:
        """Factors come from the decomposition; nothing to initialise."""

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The emulated weight ``u v`` (out×in); computed in fp32 at least."""
        compute = torch.promote_types(self.u.dtype, torch.float32)
        w = self.u.to(compute) @ self.v.to(compute)
        return w.to(dtype or self.u.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored weights (factors and bias)."""
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.bias) if t is not None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LowRankLinear:
        """After ``.to()``/``.cuda()``, pad the rows of CUDA factors to 16 elements
        (:func:`ops.aligned_rows`): ranks such as 819 otherwise defeat the kernels' wide loads."""
        super()._apply(fn, recurse)
        for name in ("u", "v"):
            p = self._parameters.get(name)
            if p is not None and p.is_cuda and p.stride(0) % 16:
                p.data = ops.aligned_rows(p.data)
        return self

    def factors(self) -> tuple[Any, Any]:
        """``(u, v)`` as the ops take them (packed factors in the quantised subclass)."""
        return self.u, self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lowrank_lora(x, *self.factors(), bias=self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
