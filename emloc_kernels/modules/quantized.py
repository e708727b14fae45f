"""The emulator's low-rank linear with quantised factors (int8 / int4, layout in ``ops/quant.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..ops.quant import FLOAT_DTYPES, PackedFactor, check_format, dequantize, packed_shapes, quantize, qweight_dtype
from .lowrank import LowRankLinear

_PARTS = ("qweight", "scale", "offset")


class QuantLowRankLinear(LowRankLinear):
    """A :class:`LowRankLinear` whose factors ``u`` (out×rank) and ``v`` (rank×in) are kept
    only in packed form, so the emulator costs 1 (int8) or ½ (int4) byte per factor element.

    A subclass, so that whatever handles ``LowRankLinear`` (PEFT dispatch, LoRA correction)
    handles it too. The packed tensors are persistent buffers ``u_qweight``, ``u_scale``,
    ``u_offset`` (int4 only), ``v_qweight``, ... so ``state_dict``, ``.to()`` and FSDP treat
    them like any other state; ``.to(dtype)`` changes the compute dtype (the scales). There
    are no float ``u``/``v`` attributes: use :meth:`dense_weight` or ``u_packed``/``v_packed``.
    """

    # the packed buffers registered in __init__ (offsets are None for int8)
    u_qweight: torch.Tensor
    u_scale: torch.Tensor
    u_offset: torch.Tensor | None
    v_qweight: torch.Tensor
    v_scale: torch.Tensor
    v_offset: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        quant: str,
        group_size: int = 128,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_format(quant, group_size)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        # the parent checks the sizes and sets the attributes; its float factors live on
        # the meta device (no memory) and are dropped
        super().__init__(in_features, out_features, rank, bias, device="meta", dtype=dtype)
        del self.u, self.v
        self.quant, self.group_size = quant, group_size if quant == "int4" else 0
        for name, (n, k) in (("u", (out_features, rank)), ("v", (rank, in_features))):
            shapes = packed_shapes(n, k, quant, group_size)
            for part in _PARTS:
                t = None
                if part in shapes:
                    t = torch.zeros(
                        shapes[part], dtype=qweight_dtype(quant) if part == "qweight" else dtype, device=device
                    )
                self.register_buffer(f"{name}_{part}", t)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    @classmethod
    def from_lowrank(cls, layer: LowRankLinear, quant: str, group_size: int = 128) -> "QuantLowRankLinear":
        """Quantise a float :class:`LowRankLinear`; the bias is shared, not copied."""
        if not isinstance(layer, LowRankLinear) or isinstance(layer, QuantLowRankLinear):
            raise TypeError(f"layer must be a float LowRankLinear, got {type(layer).__name__}")
        packed = {"u": quantize(layer.u, quant, group_size), "v": quantize(layer.v, quant, group_size)}
        q = cls(
            layer.in_features,
            layer.out_features,
            layer.rank,
            layer.bias is not None,
            quant=quant,
            group_size=group_size,
            dtype=layer.u.dtype,
            device="meta",
        )
        for name, p in packed.items():
            for part in _PARTS:
                setattr(q, f"{name}_{part}", getattr(p, part))
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.detach(), requires_grad=layer.bias.requires_grad)
        return q

    @property
    def u_packed(self) -> PackedFactor:
        return self._packed("u", (self.out_features, self.rank))

    @property
    def v_packed(self) -> PackedFactor:
        return self._packed("v", (self.rank, self.in_features))

    def _packed(self, name: str, shape: tuple[int, int]) -> PackedFactor:
        qweight, scale, offset = (getattr(self, f"{name}_{part}") for part in _PARTS)
        return PackedFactor(qweight, scale, offset, fmt=self.quant, shape=shape, group_size=self.group_size)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Empty tensor with the layer's compute dtype and device (no dense weight exists)."""
        return self.u_scale.new_empty(0)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The emulated weight ``u v`` (out×in) from the dequantised factors, computed in fp32 at least."""
        compute = torch.promote_types(self.u_scale.dtype, torch.float32)
        w = dequantize(self.u_packed).to(compute) @ dequantize(self.v_packed).to(compute)
        return w.to(dtype or self.u_scale.dtype)

    def weight_bytes(self) -> int:
        """Exact bytes of the stored weights: packed values, scales, offsets and bias."""
        tensors = [*self.buffers(recurse=False), *([self.bias] if self.bias is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def factors(self) -> tuple[PackedFactor, PackedFactor]:
        """The packed factors: ``ops.lowrank_lora`` dequantises them inside its tile loop."""
        return self.u_packed, self.v_packed

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # load_state_dict would cast silently (an int8 checkpoint into uint8 buffers, codes into
        # scales); refuse entries of the wrong dtype kind. Shapes are checked by torch.
        for name, buf in self._buffers.items():
            t = state_dict.get(prefix + name)
            if buf is None or not isinstance(t, torch.Tensor):
                continue
            if (t.dtype in FLOAT_DTYPES) if buf.is_floating_point() else t.dtype == buf.dtype:
                continue
            error_msgs.append(
                f"{prefix}{name}: this {self.quant} layer stores {buf.dtype} (floating: {FLOAT_DTYPES} accepted for "
                f"scales/offsets), the state dict has {t.dtype}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.quant == "int4" else ""
        return f"{super().extra_repr()}, quant={self.quant}{group}"
