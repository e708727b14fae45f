"""PEFT LoRA layers whose forward runs the fused ops.

They subclass PEFT's own ``lora.Linear`` (so saving, loading, adapter switching and
``disable_adapter`` behave as users expect) and take the fused call only on an allow-list:
one active adapter, no dropout module, no ``lora_bias``, no DoRA or other variant, plain
``nn.Linear`` adapter weights, no extra forward arguments (such as mixed-batch
``adapter_names``), not merged, adapters enabled.  Everything else runs PEFT's own forward.

:class:`LowRankLoraLinear` is what PEFT builds around the emulator's :class:`LowRankLinear`
(registered on import, :mod:`emloc_kernels.patch`); :class:`DenseLoraLinear` is PEFT's layer
around a plain ``nn.Linear`` switched to the fused forward by
:func:`emloc_kernels.apply_fused_lora` (and back by :func:`emloc_kernels.remove_fused_lora`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from .fused import fused_lora


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


class _FusedLora(PeftLoraLinear):
    def _fusable_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The single active plain adapter the fused op can run, else None (allow-list)."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        plain = (
            name not in self.lora_variant
            and not self.use_dora.get(name, False)
            and not self.lora_bias.get(name, False)
            and type(self.lora_dropout[name]) is nn.Identity
            and _plain_linear(self.lora_A[name])
            and _plain_linear(self.lora_B[name])
        )
        return name if plain else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fusable_adapter(args, kwargs)
        if name is None:
            return PeftLoraLinear.forward(self, x, *args, **kwargs)
        lora_a, lora_b = cast(torch.Tensor, self.lora_A[name].weight), cast(torch.Tensor, self.lora_B[name].weight)
        return fused_lora(cast(nn.Linear, self.get_base_layer()), x, lora_a, lora_b, self.scaling[name])


class LowRankLoraLinear(_FusedLora):
    """LoRA around a :class:`LowRankLinear`: ``x vᵀ uᵀ + s·x Aᵀ Bᵀ + b`` in two fused passes."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # the emulator stores out×in even where the original was a Conv1D (GPT-2): the config
        # may say fan_in_fan_out for the original, this layer never transposes
        self.fan_in_fan_out = False

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's, after refusing DoRA: it rescales by the column norms of the dense weight,
        which a low-rank layer does not store (PEFT would fail on a tensor size mismatch)."""
        config = kwargs.get("config", next((a for a in args if hasattr(a, "use_dora")), None))
        if kwargs.get("use_dora") or getattr(config, "use_dora", False):
            raise ValueError(
                f"DoRA (LoraConfig(use_dora=True)) is not supported on emulator layers "
                f"({type(self.get_base_layer()).__name__}): it needs the dense weight, which the emulator does not "
                "store; use plain LoRA (use_dora=False)"
            )
        super().update_layer(adapter_name, *args, **kwargs)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "a LoRA cannot be merged into a low-rank emulator layer; correct the adapter for the original model "
            "(emloc_kernels.correct_adapter) and merge it there (emloc_kernels.merge_adapter)"
        )


class DenseLoraLinear(_FusedLora):
    """PEFT's LoRA around a plain ``nn.Linear`` with the fused forward ``x Wᵀ + s·x Aᵀ Bᵀ + b``.

    Only :func:`emloc_kernels.apply_fused_lora` creates it, by switching the class of PEFT's
    own layers (no state is added, so :func:`emloc_kernels.remove_fused_lora` switches back)."""
