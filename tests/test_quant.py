"""Quantised factors (ops/quant.py) and QuantLowRankLinear (modules/quantized.py)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from emloc_kernels import ext
from emloc_kernels.modules.lowrank import LowRankLinear
from emloc_kernels.modules.quantized import QuantLowRankLinear
from emloc_kernels.ops.quant import (
    PackedFactor,
    dequantize,
    dequantize_reference,
    quantize,
    quantize_reference,
)
from emloc_kernels.ops.reference import lowrank_lora_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMATS = (("int8", 0), ("int4", 64), ("int4", 128))
FMT_IDS = ["int8", "int4-g64", "int4-g128"]
KINDS = ("randn", "special", "large", "tiny")
# forward/backward tolerance against fp64 (the same dequantised factors): per compute dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_w(kind: str, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random N×K test factors; 'special' adds zero rows, constant groups, exact rounding ties
    and an outlier; 'large'/'tiny' push towards the dtype's range limits."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "special":
        w[0] = 0.0
        if n > 1:
            w[1, : min(k, 64)] = 0.37
        if n > 2:
            w[2] = -1.25
        if n > 3:
            w[3, 0] = 1e3  # one outlier dominates the row / group scale
        if n > 4:
            w[4] = torch.arange(k) % 128 * 0.5  # ties: x.5 quotients for int8 when the max is 63.5
    elif kind == "large":
        big = {torch.float16: 6e4, torch.bfloat16: 1e38, torch.float32: 1e38}[dtype]
        w = (torch.rand(n, k, generator=g) * 2 - 1) * big
    elif kind == "tiny":
        w = w * (1e-6 if dtype == torch.float16 else 1e-30)
    return w.to(dtype)


def dequant64(p: PackedFactor) -> torch.Tensor:
    """Exact (fp64) value of the packed grid, to check error bounds without fp32 rounding."""
    n, k = p.shape
    if p.fmt == "int8":
        return p.qweight.double() * p.scale.double()
    nib = torch.stack((p.qweight & 0xF, p.qweight >> 4), dim=-1).reshape(n, -1).double()
    per_elem = lambda t: t.double().repeat_interleave(p.group_size, dim=1)  # noqa: E731
    return (nib * per_elem(p.scale) + per_elem(p.offset))[:, :k]


def elem_scale(p: PackedFactor) -> torch.Tensor:
    if p.fmt == "int8":
        return p.scale.double().expand(p.shape)
    return p.scale.double().repeat_interleave(p.group_size, dim=1)[:, : p.shape[1]]


def assert_packed_equal(a: PackedFactor, b: PackedFactor) -> None:
    assert (a.fmt, a.shape, a.group_size) == (b.fmt, b.shape, b.group_size)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale, b.scale)
    assert (a.offset is None and b.offset is None) or torch.equal(a.offset, b.offset)


needs_ext = pytest.mark.skipif(not ext.supports("cpu"), reason="C++ extension not loaded (see ext.status())")


# ---------------------------------------------------------------- formats and ops


@needs_ext
@pytest.mark.parametrize("shape", [(37, 201), (5, 64), (1, 1), (130, 129)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extension_cpu_matches_reference(dtype, fmt, group, kind, shape):
    w = make_w(kind, *shape, dtype)
    p = quantize(w, fmt, group)  # the extension's C++ op on CPU
    assert_packed_equal(p, quantize_reference(w, fmt, group))
    out = dequantize(p)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, dequantize_reference(p))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(dtype, fmt, group, kind):
    w = make_w(kind, 23, 300, dtype, seed=1)
    p = quantize(w, fmt, group)
    s = elem_scale(p)
    # the grid value itself: |w − q·s (+ offset)| ≤ s/2, up to fp32 rounding of the quotient
    err = (dequant64(p) - w.double()).abs()
    assert (err <= s * (0.5 + 2**-16)).all(), (err / s).max()
    # the dequantised tensor adds one rounding to the dtype (half an ulp, subnormals included)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    err = (dequantize(p).double() - w.double()).abs()
    assert (err <= s * (0.5 + 2**-16) + eps * (w.double().abs() + s + tiny)).all()


@pytest.mark.parametrize("impl", ["dispatch", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_and_constant_groups_are_exact(dtype, impl):
    q = quantize if impl == "dispatch" else quantize_reference
    w = make_w("randn", 6, 200, dtype)
    w[0] = 0
    w[1, 64:128] = -3.5
    w[2, 192:] = 0  # the last group: 8 zeros and 56 of padding
    p8, p4 = q(w, "int8", 0), q(w, "int4", 64)
    assert (p8.qweight[0] == 0).all() and p8.scale[0, 0] == 0 and (dequantize(p8)[0] == 0).all()
    assert p4.scale[1, 1] == 0 and (dequantize(p4)[1, 64:128] == -3.5).all()
    assert (dequantize(p4)[0] == 0).all()
    assert p4.scale[2, 3] == 0 and (dequantize(p4)[2, 192:] == 0).all()


@pytest.mark.parametrize("impl", ["dispatch", "reference"])
def test_packed_layout_by_hand(impl):
    q = quantize if impl == "dispatch" else quantize_reference
    # int4: values 0..15 → scale 1, offset 0, element 2j in the low nibble of byte j
    w = torch.arange(16, dtype=torch.float32)[None] * torch.tensor([[1.0], [-2.0]])
    p = q(w, "int4", 64)
    assert p.qweight.shape == (2, 32) and p.scale.shape == p.offset.shape == (2, 1)
    assert p.qweight[0, :8].tolist() == [j * 2 | (j * 2 + 1) << 4 for j in range(8)]
    assert (p.qweight[0, 8:] == 0).all()  # padding: zeros, at offset 0
    assert p.scale[0, 0] == 1 and p.offset[0, 0] == 0
    assert p.scale[1, 0] == 2 and p.offset[1, 0] == -30  # row −2·k: nibble = 15 − k
    assert p.qweight[1, 0] == 15 | 14 << 4
    # int8: scale = amax / 127; quotients 63.5 and 0.5 round half to even
    p = q(torch.tensor([[-254.0, 127.0, 1.0, 3.0]]), "int8", 0)
    assert p.scale.item() == 2 and p.qweight.tolist() == [[-127, 64, 0, 2]]


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
def test_non_contiguous_input(fmt, group):
    base = make_w("randn", 150, 90, torch.bfloat16)
    w = base.t()[:, ::2]  # 90×75, strided both ways
    assert not w.is_contiguous()
    assert_packed_equal(quantize(w, fmt, group), quantize(w.contiguous(), fmt, group))
    assert_packed_equal(quantize_reference(w, fmt, group), quantize(w.contiguous(), fmt, group))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda w: quantize(w, "int3"), ValueError, r"one of \('int8', 'int4'\)"),
        (lambda w: quantize(w, "int4", 32), ValueError, r"group_size must be one of \(64, 128\)"),
        (lambda w: quantize(w.double(), "int8"), TypeError, "dtype must be one of"),
        (lambda w: quantize(w.to(torch.int32), "int8"), TypeError, "dtype must be one of"),
        (lambda w: quantize(w[0], "int8"), ValueError, "2-D"),
        (lambda w: quantize(w[:0], "int4"), ValueError, "non-empty"),
        (lambda w: quantize(w.index_fill(1, torch.tensor([3]), float("nan")), "int8"), ValueError, "finite"),
        (lambda w: quantize(w.index_fill(1, torch.tensor([3]), float("inf")), "int4"), ValueError, "finite"),
    ],
)
def test_quantize_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(make_w("randn", 4, 10, torch.float32))


@pytest.mark.parametrize(
    "w,fmt",
    [
        (torch.tensor([[65504.0, 1.0]], dtype=torch.float16), "int8"),  # 127·scale rounds past fp16 max
        (torch.tensor([[65504.0, -65504.0]], dtype=torch.float16), "int4"),
        (torch.tensor([[3e38, -3e38]], dtype=torch.float32), "int4"),  # max − min overflows fp32
    ],
)
def test_quantize_rejects_overflowing_range(w, fmt):
    with pytest.raises(ValueError, match="overflows"):
        quantize(w, fmt, 64)


def test_packed_factor_checks_layout():
    p = quantize_reference(make_w("randn", 8, 100, torch.float16), "int4", 64)
    with pytest.raises(ValueError, match=r"qweight .* must be torch.uint8 \(8, 64\)"):
        PackedFactor(p.qweight[:, :50], p.scale, p.offset, "int4", (8, 100), 64)
    with pytest.raises(ValueError, match="offset of a int4"):
        PackedFactor(p.qweight, p.scale, p.offset[:, :1], "int4", (8, 100), 64)
    with pytest.raises(ValueError, match="offset must be a tensor"):
        PackedFactor(p.qweight, p.scale, None, "int4", (8, 100), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        PackedFactor(p.qweight, p.scale, p.offset, "int4", (8, 100), 0)
    with pytest.raises(TypeError, match="scale dtype"):
        PackedFactor(p.qweight, p.scale.double(), p.offset, "int4", (8, 100), 64)
    p8 = quantize_reference(make_w("randn", 8, 100, torch.float16), "int8")
    with pytest.raises(ValueError, match="offset must be None"):
        PackedFactor(p8.qweight, p8.scale, p8.scale, "int8", (8, 100))
    with pytest.raises(ValueError, match="qweight .* must be torch.int8"):
        PackedFactor(p8.qweight.view(torch.uint8), p8.scale, None, "int8", (8, 100))


# ---------------------------------------------------------------- the module


def float_layer(dtype=torch.float32, in_f=150, out_f=70, rank=33, bias=True, seed=0) -> LowRankLinear:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(out_f, rank, generator=g) / rank**0.5
    v = torch.randn(rank, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    return LowRankLinear.from_factors(u.to(dtype), v.to(dtype), None if b is None else b.to(dtype))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_match_fp64(dtype, fmt, group):
    layer = QuantLowRankLinear.from_lowrank(float_layer(dtype), fmt, group)
    layer.bias.requires_grad_()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 300, generator=g).to(dtype)[..., ::2].requires_grad_()  # non-contiguous, 2×9×150
    dy = torch.randn(2, 9, 70, generator=g).to(dtype)
    y = layer(x)
    y.backward(dy)
    u64, v64 = dequantize(layer.u_packed).double(), dequantize(layer.v_packed).double()
    x64 = x.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = lowrank_lora_reference(x64, u64, v64, bias=b64)
    y64.backward(dy.double())
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.bias.grad.double(), b64.grad, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("fmt,group,bound", [("int8", 0, 0.02), ("int4", 64, 0.2), ("int4", 128, 0.2)])
def test_quantised_forward_close_to_float_layer(fmt, group, bound):
    # Gaussian factors: int8 per row keeps ~0.5% of relative error, int4 ~10%
    ref = float_layer()
    layer = QuantLowRankLinear.from_lowrank(ref, fmt, group)
    x = torch.randn(64, 150, generator=torch.Generator().manual_seed(5))
    y_ref = x.double() @ ref.dense_weight(torch.float64).T
    rel = lambda y: ((y.double() - y_ref).norm() / y_ref.norm()).item()  # noqa: E731
    assert rel(layer(x) - layer.bias) < bound
    assert rel(x @ layer.dense_weight().T) < bound
    torch.testing.assert_close(
        layer.dense_weight(torch.float64),
        dequantize(layer.u_packed).double() @ dequantize(layer.v_packed).double(),
    )


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
def test_module_holds_only_packed_buffers(fmt, group):
    layer = QuantLowRankLinear.from_lowrank(float_layer(torch.bfloat16), fmt, group)
    assert isinstance(layer, LowRankLinear) and isinstance(layer, nn.Linear)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert not hasattr(layer, "u") and not hasattr(layer, "v")
    parts = ["qweight", "scale"] + (["offset"] if fmt == "int4" else [])
    assert sorted(layer.state_dict()) == sorted(["bias"] + [f"{f}_{p}" for f in "uv" for p in parts])
    w = layer.weight
    assert w.numel() == 0 and w.dtype == torch.bfloat16 and w.device == layer.bias.device
    assert layer.u_packed.shape == (70, 33) and layer.v_packed.shape == (33, 150)
    assert f"quant={fmt}" in repr(layer)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FMT_IDS)
def test_state_dict_round_trip(fmt, group, bias):
    layer = QuantLowRankLinear.from_lowrank(float_layer(torch.float16, bias=bias), fmt, group)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLowRankLinear(150, 70, 33, bias, quant=fmt, group_size=group or 128, dtype=torch.float16)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    x = torch.randn(5, 150, dtype=torch.float16)
    assert torch.equal(fresh(x), layer(x))


def test_weight_bytes_exact():
    fp16 = 2
    int8 = QuantLowRankLinear(150, 70, 33, quant="int8", dtype=torch.float16)
    # u 70×33, v 33×150: one byte per value, one fp16 scale per row, fp16 bias
    assert int8.weight_bytes() == 70 * 33 + 70 * fp16 + 33 * 150 + 33 * fp16 + 70 * fp16
    int4 = QuantLowRankLinear(150, 70, 33, bias=False, quant="int4", group_size=64, dtype=torch.float16)
    # K padded to 64 (u) and 192 (v); half a byte per value; scale + offset per group of 64
    assert int4.weight_bytes() == 70 * 64 // 2 + 2 * 70 * 1 * fp16 + 33 * 192 // 2 + 2 * 33 * 3 * fp16
    dense = 150 * 70 * fp16
    assert int4.weight_bytes() < int8.weight_bytes() < dense


def test_load_rejects_wrong_layout():
    src = QuantLowRankLinear.from_lowrank(float_layer(), "int4", 64)
    with pytest.raises(RuntimeError, match="size mismatch for v_qweight"):
        QuantLowRankLinear(150, 70, 33, quant="int4", group_size=128).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for u_qweight"):
        QuantLowRankLinear(150, 70, 70, quant="int4", group_size=64).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*u_offset"):
        QuantLowRankLinear(150, 70, 33, quant="int8").load_state_dict(src.state_dict())
    sd = QuantLowRankLinear.from_lowrank(float_layer(), "int8").state_dict()
    sd["u_qweight"] = sd["u_qweight"].view(torch.uint8)
    with pytest.raises(RuntimeError, match="u_qweight: this int8 layer stores torch.int8"):
        QuantLowRankLinear(150, 70, 33, quant="int8").load_state_dict(sd)


def test_constructor_and_from_lowrank_reject_bad_arguments():
    with pytest.raises(ValueError, match="format must be one of"):
        QuantLowRankLinear(10, 10, 4, quant="fp8")
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantLowRankLinear(10, 10, 4, quant="int4", group_size=96)
    with pytest.raises(TypeError, match="dtype must be one of"):
        QuantLowRankLinear(10, 10, 4, quant="int8", dtype=torch.float64)
    with pytest.raises(ValueError, match="rank must be in"):
        QuantLowRankLinear(10, 10, 11, quant="int8")
    q = QuantLowRankLinear.from_lowrank(float_layer(), "int8")
    with pytest.raises(TypeError, match="float LowRankLinear"):
        QuantLowRankLinear.from_lowrank(q, "int4")
    with pytest.raises(TypeError, match="float LowRankLinear"):
        QuantLowRankLinear.from_lowrank(nn.Linear(4, 4), "int4")


def test_to_dtype_converts_scales_only():
    layer = QuantLowRankLinear.from_lowrank(float_layer(), "int4", 128).to(torch.bfloat16)
    assert layer.u_qweight.dtype == torch.uint8 and layer.u_scale.dtype == torch.bfloat16
    assert layer.v_offset.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, 150, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_peft_wraps_quantised_layer():
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("proj", QuantLowRankLinear.from_lowrank(float_layer(), "int4", 64))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    x = torch.randn(3, 150)
    lora = model.base_model.model.proj
    expected = lora.base_layer(x) + 2.0 * lora.lora_B["default"](lora.lora_A["default"](x))
    y = model(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if "lora_" in n}
