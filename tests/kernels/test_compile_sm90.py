"""The kernels compile for Hopper (sm_90) at every launch the ops make -- checked without a
GPU, in a subprocess, because under TRITON_INTERPRET=1 the kernels are not compilable objects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU compiles every launch for real in the other tests")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    script = Path(__file__).with_name("compile_sm90.py")
    res = subprocess.run(
        [sys.executable, "-W", "ignore", str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
