"""Packaging shim: metadata lives in pyproject.toml.

The CUDA/C++ extension's sources stay in the top-level ``csrc/``; building the package copies
them into ``emloc_kernels/csrc/`` so that an installed (non-editable) package or a wheel
carries them.  The extension itself is compiled on first use (``emloc_kernels/ext.py``), so
installing needs no compiler or GPU.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCES = ("*.cpp", "*.cu", "*.h")


class BuildWithSources(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ from the checkout
            return
        target = Path(self.build_lib) / "emloc_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in SOURCES:
            for source in sorted((ROOT / "csrc").glob(pattern)):
                self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildWithSources})
