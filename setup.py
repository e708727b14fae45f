"""Packaging shim: metadata lives in pyproject.toml. The CUDA extension in csrc/ is
built on first use (emloc_kernels/ext.py), so installing needs no compiler or GPU."""
from setuptools import setup

setup()
