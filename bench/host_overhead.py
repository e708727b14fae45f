"""Host time of the fused op, with its Triton launches replaced by no-ops, against the unfused
torch composition at the same (tiny) shapes: what a GPU step pays on the CPU before any kernel
runs.  Runs on the CPU in seconds; no GPU involved.

    python bench/host_overhead.py [--repeats 21] [--iterations 200]

Providers, per call (µs of this thread's CPU time, so that other processes on the machine do
not count; median of ``--repeats`` timings of ``--iterations`` calls, the providers taking
turns; the ratio is the median of each repeat's own ratio):
* fused, eager: ``ops.lowrank_lora`` as a training step or a decode call of a layer uses it
  (the LoRA factors are Parameters; calls after the first replay the first call's launches);
* fused, registered op: the same through the ``emloc::`` custom op (torch.compile's path);
* unfused torch: ``F.linear(F.linear(x, v), u, b) + s·F.linear(F.linear(x, A), B)`` on the CPU,
  its tiny GEMMs included (which favours the fused op slightly); for the int8 / int4 cases on
  the dequantised factors (torch has no such GEMM: the fused op must not cost more host time
  for reading fewer bytes).
The Triton launcher's own host time (a few µs per launch on a GPU host) is not included; the
stubs are put in place once per timed loop, not per call.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path (whose launches are stubbed below)
os.environ.pop("EMLOC_FORCE_REFERENCE", None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import AbstractContextManager, contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from emloc_kernels import ops  # noqa: E402
from emloc_kernels.ops import _triton_gemm  # noqa: E402
from emloc_kernels.ops.quant import dequantize, quantize  # noqa: E402

op_module = importlib.import_module("emloc_kernels.ops.lowrank_lora")  # the module (ops exports the function)

OUT = Path(__file__).parent / "results" / "host_overhead.json"


class _NoLaunch:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextmanager
def stubbed_launches() -> Iterator[None]:
    saved = _triton_gemm._gemm_2k_kernel, _triton_gemm._gemm_2n_kernel
    _triton_gemm._gemm_2k_kernel = _triton_gemm._gemm_2n_kernel = _NoLaunch()  # type: ignore[assignment]
    try:
        yield
    finally:
        _triton_gemm._gemm_2k_kernel, _triton_gemm._gemm_2n_kernel = saved


@contextmanager
def registered_op_only() -> Iterator[None]:
    saved = op_module._eager, op_module._replayable
    op_module._eager = op_module._replayable = lambda *tensors: False  # type: ignore[assignment]
    try:
        yield
    finally:
        op_module._eager, op_module._replayable = saved


@contextmanager
def stubbed_registered_op() -> Iterator[None]:
    with stubbed_launches(), registered_op_only():
        yield


# a provider: the call timed, and the context its timed loops run in (the stubs: entered once
# per loop, so that their own cost stays out of the per-call figure)
Provider = tuple[Callable[[], object], Callable[[], AbstractContextManager]]


def per_call_us(providers: dict[str, Provider], repeats: int, iterations: int) -> dict[str, list[float]]:
    """µs per call of each provider, one figure per repeat; the providers take turns in every
    repeat, so that a change of the machine's load hits all of them alike (and a ratio of two
    providers' figures in one repeat compares like with like)."""
    for fn, context in providers.values():
        with context():
            for _ in range(max(10, iterations // 10)):
                fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, (fn, context) in providers.items():
            with context():
                t = time.thread_time()
                for _ in range(iterations):
                    fn()
                times[name].append((time.thread_time() - t) / iterations * 1e6)
    return times


def tensors(
    device: str, lead: tuple[int, ...], n: int = 64, rank: int = 16, rho: int = 8, quant: str | None = None
) -> dict:
    """The op's arguments; with ``quant`` ("int8", "int4") the fused op gets packed factors
    (int4 in groups of 64) and the unfused composition their dequantised floats."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(device)

    u, v = r(n, rank), r(rank, n)
    packed = {} if quant is None else {"u_packed": quantize(u, quant, 64), "v_packed": quantize(v, quant, 64)}
    if packed:
        u, v = dequantize(packed["u_packed"]), dequantize(packed["v_packed"])
    return {
        "x": r(*lead, n),
        "u": u,
        "v": v,
        **packed,
        "a": torch.nn.Parameter(r(rho, n)),  # as a LoRA layer passes them
        "b": torch.nn.Parameter(r(n, rho)),
        "bias": r(n),
        "dy": r(*lead, n),
    }


def fused(t: dict, train: bool) -> Callable[[], object]:
    u, v = t.get("u_packed", t["u"]), t.get("v_packed", t["v"])

    def step() -> object:
        if not train:
            with torch.no_grad():
                return ops.lowrank_lora(t["x"], u, v, t["a"], t["b"], 2.0, t["bias"])
        y = ops.lowrank_lora(t["x"], u, v, t["a"], t["b"], 2.0, t["bias"])
        torch.autograd.backward(y, t["dy"])
        return y

    return step


def unfused(t: dict, train: bool) -> Callable[[], object]:
    def forward() -> torch.Tensor:
        return F.linear(F.linear(t["x"], t["v"]), t["u"], t["bias"]) + 2.0 * F.linear(F.linear(t["x"], t["a"]), t["b"])

    def step() -> object:
        if not train:
            with torch.no_grad():
                return forward()
        y = forward()
        torch.autograd.backward(y, t["dy"])
        return y

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    cases = (
        ("fwd+bwd, 64 tokens", (64,), True, None),
        ("fwd+bwd, 64 tokens as (2, 32, n)", (2, 32), True, None),
        ("decode, 1 token", (1,), False, None),
        ("decode, 1 token as (1, 1, n)", (1, 1), False, None),  # what a transformer layer passes
        ("decode int8, 1 token as (1, 1, n)", (1, 1), False, "int8"),
        ("decode int4 g64, 1 token as (1, 1, n)", (1, 1), False, "int4"),
    )
    for case, lead, train, quant in cases:
        cpu = tensors("cpu", lead, quant=quant)
        each = per_call_us(
            {
                "fused_eager_us": (fused(cpu, train), stubbed_launches),
                "fused_registered_op_us": (fused(cpu, train), stubbed_registered_op),
                "unfused_torch_us": (unfused(cpu, train), nullcontext),
            },
            a.repeats,
            a.iterations,
        )
        row = {"case": case, **{k: round(statistics.median(ts), 1) for k, ts in each.items()}}
        # the median of the repeats' own ratios: each pair was timed side by side
        ratios = [f / u for f, u in zip(each["fused_eager_us"], each["unfused_torch_us"])]
        row["fused_eager_vs_unfused"] = round(statistics.median(ratios), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": 1, "repeats": a.repeats, "iterations": a.iterations}
    a.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
