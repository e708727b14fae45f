"""The C++/CUDA extension: build, cache, fallback, and the CUDA kernels against the CPU code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
