"""Stage 1: calibration statistics, whitened SVD, streaming build, save/load."""

from .build import build_emulator
from .io import load_emulator, save_emulator

__all__ = ["build_emulator", "save_emulator", "load_emulator"]
