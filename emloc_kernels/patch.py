"""PEFT integration: our module types are registered automatically; the fused path for plain
``nn.Linear`` layers is an explicit, reversible switch.

* :func:`register_peft` (called on ``import emloc_kernels``) has PEFT map :class:`LowRankLinear`
  (and its quantised form) to :class:`LowRankLoraLinear` on each ``LoraConfig`` it builds
  layers from, through PEFT's own extension point ``LoraConfig._register_custom_module``:
  PEFT could not wrap the emulator's layers otherwise, and nothing that is not ours changes.
  A mapping the user registered for these types wins.
* :func:`apply_fused_lora` / :func:`remove_fused_lora` switch PEFT's LoRA layers around plain
  ``nn.Linear`` modules of one model to the fused forward and back.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.model import LoraModel
from torch import nn

from .modules.lowrank import LowRankLinear
from .modules.peft_layers import DenseLoraLinear, LowRankLoraLinear

_PEFT_CREATE = LoraModel._create_new_module


def register_custom_modules(config: LoraConfig) -> LoraConfig:
    """Register our LoRA layer for :class:`LowRankLinear` on ``config`` through PEFT's
    ``_register_custom_module``, unless the user mapped that type (or a base of it) already."""
    if not any(issubclass(LowRankLinear, t) for t in config._custom_modules or {}):
        config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return config


def register_peft() -> None:
    """Have PEFT register our mapping on each LoRA config it creates layers from (idempotent).

    ``_register_custom_module`` is per config, so the mapping is added where PEFT creates a
    layer (``LoraModel._create_new_module``): configs made before or after the import work,
    and PEFT's own dispatch then builds the layer."""
    if LoraModel._create_new_module is not _PEFT_CREATE:
        return

    def create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        return _PEFT_CREATE(register_custom_modules(lora_config), adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)  # type: ignore[method-assign]


def unregister_peft() -> None:
    """Undo :func:`register_peft`: PEFT's own layer creation, as before the import."""
    LoraModel._create_new_module = staticmethod(_PEFT_CREATE)  # type: ignore[method-assign]


def apply_fused_lora(model: nn.Module) -> int:
    """Switch PEFT's LoRA layers around plain ``nn.Linear`` modules of ``model`` to the fused
    forward (:class:`DenseLoraLinear`, which falls back to PEFT's own forward outside its
    allow-list); returns how many layers were switched.  Layers added later are PEFT's own:
    call it again.  :func:`remove_fused_lora` undoes it."""
    switched = 0
    for m in model.modules():
        if type(m) is PeftLoraLinear and type(m.get_base_layer()) is nn.Linear and not m.fan_in_fan_out:
            m.__class__ = DenseLoraLinear
            switched += 1
    return switched


def remove_fused_lora(model: nn.Module) -> int:
    """Give ``model``'s layers switched by :func:`apply_fused_lora` PEFT's own forward back;
    returns how many."""
    switched = 0
    for m in model.modules():
        if type(m) is DenseLoraLinear:
            m.__class__ = PeftLoraLinear  # type: ignore[assignment]
            switched += 1
    return switched
