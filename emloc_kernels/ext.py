"""Build and load the optional C++/CUDA extension in ``csrc/`` (``torch.ops.emloc_ext``).

Built on first use, not at install or import time: the ``.cu`` files include only CUDA
headers and are compiled by ``nvcc -c`` when a CUDA toolkit is found, then linked with
``cudart`` into the C++ glue (``csrc/ext.cpp``: torch operators and their CPU
implementation), which ``torch.utils.cpp_extension.load`` builds with ninja. Without nvcc
the build is CPU-only. This recipe works with CPU and CUDA builds of torch alike, where
``CUDAExtension`` does not (it needs the CUDA build of torch and its CUDA headers).

Builds are cached under ``$EMLOC_EXT_CACHE`` (default ``~/.cache/emloc_kernels/ext``) in a
folder named by a hash of the sources, flags, toolkit and torch version, behind a file lock
so parallel processes build once. ``EMLOC_DISABLE_EXT=1`` turns the extension off; when it
cannot be built or loaded the library warns once, saying why, and uses its torch code.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


def _sources() -> Path:
    """The extension's sources: ``emloc_kernels/csrc`` in an installed package (setup.py copies
    the top-level ``csrc/`` there at build time), else ``csrc/`` beside the package (a checkout
    or an editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if (installed / "ext.cpp").is_file() else here.parent / "csrc"


CSRC = _sources()
NAME = "emloc_ext"
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
# no fused multiply-add: the CPU code must round like the torch reference
CXX_FLAGS = ["-O3", "-ffp-contract=off"]


@dataclass(frozen=True)
class Status:
    """Outcome of loading the extension in this process."""

    loaded: bool
    cuda: bool = False  # the CUDA kernels are compiled in
    reason: str = ""  # why it is not loaded
    path: str = ""  # the shared library


_status: Status | None = None
_status_lock = threading.Lock()


def status() -> Status:
    """Build (or find in the cache) and load the extension once per process; never raises."""
    global _status
    with _status_lock:
        if _status is None:
            _status = _load()
    return _status


def available() -> bool:
    """Whether the extension is built and loaded in this process (its CPU ops at least)."""
    return status().loaded


def supports(device: torch.device | str) -> bool:
    """Whether the extension's ops run on ``device`` (CPU, or CUDA when built with nvcc)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False
    s = status()
    return s.loaded and (device.type == "cpu" or s.cuda)


def _load() -> Status:
    if os.environ.get("EMLOC_DISABLE_EXT", "0") not in ("", "0"):
        return Status(False, reason="disabled by EMLOC_DISABLE_EXT")
    try:
        path = build()
        torch.ops.load_library(str(path))
        return Status(True, cuda=bool(torch.ops.emloc_ext.cuda_built()), path=str(path))
    except Exception as e:  # any build/load failure means: fall back, and say why once
        reason = f"{type(e).__name__}: {e}"
        if len(reason) > 2000:
            reason = reason[:200] + " ... " + reason[-1800:]
        warnings.warn(
            f"emloc_kernels: C++/CUDA extension unavailable, using the torch implementation ({reason})",
            RuntimeWarning,
            stacklevel=4,
        )
        return Status(False, reason=reason)


def cuda_home() -> Path | None:
    """The CUDA toolkit to compile with: ``$CUDA_HOME``/``$CUDA_PATH``, ``/usr/local/cuda``, or
    the one around ``nvcc`` on PATH (``/usr/local/bin/nvcc`` may be a wrapper script, so the
    folder must really hold ``bin/nvcc`` and ``include/cuda_runtime.h``)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    return None


def nvcc_compile(source: Path, output: Path, home: Path) -> Path:
    """``nvcc -c`` one ``.cu`` file to an object file (raises with nvcc's message on failure)."""
    cmd = [str(home / "bin" / "nvcc"), "-c", *NVCC_FLAGS, str(source), "-o", str(output)]
    env = {**os.environ, "CUDA_HOME": str(home)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{result.stderr.strip()}")
    return output


def cudart_flags(home: Path) -> list[str]:
    """Linker flags for the CUDA runtime. A shared ``libcudart`` from the toolkit, torch's lib
    folder or the nvidia wheels (rpath set; in a process whose CUDA torch already loaded the
    same soname, that copy is used); else the toolkit's static one."""
    site = Path(torch.__file__).resolve().parent.parent
    dirs = [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib"))]
    dirs += [Path(torch.__file__).resolve().parent / "lib", *sorted(site.glob("nvidia/*/lib"))]
    for d in dirs:
        libs = sorted(d.glob("libcudart.so*"))
        if libs:
            return [str(libs[0]), f"-Wl,-rpath,{d}"]
    static = home / "lib64" / "libcudart_static.a"
    if static.is_file():
        return [str(static), "-ldl", "-lrt", "-lpthread"]
    raise RuntimeError(f"no libcudart found in {[str(d) for d in dirs]}")


def _digest(home: Path | None, cxx_flags: list[str], ldflags: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    parts = [torch.__version__, str(torch.version.cuda), sys.version, *cxx_flags, *ldflags]
    if home is not None:
        nvcc_version = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
        parts += [str(home), nvcc_version, *NVCC_FLAGS]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get("EMLOC_EXT_CACHE") or Path.home() / ".cache" / "emloc_kernels" / "ext")


def build() -> Path:
    """Build the extension unless the cache holds it; return the shared library's path."""
    if not (CSRC / "ext.cpp").is_file():
        raise RuntimeError(f"C++ sources not found at {CSRC} (a package built without them?)")
    home = cuda_home()
    cxx_flags = CXX_FLAGS + (["-DEMLOC_WITH_CUDA"] if home else [])
    ldflags = cudart_flags(home) if home else []
    root = cache_root()
    build_dir = root / _digest(home, cxx_flags, ldflags)
    library = build_dir / f"{NAME}.so"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not library.is_file():
            from torch.utils import cpp_extension

            build_dir.mkdir(exist_ok=True)
            objects = (
                [str(nvcc_compile(cu, build_dir / f"{cu.stem}.cu.o", home)) for cu in sorted(CSRC.glob("*.cu"))]
                if home
                else []
            )
            cpp_extension.load(
                name=NAME,
                sources=[str(CSRC / "ext.cpp")],
                extra_cflags=cxx_flags,
                extra_ldflags=objects + ldflags,
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                with_cuda=False,
                is_python_module=False,
            )
    return library
