"""PEFT LoRA layers whose forward runs the fused ops.

They subclass PEFT's own ``lora.Linear`` (so saving, loading, adapter switching and
``disable_adapter`` behave as users expect) and only replace the common case — one active
plain adapter, no dropout — by a single fused call.  Anything else (several adapters,
dropout, DoRA and other variants, mixed-batch ``adapter_names``) takes PEFT's unfused path.
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from .. import ops
from .lowrank import LowRankLinear


class _FusedLora(PeftLoraLinear):
    def _fusable_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The single active plain adapter the fused op can run, else None."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False):
            return None
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        return self._fused(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


class LowRankLoraLinear(_FusedLora):
    """LoRA around a :class:`LowRankLinear`: ``x vᵀ uᵀ + s·x Aᵀ Bᵀ + b`` in two fused passes."""

    def _fused(self, x, lora_a, lora_b, scaling):
        base = self.get_base_layer()
        u, v = base.factors()
        return ops.lowrank_lora(x, u, v, lora_a, lora_b, scaling, base.bias)

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a LoRA cannot be merged into a low-rank emulator layer; correct the adapter for the original model "
            "(emloc_kernels.correct_adapter) and merge it there (emloc_kernels.merge_adapter)"
        )

    def unmerge(self) -> None:
        if self.merged:  # never reached: merge always raises
            raise RuntimeError("unreachable: emulator layers are never merged")


class DenseLoraLinear(_FusedLora):
    """LoRA around a plain ``nn.Linear``: ``x Wᵀ + s·x Aᵀ Bᵀ + b`` in one fused GEMM."""

    def _fused(self, x, lora_a, lora_b, scaling):
        base = self.get_base_layer()
        return ops.dense_lora(x, base.weight, lora_a, lora_b, scaling, base.bias)


def dispatch_emloc(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module | None:
    """PEFT dispatcher: our layers for LowRankLinear (always) and plain nn.Linear bases."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("parameter_name") is not None:
        return None
    if any(isinstance(base, t) for t in (getattr(config, "_custom_modules", None) or {})):
        return None  # the user's own mapping wins
    if isinstance(base, LowRankLinear):
        if config.fan_in_fan_out:
            config.fan_in_fan_out = False  # the emulator stores out×in even where the original was a Conv1D
        return LowRankLoraLinear(target, adapter_name, config=config, **kwargs)
    if type(base) is nn.Linear and not config.fan_in_fan_out:
        return DenseLoraLinear(target, adapter_name, config=config, **kwargs)
    return None
