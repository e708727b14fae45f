"""Hooks into other libraries: PEFT picks our LoRA layers without any call from the user."""
from __future__ import annotations

import functools

_PATCHED = False


def register_peft() -> None:
    """Make PEFT's LoRA dispatch try :func:`dispatch_emloc` first (idempotent).

    PEFT has no public registry for default layer types (``LoraConfig._register_custom_module``
    is per config), so we wrap ``LoraModel._create_new_module``, which every PEFT version we
    support routes all LoRA layer creation through.
    """
    global _PATCHED
    if _PATCHED:
        return
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:  # PEFT is optional for the kernels and stage 1
        return
    from .modules.peft_layers import dispatch_emloc

    original = LoraModel._create_new_module

    @functools.wraps(original)
    def create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_emloc(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)
    _PATCHED = True
