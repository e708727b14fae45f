"""Stage 1: calibration statistics, whitened SVD, streaming build, save/load, and the
``emloc`` quantization method that lets transformers load (or build) an emulator."""

from .build import build_emulator
from .hf import EmlocConfig
from .io import load_emulator, save_emulator
from .stream import NotStreamable, build_emulator_from_pretrained, write_emulator_from_pretrained

__all__ = [
    "build_emulator",
    "build_emulator_from_pretrained",
    "write_emulator_from_pretrained",
    "NotStreamable",
    "save_emulator",
    "load_emulator",
    "EmlocConfig",
]
