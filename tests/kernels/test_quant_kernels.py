"""lowrank_lora with packed (int8 / int4) emulator factors: the kernels dequantise in the
tile loop; the expected result is dequantize_reference followed by the fp64 float reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emloc_kernels import ops
from emloc_kernels.ops.quant import PackedFactor, dequantize_reference

from kernel_utils import DEVICES, rel_err, strided, tol


def random_packed(n: int, k: int, fmt: str, group: int, dtype: torch.dtype, g: torch.Generator) -> PackedFactor:
    """A random factor in the ops/quant.py layout (values need not come from a real matrix)."""
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = (torch.rand(n, 1, generator=g) + 0.5) / (127 * k**0.5)
        return PackedFactor(q, scale.to(dtype), None, "int8", (n, k))
    kp = -(-k // group) * group
    q = torch.randint(0, 256, (n, kp // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, kp // group, generator=g) + 0.5) / (8 * k**0.5)
    offset = -7.5 * scale + torch.randn(n, kp // group, generator=g) * 0.1 / k**0.5
    return PackedFactor(q, scale.to(dtype), offset.to(dtype), "int4", (n, k), group)


def _to(p: PackedFactor, device: str) -> PackedFactor:
    off = None if p.offset is None else p.offset.to(device)
    return PackedFactor(p.qweight.to(device), p.scale.to(device), off, p.fmt, p.shape, p.group_size)


# (x dtype, u format, v format, group size, lead shape of x, in, out, r, x strided).  Under the
# interpreter M = 3 takes int4's decode form (scale after the dot), M = 18 its tile form.
CASES = [
    (torch.bfloat16, "int8", "int8", 0, (2, 9), 150, 37, 70, False),
    (torch.float16, "int4", "int4", 64, (3,), 150, 37, 130, False),
    (torch.bfloat16, None, "int4", 128, (2, 9), 150, 45, 23, True),
    (torch.float16, "int4", "int8", 128, (3,), 70, 140, 37, True),
    (torch.float32, "int4", "int4", 64, (2, 9), 100, 37, 45, False),
    (torch.float32, "int8", "int8", 0, (3,), 150, 37, 70, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{str(c[0])[6:]}-u_{c[1]}-v_{c[2]}-g{c[3]}-M{c[4]}{'-strided' if c[8] else ''}"
)
def test_packed_factors_match_dequantised_reference(device, case):
    dt, ufmt, vfmt, group, lead, n_in, n_out, r, strd = case
    g = torch.Generator().manual_seed(5)
    u = random_packed(n_out, r, ufmt, group, dt, g) if ufmt else (torch.randn(n_out, r, generator=g) / r**0.5).to(dt)
    v = random_packed(r, n_in, vfmt, group, dt, g)
    x = torch.randn(*lead, n_in, generator=g).to(device=device, dtype=dt)
    x = (strided(x) if strd else x).requires_grad_()
    a = (torch.randn(5, n_in, generator=g) / n_in**0.5).to(device).requires_grad_()
    b = torch.randn(n_out, 5, generator=g).to(device).requires_grad_()
    u = _to(u, device) if ufmt else u.to(device)
    v = _to(v, device)

    y = ops.lowrank_lora(x, u, v, a, b, 0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dt)
    got = torch.autograd.grad(y, (x, a, b), dy)

    u64 = (dequantize_reference(u) if ufmt else u).double()
    v64 = dequantize_reference(v).double()
    ins = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y64 = ops.lowrank_lora_reference(ins[0], u64, v64, ins[1], ins[2], 0.5)
    want = torch.autograd.grad(y64, ins, dy.double())
    assert rel_err(y, y64) < tol(dt, device)
    for name, gv, wv in zip("x a b".split(), got, want):
        assert rel_err(gv, wv) < tol(dt, device), name


def _decode_x(layout: str, n: int, g: torch.Generator) -> torch.Tensor:
    if layout == "x2d":
        return torch.randn(1, n, generator=g)
    if layout == "x3d":
        return torch.randn(2, 1, n, generator=g)
    if layout == "x3d-strided":  # rows a view makes a matrix of
        return torch.randn(2, 1, 2 * n, generator=g)[..., ::2]
    return torch.randn(3, 2, n, generator=g).transpose(0, 1)  # rows only a copy makes a matrix of


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, group", [(None, 0), ("int8", 0), ("int4", 64)], ids=["float", "int8", "int4-g64"])
@pytest.mark.parametrize("layout", ["x2d", "x3d", "x3d-strided", "x3d-transposed"])
def test_decode_calls_replay_exactly(device, fmt, group, layout, launches, monkeypatch):
    """A layer's inference calls after the first replay its launches (nothing planned, no views
    of the factors made); each replayed call on a fresh x matches the fp64 reference."""
    import importlib

    from emloc_kernels.ops import _triton_gemm

    monkeypatch.setattr(importlib.import_module("emloc_kernels.ops.lowrank_lora"), "_REPLAYS", {})
    prepared: list[int] = []
    for name in ("prepare_2k", "prepare_2n"):
        real = getattr(_triton_gemm, name)
        monkeypatch.setattr(_triton_gemm, name, lambda *a, _r=real: prepared.append(1) or _r(*a))
    g = torch.Generator().manual_seed(3)
    n_in, n_out, r, dt = 150, 37, 45, torch.float16
    if fmt is None:
        u = (torch.randn(n_out, r, generator=g) / r**0.5).to(device, dt)
        v = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(device, dt)
    else:
        u, v = (_to(random_packed(n, k, fmt, group, dt, g), device) for n, k in ((n_out, r), (r, n_in)))
    a = torch.nn.Parameter((torch.randn(5, n_in, generator=g) / n_in**0.5).to(device))
    b = torch.nn.Parameter(torch.randn(n_out, 5, generator=g).to(device))
    bias = torch.randn(n_out, generator=g).to(device, dt)
    f64 = (lambda f: dequantize_reference(f).double()) if fmt else (lambda f: f.double())
    counts = []
    for _ in range(3):
        x = _decode_x(layout, n_in, g).to(device, dt)
        before = len(prepared)
        with torch.no_grad():
            y = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
        counts.append(len(prepared) - before)
        want = ops.lowrank_lora_reference(x.double(), f64(u), f64(v), a.double(), b.double(), 0.5, bias.double())
        assert y.shape == (*x.shape[:-1], n_out) and rel_err(y, want) < tol(dt, device)
    assert counts == [2, 0, 0]


def test_packed_factor_is_frozen():
    v = random_packed(8, 16, "int8", 0, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.fmt = "int3"


def test_packed_factor_bad_format_is_named():
    v = random_packed(8, 16, "int8", 0, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"format must be one of \('int8', 'int4'\), got 'int3'"):
        dataclasses.replace(v, fmt="int3")


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 300], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 64), ("int4", 128)])
def test_packed_gpu_launch_classes(m, fmt, group):
    """Packed factors through the decode (split-K) and middle launch configurations."""
    g = torch.Generator().manual_seed(8)
    n_in, n_out, r = 1000, 1500, 333
    u = _to(random_packed(n_out, r, fmt, group, torch.bfloat16, g), "cuda")
    v = _to(random_packed(r, n_in, fmt, group, torch.bfloat16, g), "cuda")
    x = torch.randn(m, n_in, generator=g).to("cuda", torch.bfloat16)
    y = ops.lowrank_lora(x, u, v)
    want = ops.lowrank_lora_reference(x.double(), dequantize_reference(u).double(), dequantize_reference(v).double())
    assert rel_err(y, want) < tol(torch.bfloat16, "cuda")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("qweight", lambda p: p.qweight[:, :-1], r"qweight of a int4 8×100 factor .* must be torch.uint8 \(8, 64\)"),
        ("scale", lambda p: p.scale[:, :1], r"scale of a int4 8×100 factor .* must be torch.float32 \(8, 2\)"),
        ("offset", lambda p: None, r"offset must be a tensor for int4"),
        ("group_size", lambda p: 32, r"group_size must be one of \(64, 128\)"),
    ],
)
def test_packed_layout_errors_are_named(field, value, match):
    """A factor is checked when it is made (it is immutable), so the kernels never see a bad layout."""
    v = random_packed(8, 100, "int4", 64, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(v, **{field: value(v)})
