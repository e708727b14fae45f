"""A non-editable install carries the extension's sources and builds the extension: build a
wheel from a copy of the checkout, install it into a fresh virtual environment (reusing this
one's packages) and load the extension there, built into an empty cache (about a minute)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
can_build = shutil.which("c++") is not None and cpp_extension.is_ninja_available()

PROBE = """
import json, emloc_kernels, emloc_kernels.ext as e
s = e.status()
print(json.dumps({"file": emloc_kernels.__file__, "csrc": str(e.CSRC), "available": e.available(),
                  "path": s.path, "reason": s.reason}))
"""


@pytest.mark.packaging
@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja")
def test_wheel_install_builds_and_loads_the_extension(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks", "runs", "*.so", "*.o"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("emloc_kernels-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"emloc_kernels/csrc/{p.name}" for p in (ROOT / "csrc").iterdir()} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EMLOC_DISABLE_EXT")}
    env.update(EMLOC_EXT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([str(python), "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(venv)) and got["csrc"].startswith(str(venv))  # the installed copy
    assert got["available"], got["reason"]
    assert got["path"].startswith(str(tmp_path / "cache"))  # built now, from the installed sources
