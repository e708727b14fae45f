"""lowrank_lora / dense_lora: forward and every gradient against an fp64 reference."""

from __future__ import annotations

import pytest
import torch

from emloc_kernels import LowRankLinear, ops
from emloc_kernels.ops import dense_lora_reference, gemm, lowrank_lora_reference

from kernel_utils import DEVICES, INTERPRET, kernels_ran, rel_err, strided, tol

# (lead shape of x, in, out, emulator rank r, LoRA rank ρ); no size is a block multiple.
# "decode" has M = 3 and long reductions, so the split-K path runs (see test_split_k_is_exercised).
SHAPES = {"train": ((2, 19), 70, 45, 23, 5), "decode": ((3,), 150, 37, 130, 1)}

# (x dtype, LoRA dtype or None, bias, strided inputs, shape)
CASES = [
    (torch.float32, torch.float32, True, False, "train"),
    (torch.bfloat16, torch.float32, True, True, "train"),
    (torch.bfloat16, torch.bfloat16, False, False, "decode"),
    (torch.float16, torch.float16, True, True, "decode"),
    (torch.float16, torch.float32, False, False, "train"),
    (torch.float32, None, True, True, "decode"),
    (torch.bfloat16, None, False, False, "train"),
]


def _ids(case):
    dt, ldt, bias, strd, shape = case
    return f"{str(dt)[6:]}-lora_{str(ldt)[6:] if ldt else 'none'}-{'bias' if bias else 'nobias'}-{'strided' if strd else 'contig'}-{shape}"


def _inputs(device, dt, ldt, with_bias, strd, shape, dense=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead, n_in, n_out, r, rho = SHAPES[shape]
    rnd = lambda *s, dtype=dt, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    t = {"x": rnd(*lead, n_in)}
    if dense:
        t["weight"] = rnd(n_out, n_in, scale=n_in**-0.5)
    else:
        t["u"], t["v"] = rnd(n_out, r, scale=r**-0.5), rnd(r, n_in, scale=n_in**-0.5)
    if ldt is not None:
        t["lora_a"], t["lora_b"] = rnd(rho, n_in, dtype=ldt, scale=n_in**-0.5), rnd(n_out, rho, dtype=ldt)
    if with_bias:
        t["bias"] = rnd(n_out)
    if strd:
        t = {k: strided(v) for k, v in t.items()}
    grads = [k for k in ("x", "lora_a", "lora_b", "bias") if k in t]
    for k in grads:
        t[k].requires_grad_(True)
    return t, grads


def _check_against_fp64(fn, ref, t, grads, dt, device, scaling):
    y = fn(**t, scaling=scaling)
    assert y.dtype == dt and y.shape == (*t["x"].shape[:-1], (t.get("u") if "u" in t else t["weight"]).shape[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dt)
    got = torch.autograd.grad(y, [t[k] for k in grads], dy)
    t64 = {k: v.detach().double().requires_grad_(k in grads) for k, v in t.items()}
    y64 = ref(**t64, scaling=scaling)
    want = torch.autograd.grad(y64, [t64[k] for k in grads], dy.double())
    bound = tol(dt, device)
    assert rel_err(y, y64) < bound, ("y", rel_err(y, y64))
    for k, gv, wv in zip(grads, got, want):
        assert gv.dtype == t[k].dtype and gv.shape == t[k].shape
        assert rel_err(gv, wv) < bound, (k, rel_err(gv, wv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_lowrank_lora_matches_fp64(device, case):
    dt, ldt, with_bias, strd, shape = case
    t, grads = _inputs(device, dt, ldt, with_bias, strd, shape)
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, grads, dt, device, scaling=0.75)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_ids)
def test_zero_scaling(device, case):
    """scaling = 0: the expand drops the LoRA segment (its kernel divides by the scaling)."""
    dt, ldt, with_bias, strd, shape = case
    t, grads = _inputs(device, dt, ldt, with_bias, strd, shape)
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, grads, dt, device, scaling=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c[1] is not None][:4], ids=_ids)
def test_dense_lora_matches_fp64(device, case):
    dt, ldt, with_bias, strd, shape = case
    t, grads = _inputs(device, dt, ldt, with_bias, strd, shape, dense=True)
    _check_against_fp64(ops.dense_lora, dense_lora_reference, t, grads, dt, device, scaling=1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_without_dx(device):
    """x that needs no grad (first layer): the LoRA grads are still exact and dx is skipped."""
    t, _ = _inputs(device, torch.float32, torch.float32, True, False, "train")
    t["x"].requires_grad_(False)
    t["bias"].requires_grad_(False)
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, ["lora_a", "lora_b"], torch.float32, device, 2.0)


@pytest.mark.parametrize("device", ["cpu"])  # the interpreter's launch table; a GPU's has other blocks
def test_split_k_is_exercised(device, launches):
    """The decode shapes above launch both kernels split over K (observed at the launch)."""
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "decode")
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, grads, torch.float32, device, scaling=0.75)
    assert max(launches.split("_gemm_2n_kernel")) > 1  # shrink
    assert max(launches.split("_gemm_2k_kernel")) > 1  # expand


@pytest.mark.parametrize("device", DEVICES)
def test_split_k_counters_are_left_zero(device, launches):
    """Split-K launches share one persistent counter buffer: each must leave it zeroed, else the
    next launch never sees a tile's last partial arrive and leaves the tile unwritten (NaN)."""
    from emloc_kernels.ops import _triton_gemm

    t, grads = _inputs(device, torch.bfloat16, torch.bfloat16, False, False, "decode")
    with torch.no_grad():
        first = ops.lowrank_lora(**t, scaling=0.5)
        for _ in range(2):
            assert torch.equal(ops.lowrank_lora(**t, scaling=0.5), first)
    assert min(max(launches.split("_gemm_2n_kernel")), max(launches.split("_gemm_2k_kernel"))) > 1
    assert not torch.isnan(first).any()
    assert all(not buf.any() for buf in _triton_gemm._COUNTERS.values())


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_linear_module(device):
    """LowRankLinear.forward (no LoRA) equals (x vᵀ) uᵀ + b, and trains its bias."""
    g = torch.Generator().manual_seed(3)
    u, v, b = torch.randn(29, 7, generator=g), torch.randn(7, 33, generator=g), torch.randn(29, generator=g)
    layer = LowRankLinear.from_factors(u, v, b.requires_grad_()).to(device)
    x = torch.randn(2, 5, 33, generator=g).to(device)
    y = layer(x)
    y.square().sum().backward()
    x64, b64 = x.double(), b.detach().double().requires_grad_()
    y64 = (x64 @ v.double().t().to(device)) @ u.double().t().to(device) + b64.to(device)
    y64.square().sum().backward()
    assert rel_err(y, y64) < tol(torch.float32, device)
    assert rel_err(layer.bias.grad, b64.grad) < tol(torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_like_f_linear(device):
    """Under autocast fp32 inputs are cast to the autocast dtype, output in that dtype."""
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "train")
    dt = torch.bfloat16
    with torch.autocast(device, dtype=dt):
        y = ops.lowrank_lora(**t, scaling=0.5)
    assert y.dtype == dt
    cast = {k: v.detach().to(dt).double() for k, v in t.items()}
    assert rel_err(y, lowrank_lora_reference(**cast, scaling=0.5)) < tol(dt, device)
    y.float().sum().backward()
    assert all(t[k].grad is not None and t[k].grad.dtype == torch.float32 for k in grads)


def test_dispatch(monkeypatch):
    """CPU tensors run the kernels only under the interpreter; force_reference wins, and
    restores what was before."""
    assert kernels_ran("cpu") == INTERPRET
    with ops.force_reference():
        assert not kernels_ran("cpu")
        with ops.force_reference(False):
            assert kernels_ran("cpu") == INTERPRET
        assert not kernels_ran("cpu")
    assert kernels_ran("cpu") == INTERPRET
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gemm._interpreter.cache_clear()  # read once per process
    try:
        assert not kernels_ran("cpu")
    finally:
        gemm._interpreter.cache_clear()


def _good():
    t, _ = _inputs("cpu", torch.float32, torch.float32, True, False, "train")
    return {k: v.detach() for k, v in t.items()}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.update(x=t["x"].to(torch.float64)), "x must be a float32/float16/bfloat16"),
        (lambda t: t.update(x=t["x"][..., :-1]), "x's last dimension must be in_features=70"),
        (lambda t: t.update(v=t["v"][:-1]), r"v must have shape \(23, 70\)"),
        (lambda t: t.update(v=t["v"][0]), "v must be a 2-D tensor or PackedFactor"),
        (lambda t: t.update(u=t["u"].half()), "u must have x's dtype"),
        (lambda t: t.update(u=t["u"].clone().requires_grad_()), "u is a frozen factor.*shard with FSDP2"),
        (lambda t: t.pop("lora_b"), "lora_a and lora_b must be given together"),
        (lambda t: t.update(lora_b=t["lora_b"][:-1]), r"lora_b must have shape \(45, 5\)"),
        (lambda t: t.update(lora_a=t["lora_a"].double(), lora_b=t["lora_b"].double()), "float32 or x's"),
        (lambda t: t.update(bias=t["bias"][:3]), r"bias must be a \(45,\) tensor"),
        (lambda t: t.update(u="nope"), "u must be a 2-D tensor or PackedFactor"),
    ],
)
def test_bad_input_is_named(change, match):
    t = _good()
    change(t)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.lowrank_lora(**t)


def test_dense_bad_input_is_named():
    t, _ = _inputs("cpu", torch.float32, torch.float32, False, False, "train", dense=True)
    t = {k: v.detach() for k, v in t.items()}
    with pytest.raises(ValueError, match="weight is a frozen factor"):
        ops.dense_lora(**{**t, "weight": t["weight"].clone().requires_grad_()})
    with pytest.raises(ValueError, match="lora_a and lora_b are required"):
        ops.dense_lora(t["x"], t["weight"], None, None)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 300, 1100], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32], ids=lambda d: f"lora_{str(d)[6:]}")
def test_gpu_launch_classes(m, lora_dtype):
    """Decode, middle and training launch configurations (split-K included) on odd sizes."""
    g = torch.Generator().manual_seed(7)
    n_in, n_out, r, rho = 1000, 1500, 333, 16
    rnd = lambda *s, dt=torch.bfloat16, scale=1.0: (torch.randn(*s, generator=g) * scale).to("cuda", dt)  # noqa: E731
    t = {
        "x": rnd(m, n_in),
        "u": rnd(n_out, r, scale=r**-0.5),
        "v": rnd(r, n_in, scale=n_in**-0.5),
        "lora_a": rnd(rho, n_in, dt=lora_dtype, scale=n_in**-0.5),
        "lora_b": rnd(n_out, rho, dt=lora_dtype),
        "bias": rnd(n_out),
    }
    grads = ["x", "lora_a", "lora_b", "bias"]
    for k in grads:
        t[k].requires_grad_(True)
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, grads, torch.bfloat16, "cuda", scaling=2.0)
    dense = {k: v for k, v in t.items() if k not in ("u", "v")}
    dense["weight"] = (t["u"].float() @ t["v"].float()).bfloat16()
    _check_against_fp64(ops.dense_lora, dense_lora_reference, dense, grads, torch.bfloat16, "cuda", scaling=2.0)


def test_force_reference_from_the_environment():
    """A process started with EMLOC_FORCE_REFERENCE=1 runs every op on the reference, also
    under the interpreter."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from emloc_kernels import ops; from emloc_kernels.ops.gemm import use_triton\n"
        "assert not use_triton(torch.empty(1))\n"
        "with ops.force_reference(False):\n"
        "    assert use_triton(torch.empty(1))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "EMLOC_FORCE_REFERENCE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_replayed_layers_exit_quietly():
    """A process exits without "Exception ignored" noise when a replay outlives the op
    module's globals (cleared before ``__main__``'s): here the autograd graph of an output
    kept to the end holds it, and the bias, which the graph does not keep, dies first."""
    import os
    import subprocess
    import sys

    code = (
        "import importlib, torch; from emloc_kernels import ops\n"
        "module = importlib.import_module('emloc_kernels.ops.lowrank_lora')  # kept to the end too\n"
        "x, u, v, bias = torch.randn(2, 8), torch.randn(5, 3), torch.randn(3, 8), torch.randn(5)\n"
        "a, b = torch.nn.Parameter(torch.randn(2, 8)), torch.nn.Parameter(torch.randn(5, 2))\n"
        "# the second call replays the first; the graphs keep the replay, not the bias\n"
        "ys = [ops.lowrank_lora(x, u, v, a, b, bias=bias) for _ in range(2)]\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("EMLOC_FORCE_REFERENCE", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Exception ignored" not in res.stderr, res.stderr


def test_imports_and_falls_back_without_triton():
    """With triton missing the package imports and every device takes the torch reference."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from emloc_kernels import ops; from emloc_kernels.ops.gemm import use_triton\n"
        "assert not use_triton(torch.empty(1))\n"
        "x, u, v = torch.randn(3, 8), torch.randn(5, 2), torch.randn(2, 8)\n"
        "torch.testing.assert_close(ops.lowrank_lora(x, u, v), ops.lowrank_lora_reference(x, u, v))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.no_launch
@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(device, launches):
    """x with no rows: empty output, zero LoRA gradients, no launch on an empty grid."""
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "train")
    x = t["x"].detach()[:, :0].requires_grad_()
    y = ops.lowrank_lora(**{**t, "x": x})
    assert y.shape == (2, 0, 45)
    dx, da, db, dbias = torch.autograd.grad(y.sum(), [x, t["lora_a"], t["lora_b"], t["bias"]])
    assert dx.shape == x.shape and not da.any() and not db.any() and not dbias.any()
    assert launches.grids == []


def _nan_padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with rows padded to 16 elements of NaN (the layout ``ops.aligned_rows`` makes)."""
    cols = -(-t.shape[1] // 16) * 16
    out = torch.full((t.shape[0], cols), float("nan"), dtype=t.dtype, device=t.device)[:, : t.shape[1]]
    return out.copy_(t)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_never_leak(device):
    """Kernels may load a padded row's extra columns (vectorised loads); garbage there -- NaN
    here -- must never reach a stored element."""
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "train")
    t["u"], t["v"] = _nan_padded(t["u"]), _nan_padded(t["v"])
    t["x"] = _nan_padded(t["x"].detach().reshape(-1, 70)).reshape(2, 19, 70).requires_grad_()
    assert ops.aligned_rows(t["u"]).stride(0) % 16 == 0
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, grads, torch.float32, device, scaling=0.5)
    dense = {k: v for k, v in t.items() if k not in ("u", "v")}
    dense["weight"] = _nan_padded(t["u"] @ t["v"])
    _check_against_fp64(ops.dense_lora, dense_lora_reference, dense, grads, torch.float32, device, scaling=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_only_gradient(device):
    """Only the bias trains (LowRankLinear without LoRA on a frozen input): dbias = Σ dy."""
    t, _ = _inputs(device, torch.float32, None, True, False, "decode")
    t["x"].requires_grad_(False)
    _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, t, ["bias"], torch.float32, device, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_output_gradient(device):
    """``y.sum().backward()`` hands the backward a stride-0 (expanded) dy."""
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "train")
    got = torch.autograd.grad(ops.lowrank_lora(**t, scaling=0.5).sum(), [t[k] for k in grads])
    t64 = {k: v.detach().double().requires_grad_(k in grads) for k, v in t.items()}
    want = torch.autograd.grad(lowrank_lora_reference(**t64, scaling=0.5).sum(), [t64[k] for k in grads])
    for k, gv, wv in zip(grads, got, want):
        assert rel_err(gv, wv) < tol(torch.float32, device), k


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_replay_their_launches(device, launches, monkeypatch):
    """A layer's second call with the same tensors and input layout replays the launches the
    first call prepared (no planning), through the plain autograd.Function also when the LoRA
    factors are Parameters; a new input layout, an output gradient of another layout or a
    factor changed under ``.data`` prepares anew, and every result stays exact."""
    import importlib

    from emloc_kernels.ops import _triton_gemm

    prepared: list[str] = []
    for name in ("prepare_2k", "prepare_2n"):
        real = getattr(_triton_gemm, name)
        monkeypatch.setattr(_triton_gemm, name, lambda *a, _r=real, _n=name: prepared.append(_n) or _r(*a))
    mod = importlib.import_module("emloc_kernels.ops.lowrank_lora")
    monkeypatch.setattr(mod, "_REPLAYS", {})
    t, grads = _inputs(device, torch.float32, torch.float32, True, False, "train")
    t["lora_a"], t["lora_b"] = torch.nn.Parameter(t["lora_a"].detach()), torch.nn.Parameter(t["lora_b"].detach())

    def step(seed: int, **changed) -> int:
        """One checked fwd+bwd on fresh x; the number of launches it prepared."""
        before = len(prepared)
        fresh, _ = _inputs(device, torch.float32, None, False, False, "train", seed=seed)
        args = {**t, "x": fresh["x"].requires_grad_(), **changed}
        _check_against_fp64(ops.lowrank_lora, lowrank_lora_reference, args, grads, torch.float32, device, 0.75)
        return len(prepared) - before

    first = step(1)
    assert first == 6  # forward: shrink, expand; backward: shrink of dy, dx, dA, dB
    assert step(2) == 0 and step(3) == 0
    y = ops.lowrank_lora(**t, scaling=0.75)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LowRankLoraBackward"  # not the registered op
    before = len(prepared)
    y.sum().backward()  # dy expanded from a scalar: zero strides
    assert len(prepared) - before == 4
    assert step(4, x=strided(t["x"].detach()).requires_grad_()) == first  # another input layout
    with torch.no_grad():  # new data, same shape: prepared anew (the stamp has the data pointer)
        t["lora_a"].data = t["lora_a"].data.clone()
    assert step(5) == first and step(6) == 0
    # another rank under the same Parameters (autograd keeps a leaf's first shape: no grad here)
    with torch.no_grad():
        x = t["x"].detach()
        kept = ops.lowrank_lora(**{**t, "x": x}, scaling=0.75)
        rank = t["lora_a"].shape[0] + 2
        t["lora_a"].data = torch.randn(rank, t["lora_a"].shape[1], device=device) / 9
        t["lora_b"].data = torch.randn(t["lora_b"].shape[0], rank, device=device)
        before = len(prepared)
        y = ops.lowrank_lora(**{**t, "x": x}, scaling=0.75)
        assert len(prepared) - before == 2 and not torch.equal(y, kept)
        want = lowrank_lora_reference(**{k: v.detach().double() for k, v in {**t, "x": x}.items()}, scaling=0.75)
        assert rel_err(y, want) < tol(torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_replay_leaves_the_table_with_its_layer(device, launches, monkeypatch):
    """When a tensor of a layer dies, the layer's replays go (a new object may take its id);
    the other layers' stay."""
    import gc
    import importlib

    mod = importlib.import_module("emloc_kernels.ops.lowrank_lora")
    monkeypatch.setattr(mod, "_REPLAYS", {})
    layers = [_inputs(device, torch.float32, torch.float32, True, False, "decode", seed=s)[0] for s in (1, 2)]
    with torch.no_grad():
        for t in layers:
            ops.lowrank_lora(**t)
            ops.lowrank_lora(**{**t, "x": t["x"][:1]})  # a second input layout of the layer
    assert len(mod._REPLAYS) == 4
    survivor = layers[1]
    del layers[0]["lora_b"], layers[0], t
    gc.collect()
    assert len(mod._REPLAYS) == 2
    with torch.no_grad():
        ops.lowrank_lora(**survivor)
    assert len(mod._REPLAYS) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_dense_lora_replays_its_launches(device, launches, monkeypatch):
    """dense_lora replays like lowrank_lora: a second fwd+bwd prepares nothing and stays exact."""
    import importlib

    from emloc_kernels.ops import _triton_gemm

    prepared: list[str] = []
    real = _triton_gemm.prepare_2k
    monkeypatch.setattr(_triton_gemm, "prepare_2k", lambda *a: prepared.append("2k") or real(*a))
    monkeypatch.setattr(importlib.import_module("emloc_kernels.ops.lowrank_lora"), "_REPLAYS", {})
    t, grads = _inputs(device, torch.bfloat16, torch.float32, True, True, "train", dense=True)
    t["weight"] = torch.nn.Parameter(t["weight"].detach(), requires_grad=False)  # a frozen base linear
    counts = []
    for seed in (1, 2):
        fresh, _ = _inputs(device, torch.bfloat16, None, False, True, "train", dense=True, seed=seed)
        before = len(prepared)
        args = {**t, "x": fresh["x"].requires_grad_()}
        _check_against_fp64(ops.dense_lora, dense_lora_reference, args, grads, torch.bfloat16, device, 1.5)
        counts.append(len(prepared) - before)
    assert counts == [6, 0]  # forward: t_A, y; backward: dt_A, dx, dA, dB


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(1, 1), (2, 3, 1), ()], ids=["1x1", "2x3x1", "1-D"])
@pytest.mark.parametrize("dense", [False, True], ids=["lowrank", "dense"])
def test_replayed_inference_returns_the_input_shape_without_a_view(device, launches, monkeypatch, lead, dense):
    """A replayed call that records no gradient (decode) gets y from its last launch in x's
    leading shape: no view per call, and the values stay exact call after call."""
    import importlib

    monkeypatch.setattr(importlib.import_module("emloc_kernels.ops.lowrank_lora"), "_REPLAYS", {})
    t, _ = _inputs(device, torch.float32, torch.float32, True, False, "decode", dense=dense)
    fn, ref = (ops.dense_lora, dense_lora_reference) if dense else (ops.lowrank_lora, lowrank_lora_reference)
    n_in = t["x"].shape[-1]
    with torch.no_grad():
        for call in range(3):
            x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(call)).to(device)
            y = fn(**{**t, "x": x}, scaling=0.5)
            want = ref(**{k: v.double() for k, v in {**t, "x": x}.items()}, scaling=0.5)
            assert y.shape == want.shape and y.is_contiguous()
            assert rel_err(y, want) < tol(torch.float32, device), call
            if call > 0 and len(lead) != 1:
                assert y._base is None, "a replayed call viewed its output"


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_backward_follows_the_saved_input_layout(device, launches):
    """A saved-tensor hook may give x back in another layout than the forward saw (activation
    offloading returns it contiguous): the backward's launches must follow it."""
    t, grads = _inputs(device, torch.float32, torch.float32, False, True, "decode")
    for seed, hooked in ((1, False), (2, True)):
        fresh, _ = _inputs(device, torch.float32, None, False, True, "decode", seed=seed)
        x = strided(fresh["x"].reshape(3, -1)[:, : t["x"].shape[-1]].clone()).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda s: s.contiguous() if hooked else s, lambda s: s):
            _check_against_fp64(
                ops.lowrank_lora, lowrank_lora_reference, {**t, "x": x}, grads, torch.float32, device, 0.5
            )
