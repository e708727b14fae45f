"""emloc_kernels: fine-tune a model inside the memory its inference needs (EMLoC).

Stage 1 builds a low-rank *emulator* (:func:`build_emulator`), stage 2 trains LoRA on it
(PEFT, which wraps the emulator's layers in ours once this package is imported, or
:func:`add_lora`), stage 3 corrects the adapter for the original model
(:func:`correct_adapter`).  :func:`apply_fused_lora` switches
PEFT's LoRA layers around plain ``nn.Linear`` modules of a model to the fused kernels
(:func:`remove_fused_lora` switches them back); importing changes nothing for them.
Importing also registers the transformers quantization method ``emloc`` (:class:`EmlocConfig`):
``from_pretrained`` then loads an emulator directory as the emulator, or builds one on load;
models that do not name the method load as before.
"""

from . import ops
from ._version import __version__
from .correction import correct_adapter, merge_adapter
from .emulator import (
    EmlocConfig,
    build_emulator,
    build_emulator_from_pretrained,
    load_emulator,
    save_emulator,
    write_emulator_from_pretrained,
)
from .lora import add_lora, save_lora
from .modules import LowRankLinear, QuantLowRankLinear
from .patch import apply_fused_lora, register_peft, remove_fused_lora

register_peft()

__all__ = [
    "__version__",
    "ops",
    "LowRankLinear",
    "QuantLowRankLinear",
    "build_emulator",
    "build_emulator_from_pretrained",
    "write_emulator_from_pretrained",
    "save_emulator",
    "load_emulator",
    "EmlocConfig",
    "add_lora",
    "save_lora",
    "correct_adapter",
    "merge_adapter",
    "apply_fused_lora",
    "remove_fused_lora",
]
