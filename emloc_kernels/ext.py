"""Build and load the optional C++/CUDA extension in ``csrc/`` (``torch.ops.emloc_ext``).

Built on first use, not at install or import time: the ``.cu`` files include only CUDA
headers and are compiled by ``nvcc -c`` when a CUDA toolkit is found, then linked with
``cudart`` into the C++ glue (``csrc/ext.cpp``: torch operators and their CPU
implementation), which ``torch.utils.cpp_extension.load`` builds with ninja. Without nvcc
the build is CPU-only. This recipe works with CPU and CUDA builds of torch alike, where
``CUDAExtension`` does not (it needs the CUDA build of torch and its CUDA headers).

Builds are cached under ``$EMLOC_EXT_CACHE`` (default ``~/.cache/emloc_kernels/ext``), by a
hash ``<digest>`` of the sources, flags, toolkit and torch version::

    <root>/                         folders made here are 0700 (no other user can plant a library)
      <digest>.lock                 flock held while building; opened without following symlinks, 0600
      <digest>.build-XXXXXXXX/      a build in progress, in a fresh folder each time
      <digest>/emloc_ext.so         the published library, moved in by an atomic rename
      <digest>/emloc_ext.so.json    its size and sha256

Guarantees. A library is loaded only when its size and sha256 match its record: a truncated or
half-written file is rebuilt rather than mapped (which would kill the process with SIGBUS). A
verified library is used without locking. Building holds the flock, which the kernel releases
when its holder dies; so whoever holds it knows no other process is building and first removes
what a killed build left (its folder, and torch's baton ``lock``: a plain file on which torch
would wait forever). Waiting for the flock is bounded by ``$EMLOC_EXT_LOCK_TIMEOUT`` seconds
(default 600). ``EMLOC_DISABLE_EXT=1`` turns the extension off; when it cannot be built or
loaded, or the wait runs out, the library warns once, saying why, and uses its torch code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


def lock_timeout() -> float:
    """Seconds to wait for another process's build before falling back: ``$EMLOC_EXT_LOCK_TIMEOUT``
    (default 600, longer than a CUDA build)."""
    value = os.environ.get("EMLOC_EXT_LOCK_TIMEOUT") or "600"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"EMLOC_EXT_LOCK_TIMEOUT must be a number of seconds, got {value!r}") from None


@dataclass(frozen=True)
class Target:
    """One build configuration and its place in the cache (layout in the module docstring)."""

    home: Path | None  # the CUDA toolkit, or None for a CPU-only build
    cxx_flags: tuple[str, ...]
    ldflags: tuple[str, ...]
    root: Path
    digest: str

    @property
    def directory(self) -> Path:
        return self.root / self.digest

    @property
    def library(self) -> Path:
        return self.directory / f"{NAME}.so"

    @property
    def record(self) -> Path:
        return self.directory / f"{NAME}.so.json"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.digest}.lock"


def target() -> Target:
    """This machine's build configuration (toolkit, flags) and where its build is cached."""
    home = cuda_home()
    cxx_flags = CXX_FLAGS + (["-DEMLOC_WITH_CUDA"] if home else [])
    ldflags = cudart_flags(home) if home else []
    return Target(home, tuple(cxx_flags), tuple(ldflags), cache_root(), _digest(home, cxx_flags, ldflags))


def build() -> Path:
    """Build the extension unless the cache holds a verified copy; return the shared library's path."""
    if not (CSRC / "ext.cpp").is_file():
        raise RuntimeError(f"C++ sources not found at {CSRC} (a package built without them?)")
    t = target()
    if _verified(t):  # no lock needed: files are only ever replaced whole, by rename
        return t.library
    _make_private_dirs(t.root)
    with _locked(t.lock):
        if not _verified(t):  # another process may have built it while we waited
            _clear_leftovers(t)
            scratch = Path(tempfile.mkdtemp(prefix=f"{t.digest}.build-", dir=t.root))  # mode 0700
            try:
                _publish(_compile(t, scratch), t)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return t.library


# Run in a child process: a library that does not load there is never published, and this process
# never loads a second copy of the ops (torch.utils.cpp_extension.load loads what it builds).
_BUILD_SCRIPT = "import json, sys; from torch.utils import cpp_extension; cpp_extension.load(**json.loads(sys.argv[1]))"


def _compile(t: Target, scratch: Path) -> Path:
    """Build the library in the empty folder ``scratch``; return its path there."""
    objects = (
        [str(nvcc_compile(cu, scratch / f"{cu.stem}.cu.o", t.home)) for cu in sorted(CSRC.glob("*.cu"))]
        if t.home
        else []
    )
    args = dict(
        name=NAME,
        sources=[str(CSRC / "ext.cpp")],
        extra_cflags=list(t.cxx_flags),
        extra_ldflags=objects + list(t.ldflags),
        extra_include_paths=[str(CSRC)],
        build_directory=str(scratch),
        with_cuda=False,
        is_python_module=False,
    )
    result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the extension failed:\n{result.stderr.strip()}")
    return scratch / f"{NAME}.so"


def _fingerprint(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, read from one open file (so they describe the same version)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return size, h.hexdigest()


def _verified(t: Target) -> bool:
    """Whether the published library matches its record (read, never mapped: a short file is no crash)."""
    try:
        record = json.loads(t.record.read_text())
        return _fingerprint(t.library) == (record["size"], record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(built: Path, t: Target) -> None:
    """Move a new library into place: flushed to disk, then renamed over the old one, then its record
    (written and renamed the same way). A reader sees old or new files, never part of one; a library
    and record of different builds do not match, so that reader rebuilds under the lock."""
    _make_private_dirs(t.directory)
    with open(built, "rb") as f:
        os.fsync(f.fileno())
    size, sha256 = _fingerprint(built)
    os.replace(built, t.library)
    fd, tmp = tempfile.mkstemp(prefix=f"{t.record.name}.", dir=t.directory)
    with os.fdopen(fd, "w") as f:
        json.dump({"size": size, "sha256": sha256}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, t.record)
    dir_fd = os.open(t.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the renames themselves
    finally:
        os.close(dir_fd)


def _clear_leftovers(t: Target) -> None:
    """Remove what a killed build left: its folder (ninja's outputs, maybe half-written) and torch's
    baton ``lock``, a plain file that only its live owner deletes. Only under the flock, whose holder
    knows that no other process of ours is building."""
    for folder in t.root.glob(f"{t.digest}.build-*"):
        shutil.rmtree(folder, ignore_errors=True)
    (t.directory / "lock").unlink(missing_ok=True)  # the earlier layout built in place, in <digest>/


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, waiting at most ``lock_timeout()`` seconds. The kernel drops
    a flock when its holder dies, so it cannot go stale. The file is opened without following a
    symlink: a planted link cannot make us create or lock another file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        timeout = lock_timeout()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"waited {timeout:g} s for the lock {path}, held by another process building the "
                        "extension (EMLOC_EXT_LOCK_TIMEOUT sets the wait)"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the flock


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700; existing folders are left as they are."""
    for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process
            pass
