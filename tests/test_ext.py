"""The C++/CUDA extension: build, cache, fallback, and the CUDA kernels against the CPU code."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_quant import dequant64, elem_scale
from torch.utils import cpp_extension

from emloc_kernels import ext
from emloc_kernels.ops.quant import dequantize, quantize, quantize_reference

ROOT = Path(__file__).resolve().parent.parent
disabled = os.environ.get("EMLOC_DISABLE_EXT", "0") not in ("", "0")
can_build = shutil.which("c++") is not None and cpp_extension.is_ninja_available() and not disabled
needs_ext = pytest.mark.skipif(not ext.supports("cpu"), reason="C++ extension not loaded (see ext.status())")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(ext.cuda_home() is None, reason="no CUDA toolkit (nvcc) here")
@pytest.mark.parametrize("source", sorted(ext.CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc(source, tmp_path):
    obj = ext.nvcc_compile(source, tmp_path / f"{source.stem}.o", ext.cuda_home())
    assert obj.stat().st_size > 0


@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja, and EMLOC_DISABLE_EXT unset")
def test_extension_builds_and_loads():
    s = ext.status()
    assert s.loaded, s.reason
    assert s.cuda == (ext.cuda_home() is not None)
    assert s.path.startswith(str(ext.cache_root()))
    assert ext.supports("cpu") and ext.supports("cuda") == s.cuda and not ext.supports("meta")


@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja, and EMLOC_DISABLE_EXT unset")
def test_cpu_only_build_without_nvcc():
    # in a child process: one process cannot load two libraries defining the emloc_ext ops
    code = (
        "import torch, emloc_kernels.ext as e; e.cuda_home = lambda: None; s = e.status(); "
        "assert s.loaded and not s.cuda, s; w = torch.randn(5, 77); "
        "from emloc_kernels.ops.quant import quantize, quantize_reference; "
        "a, b = quantize(w, 'int4', 64), quantize_reference(w, 'int4', 64); "
        "assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_ext
def test_build_is_cached():
    library = ext.build()
    mtime = library.stat().st_mtime_ns
    assert ext.build() == library and library.stat().st_mtime_ns == mtime
    assert library.parent.parent == ext.cache_root()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("EMLOC_DISABLE_EXT", "1")
    monkeypatch.setattr(ext, "_status", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabling is silent
        assert not ext.supports("cpu")
    assert "EMLOC_DISABLE_EXT" in ext.status().reason
    w = torch.randn(9, 70)
    p = quantize(w, "int4", 64)  # the torch reference takes over
    ref = quantize_reference(w, "int4", 64)
    assert torch.equal(p.qweight, ref.qweight) and torch.equal(dequantize(p), dequantize(ref))


def test_unbuildable_extension_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv("EMLOC_DISABLE_EXT", raising=False)
    monkeypatch.setattr(ext, "CSRC", tmp_path / "missing")
    monkeypatch.setattr(ext, "_status", None)
    with pytest.warns(RuntimeWarning, match="extension unavailable.*sources not found"):
        assert not ext.supports("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ext.supports("cpu")
        p = quantize(torch.randn(3, 5), "int8")
    assert p.qweight.shape == (3, 5)


# ---------------------------------------------------------------- the cache

# status() in a fresh process, reported as one line of JSON with the warnings it gave
PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import emloc_kernels.ext as e
    s = e.status()
print(json.dumps(dict(loaded=s.loaded, reason=s.reason, path=s.path, warnings=[str(w.message) for w in caught])))
"""


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EMLOC_DISABLE_EXT"}
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**env, "PYTHONPATH": pythonpath, "EMLOC_EXT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def probe(cache: Path, timeout: float, **env: str) -> dict:
    """Load the extension in a child process on ``cache``; fail, not hang, past ``timeout`` seconds."""
    with subprocess.Popen(
        [sys.executable, "-c", PROBE],
        env=child_env(cache, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its build, compilers included, is killed with it
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            pytest.fail(f"ext.status() still running after {timeout} s")
    assert child.returncode == 0, f"exit status {child.returncode}:\n{err[-3000:]}"  # -7: SIGBUS
    return json.loads(out.strip().splitlines()[-1])


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


def fake_compile(calls: list[Path]):
    """Stands in for ``ext._compile``: writes 4 KiB of noise as the library, and checks its folder."""

    def compile_(t: ext.Target, scratch: Path) -> Path:
        assert scratch.parent == t.root and scratch.name.startswith(f"{t.digest}.build-") and mode(scratch) == 0o700
        calls.append(scratch)
        library = scratch / f"{ext.NAME}.so"
        library.write_bytes(os.urandom(4096))
        return library

    return compile_


def test_cache_layout_modes_and_verification(monkeypatch, tmp_path):
    root = tmp_path / "home" / "cache"  # two folders to create
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    calls: list[Path] = []
    monkeypatch.setattr(ext, "_compile", fake_compile(calls))
    t = ext.target()
    assert ext.build() == t.library and len(calls) == 1
    assert mode(root.parent) == mode(root) == mode(t.directory) == 0o700 and mode(t.lock) == 0o600
    assert json.loads(t.record.read_text()) == {
        "size": 4096,
        "sha256": hashlib.sha256(t.library.read_bytes()).hexdigest(),
    }
    assert sorted(p.name for p in root.iterdir()) == sorted([t.digest, t.lock.name])  # the build folder is gone
    assert sorted(p.name for p in t.directory.iterdir()) == sorted([t.library.name, t.record.name])
    assert ext.build() == t.library and len(calls) == 1  # verified: used as is

    os.truncate(t.library, 1000)  # a copy cut short (killed, disk full): rebuilt, never returned
    assert ext.build() == t.library and len(calls) == 2 and t.library.stat().st_size == 4096
    with open(t.library, "r+b") as f:  # same size, one byte changed
        f.seek(100)
        f.write(bytes([f.read(1)[0] ^ 1]))
    assert ext.build() == t.library and len(calls) == 3
    t.record.unlink()  # a library without its record, as the earlier layout left it
    assert ext.build() == t.library and len(calls) == 4 and t.record.is_file()


def test_lock_file_is_not_followed_through_a_symlink(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    calls: list[Path] = []
    monkeypatch.setattr(ext, "_compile", fake_compile(calls))
    t = ext.target()
    victim = tmp_path / "victim"
    t.lock.symlink_to(victim)
    with pytest.raises(OSError) as raised:
        ext.build()
    assert raised.value.errno == errno.ELOOP and not victim.exists() and not calls
    victim.write_text("keep")
    with pytest.raises(OSError):
        ext.build()
    assert victim.read_text() == "keep" and not calls


def test_wait_for_the_lock_is_bounded(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    t = ext.target()
    fd = os.open(t.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a process that is building
    try:
        start = time.monotonic()
        got = probe(root, timeout=60, EMLOC_EXT_LOCK_TIMEOUT="1")
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
    assert not got["loaded"] and got["reason"].startswith("TimeoutError") and str(t.lock) in got["reason"]
    [warning] = got["warnings"]
    assert "using the torch implementation" in warning and str(t.lock) in warning
    assert not t.directory.exists() and not list(root.glob("*.build-*"))  # it gave up before building
    print(f"fell back after {elapsed:.1f} s (1 s of it waiting)")


@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja, and EMLOC_DISABLE_EXT unset")
def test_failed_build_publishes_nothing(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    monkeypatch.setattr(ext, "cuda_home", lambda: None)  # no nvcc: fail fast, in the C++ build
    monkeypatch.setattr(ext, "CXX_FLAGS", [*ext.CXX_FLAGS, "-fno-such-flag"])
    t = ext.target()
    with pytest.raises(RuntimeError, match="(?s)building the extension failed.*-fno-such-flag"):
        ext.build()
    assert sorted(p.name for p in root.iterdir()) == [t.lock.name]  # no library, no build folder


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache root holding a verified build, copied from this process's cache (built at import)."""
    if not ext.available():
        pytest.skip(f"C++ extension not loaded ({ext.status().reason})")
    t = ext.target()
    root = tmp_path_factory.mktemp("cache")
    (root / t.digest).mkdir(mode=0o700)
    for f in (t.library, t.record):
        shutil.copy2(f, root / t.digest / f.name)
    return root


@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja, and EMLOC_DISABLE_EXT unset")
def test_truncated_library_is_rebuilt_not_loaded(built_cache, monkeypatch, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(built_cache, root)
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    t = ext.target()
    size = t.library.stat().st_size
    os.truncate(t.library, size // 2)  # mapped by dlopen, this kills the process with SIGBUS
    got = probe(root, timeout=300)
    assert got["loaded"] and got["path"] == str(t.library) and not got["warnings"], got
    assert t.library.stat().st_size == size and ext._verified(t)


@pytest.mark.skipif(not can_build, reason="needs a C++ compiler and ninja, and EMLOC_DISABLE_EXT unset")
def test_killed_build_does_not_block_the_next(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("EMLOC_EXT_CACHE", str(root))
    t = ext.target()
    with subprocess.Popen(
        [sys.executable, "-c", PROBE], env=child_env(root), stdout=subprocess.DEVNULL, start_new_session=True
    ) as first:
        try:
            deadline = time.monotonic() + 120
            while not list(root.glob(f"{t.digest}.build-*/lock")):  # torch's baton: ninja is running
                assert first.poll() is None and time.monotonic() < deadline, "the build never reached ninja"
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the build, its flock holder and compilers at once
                os.killpg(first.pid, signal.SIGKILL)
    assert list(root.glob(f"{t.digest}.build-*/lock"))  # the baton outlives its owner
    t.directory.mkdir(mode=0o700)
    (t.directory / "lock").touch()  # and the one the earlier layout left, building in place
    start = time.monotonic()
    got = probe(root, timeout=300)
    assert got["loaded"] and got["path"] == str(t.library) and not got["warnings"], got
    assert not list(root.glob("*.build-*")) and not (t.directory / "lock").exists()
    print(f"next build and load: {time.monotonic() - start:.0f} s")


@needs_ext
def test_ops_reject_bad_arguments():
    lib = torch.ops.emloc_ext
    w = torch.randn(8, 100)
    with pytest.raises(RuntimeError, match="group_size must be 64 or 128, got 32"):
        lib.quantize_int4(w, 32)
    with pytest.raises(RuntimeError, match="w dtype must be float32, float16 or bfloat16"):
        lib.quantize_int8(w.double())
    with pytest.raises(RuntimeError, match="non-empty 2-D"):
        lib.quantize_int8(w[0])
    q, s, o = lib.quantize_int4(w, 64)
    with pytest.raises(RuntimeError, match=r"qweight must be Byte of sizes \[8, 64\]"):
        lib.dequantize_int4(q[:, :40], s, o, 64, 100)
    with pytest.raises(RuntimeError, match=r"offset must be Float of sizes \[8, 2\]"):
        lib.dequantize_int4(q, s, o.half(), 64, 100)
    q8, s8 = lib.quantize_int8(w)
    with pytest.raises(RuntimeError, match=r"scale must be Float of sizes \[8, 1\]"):
        lib.dequantize_int8(q8, s8[:4])


@needs_ext
def test_ops_propagate_shapes_on_meta():
    lib = torch.ops.emloc_ext
    w = torch.empty(70, 150, dtype=torch.bfloat16, device="meta")
    q, s, o = lib.quantize_int4(w, 64)
    assert (q.shape, s.shape, o.shape) == ((70, 96), (70, 3), (70, 3))
    assert q.dtype == torch.uint8 and s.dtype == o.dtype == torch.bfloat16 and q.is_meta
    out = lib.dequantize_int4(q, s, o, 64, 150)
    assert out.shape == (70, 150) and out.dtype == torch.bfloat16 and out.is_meta
    q8, s8 = lib.quantize_int8(w)
    assert q8.shape == (70, 150) and s8.shape == (70, 1) and lib.dequantize_int8(q8, s8).shape == (70, 150)


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (37, 201), (4099, 1030)])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 64), ("int4", 128)], ids=["int8", "int4-g64", "int4-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_cpu(dtype, fmt, group, shape):
    assert ext.supports("cuda"), ext.status()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    w[0, : min(shape[1], 70)] = 0.5  # a constant / partly constant group
    w = w.to(dtype)
    a, b = quantize(w, fmt, group), quantize(w.cuda(), fmt, group)
    for name in ("qweight", "scale", "offset"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y.cpu()), name
    assert torch.equal(dequantize(a), dequantize(b).cpu())
    # the torch reference run on the GPU may round a scale differently in its last bit (CUDA
    # contracts multiply-adds), so it is held to the format's error bound rather than to bits
    ref = quantize_reference(w.cuda(), fmt, group)
    err = (dequant64(ref) - w.double().cuda()).abs()
    assert bool((err <= elem_scale(ref) * (0.5 + 2**-16)).all())


@pytest.mark.cuda
@needs_cuda
def test_cuda_ops_use_current_stream_and_non_contiguous_input():
    assert ext.supports("cuda"), ext.status()
    w = torch.randn(300, 515, device="cuda", dtype=torch.bfloat16).t()  # 515×300, non-contiguous
    expected = quantize(w.cpu(), "int4", 64)
    p = quantize(w, "int4", 64)
    assert torch.equal(p.qweight.cpu(), expected.qweight)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        p.scale.mul_(2)  # queued behind the sleep: a kernel on another stream would miss it
        out = dequantize(p)
    stream.synchronize()
    expected.scale.mul_(2)
    assert torch.equal(out.cpu(), dequantize(expected))
