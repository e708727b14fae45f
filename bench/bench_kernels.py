"""pytest-benchmark cases for the fused ops vs the unfused torch reference.

Small sizes so CI can smoke it on CPU (where the ops take the torch reference path):
``PYTHONPATH=. python3 -m pytest bench/bench_kernels.py -q``; on a GPU the ``cuda``
cases time the Triton kernels (bench/gpu_check.sh is the full GPU benchmark).
"""

from __future__ import annotations

import pytest
import torch

from emloc_kernels import ops

M, IN, OUT, RANK, RHO = 256, 256, 384, 96, 8
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device=device, dtype=dt)  # noqa: E731
    x = (torch.randn(M, IN, generator=g) * 1.0).to(device=device, dtype=dt).requires_grad_()
    return x, r(OUT, RANK), r(RANK, IN), r(RHO, IN).requires_grad_(), r(OUT, RHO).requires_grad_()


def _run(benchmark, fn, device):
    def step():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_lowrank_lora(benchmark, device, impl, mode):
    x, u, v, a, b = _inputs(device)
    fn = ops.lowrank_lora if impl == "fused" else ops.lowrank_lora_reference
    benchmark.group = f"lowrank_lora-{mode}-{device}"

    def call():
        y = fn(x, u, v, a, b, 2.0)
        if mode == "fwd_bwd":
            y.sum().backward()
            x.grad = a.grad = b.grad = None

    with torch.set_grad_enabled(mode == "fwd_bwd"):
        _run(benchmark, call, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_dense_lora_fwd_bwd(benchmark, device, impl):
    x, u, v, a, b = _inputs(device)
    w = (u @ v).contiguous()
    fn = ops.dense_lora if impl == "fused" else ops.dense_lora_reference
    benchmark.group = f"dense_lora-fwd_bwd-{device}"

    def call():
        fn(x, w, a, b, 2.0).sum().backward()
        x.grad = a.grad = b.grad = None

    _run(benchmark, call, device)
