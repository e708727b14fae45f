"""emloc_kernels: fine-tune a model inside the memory its inference needs (EMLoC).

Stage 1 builds a low-rank *emulator* (:func:`build_emulator`), stage 2 trains LoRA on it
(PEFT or :mod:`emloc_kernels.lora`), stage 3 corrects the adapter for the original model.
"""
from ._version import __version__
from . import ops
from .modules import LowRankLinear

__all__ = ["__version__", "ops", "LowRankLinear"]
