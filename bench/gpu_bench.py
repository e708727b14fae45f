#!/usr/bin/env python3
"""Kernel benchmark for one GPU run (bench/gpu_check.sh runs the kernel tests first).

Providers, bf16 activations and bf16 LoRA (rank 16, scaling 2):
  (a) dense ``F.linear(x, W) + s·F.linear(F.linear(x, A), B)`` (PEFT over nn.Linear),
  (b) the same LoRA over the unfused emulator ``F.linear(F.linear(x, v), u)``,
  (b′) (b) with the rank zero-padded to a multiple of 64 (r = 819 gives 1638-byte rows of the
  M×r intermediate, which sends cuBLAS to unaligned kernels; a careful user pads),
  (c) the fused ``ops.lowrank_lora``; (d) fused ``ops.dense_lora`` for reference;
  decode also times (c) with int8 / int4 (g=64, 128) packed factors.
Claims are made against the better of (b) and (b′).
Shapes: training tokens 4096 and 16384 on 4096×4096 (r=819) and 4096→14336 (r=1274)
(r = floor(in·out·0.4/(in+out))); decode M = 1 and 16 on the same layers.

Reported per row: median forward and forward+backward time (triton.testing.do_bench),
peak memory of forward+backward above the inputs, TFLOP/s for the FLOPs the op needs
(``2·M·(in·out | r·(in+out)) + 2·M·ρ·(in+out)`` forward; backward twice the main term
without the weight grads of frozen factors, plus LoRA's three), GB/s for the forward's
essential bytes (x, weights, y, and the intermediate t once written and read), and the
max relative error against provider (b) (or (a)).  Every provider is also timed three more
ways: replayed from a CUDA graph (GPU time without host work; forward, and forward+backward
for training rows), as an eager loop of back-to-back calls without do_bench's L2 flush
between them (what a training loop sees; host-bound calls show here), and as host µs per call
(enqueue time, gradients reset to None as do_bench does).  Training rows of (c) get a profiler
breakdown: µs and TFLOP/s of every kernel of one fused forward+backward.  Peaks measured
here: a bf16 8192³ matmul, a device-to-device copy, and a read-only pass (a sum over the same
bytes under a CUDA graph), which gives the weight-bytes floor of decode.  Targets (reported, not assumed): fused fwd+bwd
≥1.3× faster than (b) and ≤0.55× the time of (a), ≥70% of the matmul rate; decode
forward under graphs ≤1.5× the weight-bytes floor (weight bytes / read-only GB/s) at
4096→14336 and ≤2× at 4096²; eager step ≤1.15× its graph replay at M=4096; int4 g128
decode ≥1.5× faster than the bf16 fused decode.

``GPU_CHECK_DRY=1`` (or ``--dry``) runs tiny shapes on CPU through the reference path with
a wall-clock timer, to check the script end to end.  Results: ``$OUT`` (default ./out)
gpu_bench.csv / gpu_bench.json; the markdown summary is printed last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emloc_kernels import ops  # noqa: E402
from emloc_kernels.emulator.svd import rank_for  # noqa: E402
from emloc_kernels.ops.quant import PackedFactor  # noqa: E402

RHO, SCALING = 16, 2.0


class Bench:
    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")

    def time_ms(self, fn, grad_to_none=None) -> float:
        """Median milliseconds of ``fn``."""
        if not self.dry:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=150, grad_to_none=grad_to_none, return_mode="median")
        fn()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t) * 1e3)
        return statistics.median(runs)

    def graph_ms(self, fn, grad_to_none=()) -> float:
        """Median milliseconds of ``fn`` replayed from a CUDA graph: the GPU-side time without
        Python launch overhead (what a loop under CUDA graphs sees).  Gradients in
        ``grad_to_none`` are reset before the capture, so the graph writes (not accumulates)
        them, as a step after ``zero_grad(set_to_none=True)`` does."""
        if self.dry:
            return self.time_ms(fn)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                _reset(grad_to_none)
                fn()
        torch.cuda.current_stream().wait_stream(side)
        _reset(grad_to_none)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.time_ms(graph.replay)

    def loop_ms(self, fn, grad_to_none=(), n: int = 50) -> float:
        """Milliseconds per call of ``n`` back-to-back eager calls, without an L2 flush between
        them: a host-bound call shows its host time here, as in a training or decode loop."""
        for _ in range(3):
            _reset(grad_to_none)
            fn()
        runs = []
        for _ in range(5):
            self._sync()
            t = time.perf_counter()
            for _ in range(n):
                _reset(grad_to_none)
                fn()
            self._sync()
            runs.append((time.perf_counter() - t) / n * 1e3)
        return statistics.median(runs)

    def host_us(self, fn, grad_to_none=(), n: int = 20) -> float:
        """Microseconds of Python/launch work per call: wall time to enqueue ``n`` calls without
        waiting for the GPU (gradients reset to None before each, outside the timing)."""
        fn()
        self._sync()
        total = 0.0
        for _ in range(n):
            _reset(grad_to_none)
            t = time.perf_counter()
            fn()
            total += time.perf_counter() - t
        self._sync()
        return total / n * 1e6

    def _sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def peak_mib(self, fn) -> float:
        if self.dry:
            return float("nan")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def rand(self, *shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device=self.device) * scale).to(dtype)

    # ------------------------------------------------------------------ peaks
    def peaks(self) -> dict:
        n = 512 if self.dry else 8192
        a, b = self.rand(n, n), self.rand(n, n)
        ms = self.time_ms(lambda: a @ b)
        tflops = 2 * n**3 / ms / 1e9
        nbytes = 2**22 if self.dry else 2**30
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        gbps = 2 * nbytes / ms / 1e6
        words = src.view(torch.float32)
        read_ms = self.graph_ms(lambda: words.sum())
        return {"matmul_tflops": tflops, "copy_gbps": gbps, "read_gbps": nbytes / read_ms / 1e6}


def _reset(grads) -> None:
    for t in grads:
        t.grad = None


def random_packed(n: int, k: int, fmt: str, group: int, device) -> PackedFactor:
    """A factor in the ops/quant.py layout with random contents (timing only)."""
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        return PackedFactor(q, torch.full((n, 1), 1e-3, dtype=torch.bfloat16, device=device), None, "int8", (n, k))
    kp = -(-k // group) * group
    q = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, device=device)
    s = torch.full((n, kp // group), 1e-3, dtype=torch.bfloat16, device=device)
    return PackedFactor(q, s, -7.5 * s, "int4", (n, k), group)


def packed_bytes(p: PackedFactor) -> int:
    return sum(t.numel() * t.element_size() for t in (p.qweight, p.scale, p.offset) if t is not None)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_case(b: Bench, kind: str, m: int, n_in: int, n_out: int, peaks: dict) -> list[dict]:
    """All providers on one shape; a failing provider records its error and the rest go on."""
    r = rank_for(n_in, n_out, 0.4)
    x = b.rand(m, n_in)
    w = b.rand(n_out, n_in, scale=n_in**-0.5)
    # factors as an emulator should store them: rows padded to 16 elements (ops.aligned_rows)
    u, v = ops.aligned_rows(b.rand(n_out, r, scale=r**-0.5)), ops.aligned_rows(b.rand(r, n_in, scale=n_in**-0.5))
    lora_a = b.rand(RHO, n_in, scale=n_in**-0.5).requires_grad_()
    lora_b = b.rand(n_out, RHO, scale=0.1).requires_grad_()
    lora = lambda x: SCALING * F.linear(F.linear(x, lora_a), lora_b)  # noqa: E731
    r64 = -(-r // 64) * 64  # (b′): zero rows of v and columns of u, the same product
    u64, v64 = F.pad(u, (0, r64 - r)), F.pad(v, (0, 0, 0, r64 - r))
    dense_el, lowrank_el, lora_el = n_in * n_out, r * (n_in + n_out), RHO * (n_in + n_out)
    # name: (forward, weight bytes, forward FLOPs of the main product)
    providers = {
        "a_dense_peft": (lambda x: F.linear(x, w) + lora(x), 2 * dense_el, 2 * m * dense_el),
        "b_lowrank_peft": (lambda x: F.linear(F.linear(x, v), u) + lora(x), 2 * lowrank_el, 2 * m * lowrank_el),
        "b2_lowrank_peft_padded": (
            lambda x: F.linear(F.linear(x, v64), u64) + lora(x),
            2 * r64 * (n_in + n_out),
            2 * m * lowrank_el,
        ),
        "c_fused_lowrank": (
            lambda x: ops.lowrank_lora(x, u, v, lora_a, lora_b, SCALING),
            2 * lowrank_el,
            2 * m * lowrank_el,
        ),
        "d_fused_dense": (lambda x: ops.dense_lora(x, w, lora_a, lora_b, SCALING), 2 * dense_el, 2 * m * dense_el),
    }
    if kind == "decode":
        for fmt, g in (("int8", 0), ("int4", 64), ("int4", 128)):
            pu, pv = random_packed(n_out, r, fmt, g, b.device), random_packed(r, n_in, fmt, g, b.device)
            fn = (lambda pu, pv: lambda x: ops.lowrank_lora(x, pu, pv, lora_a, lora_b, SCALING))(pu, pv)
            providers[f"c_fused_{fmt}" + (f"_g{g}" if g else "")] = (
                fn,
                packed_bytes(pu) + packed_bytes(pv),
                2 * m * lowrank_el,
            )
    rows, outputs = [], {}
    lora_flops = 2 * m * lora_el
    for name, (fn, weight_bytes, main_flops) in providers.items():
        row = {"kind": kind, "M": m, "in": n_in, "out": n_out, "r": r, "rho": RHO, "provider": name}
        try:
            with torch.no_grad():
                row["fwd_ms"] = b.time_ms(lambda: fn(x))
                outputs[name] = fn(x)
            row["fwd_tflops"] = (main_flops + lora_flops) / row["fwd_ms"] / 1e9
            inter = 0 if name.startswith(("a_", "d_")) else 2 * m * (r + RHO)
            weight_bytes += 2 * lora_el
            row["weight_bytes"] = weight_bytes
            row["fwd_gbps"] = (2 * (m * n_in + m * n_out + inter) + weight_bytes) / row["fwd_ms"] / 1e6
            floor_ms = weight_bytes / peaks["read_gbps"] / 1e6
            row["fwd_vs_weight_floor"] = row["fwd_ms"] / floor_ms
            with torch.no_grad():
                row["fwd_host_us"] = b.host_us(lambda: fn(x))
                row["fwd_loop_ms"] = b.loop_ms(lambda: fn(x))
            try:
                with torch.no_grad():
                    row["fwd_graph_ms"] = b.graph_ms(lambda: fn(x))
                row["fwd_graph_vs_weight_floor"] = row["fwd_graph_ms"] / floor_ms
            except Exception as e:
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            if kind == "train":
                xg = x.detach().requires_grad_()
                dy = torch.randn_like(outputs[name])
                grads = [xg, lora_a, lora_b]

                def step(fn=fn, xg=xg, dy=dy):
                    fn(xg).backward(dy)

                row["fwd_bwd_ms"] = b.time_ms(step, grad_to_none=grads)
                row["peak_mib"] = b.peak_mib(step)
                row["fwd_bwd_host_us"] = b.host_us(step, grad_to_none=grads)
                row["fwd_bwd_loop_ms"] = b.loop_ms(step, grad_to_none=grads)
                try:
                    row["fwd_bwd_graph_ms"] = b.graph_ms(step, grad_to_none=grads)
                except Exception as e:
                    row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                row["fwd_bwd_tflops"] = (2 * main_flops + 3 * lora_flops) / row["fwd_bwd_ms"] / 1e9
                row["pct_matmul_peak"] = 100 * row["fwd_bwd_tflops"] / peaks["matmul_tflops"]
                graph_tflops = (2 * main_flops + 3 * lora_flops) / row.get("fwd_bwd_graph_ms", float("nan")) / 1e9
                row["graph_pct_matmul_peak"] = 100 * graph_tflops / peaks["matmul_tflops"]
                if name == "c_fused_lowrank":
                    row.update(fused_passes(b, x, u, v, lora_a, lora_b, dy))
                    row["kernels"] = kernel_breakdown(b, step, grads, m, n_in, n_out, r)
            base = "a_dense_peft" if name.startswith("d_") else "b_lowrank_peft"
            if base in outputs and "int" not in name:
                row["rel_err_vs_" + base[:1]] = rel_err(outputs[name], outputs[base])
        except Exception as e:  # one failing case must not kill the table
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
            if not b.dry:
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fused_passes(b: Bench, x, u, v, lora_a, lora_b, dy) -> dict:
    """The fused op's passes one at a time: forward and backward custom ops, eager and
    CUDA-graph replayed (GPU time), and the backward's host time -- to tell launch overhead
    from slow kernels."""
    a, bb = lora_a.detach(), lora_b.detach()
    fwd = lambda: torch.ops.emloc.lowrank_lora_fwd(x, u, None, None, v, None, None, a, bb, SCALING, None, [0] * 4)  # noqa: E731
    t_a = fwd()[1]
    bwd = lambda: torch.ops.emloc.lowrank_lora_bwd(
        dy, x, t_a, u, None, None, v, None, None, a, bb, SCALING, [0] * 4, True
    )  # noqa: E731
    out = {}
    for key, fn in (("fwd_op", fwd), ("bwd_op", bwd)):
        try:
            out[key + "_ms"] = b.time_ms(fn)
            out[key + "_graph_ms"] = b.graph_ms(fn)
            out[key + "_host_us"] = b.host_us(fn)
        except Exception as e:
            out[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


# The fused step's kernels in launch order: forward shrink and expand, backward dt, dx, dA, dB.
STEP_KERNELS = ("fwd shrink x·[v;A]ᵀ", "fwd expand", "bwd dy·[u|sB]", "bwd dx", "bwd dA", "bwd dB")


def kernel_breakdown(b: Bench, step, grads, m: int, n_in: int, n_out: int, r: int) -> list[dict]:
    """µs and TFLOP/s of each GPU kernel of one fused forward+backward (torch profiler); the
    Triton GEMMs are labelled by launch order (STEP_KERNELS)."""
    if b.dry:
        return []
    from torch.profiler import ProfilerActivity, profile

    flops = (
        2 * m * n_in * (r + RHO),
        2 * m * (r + RHO) * n_out,
        2 * m * n_out * (r + RHO),
        2 * m * (r + RHO) * n_in,
        2 * RHO * m * n_in,
        2 * n_out * m * RHO,
    )
    _reset(grads)
    step()
    torch.cuda.synchronize()
    _reset(grads)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    out, gemms = [], 0
    for e in kernels:
        us = e.time_range.elapsed_us()
        row = {"kernel": e.name[:60], "us": round(us, 2)}
        if "_gemm_2" in e.name and gemms < len(STEP_KERNELS) and us > 0:
            row["pass"], row["tflops"] = STEP_KERNELS[gemms], round(flops[gemms] / us / 1e6, 1)
            gemms += 1
        out.append(row)
    return out


def _get(rows, case, provider, key):
    for r in rows:
        if (r["kind"], r["M"], r["in"], r["out"]) == case and r["provider"] == provider:
            return r.get(key, float("nan"))
    return float("nan")


def summary(rows: list[dict], peaks: dict, tests: str) -> str:
    f = lambda v, d=2: "err" if v != v else f"{v:.{d}f}"  # noqa: E731
    cases = sorted({(r["kind"], r["M"], r["in"], r["out"]) for r in rows})
    train, decode = [c for c in cases if c[0] == "train"], [c for c in cases if c[0] == "decode"]
    name = lambda c: f"M={c[1]} {c[2]}→{c[3]}"  # noqa: E731
    best_b = lambda c, key: min(_get(rows, c, p, key) for p in ("b_lowrank_peft", "b2_lowrank_peft_padded"))  # noqa: E731
    lines = [
        f"kernel tests: {tests}; measured peaks: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, "
        f"copy {peaks['copy_gbps']:.0f} GB/s, read-only {peaks['read_gbps']:.0f} GB/s",
        "",
        "| training, fwd+bwd ms (do_bench) | (a) dense | (b) low-rank | (b′) padded | (c) fused | best b/c (≥1.3) "
        "| c/a (≤0.6 at 16384, 4096→14336) | c loop / c graph (≤1.15 at 4096) | c graph % matmul peak (≥65) "
        "| c / best b peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in train:
        a, b1, b2, fc = (
            _get(rows, c, p, "fwd_bwd_ms")
            for p in ("a_dense_peft", "b_lowrank_peft", "b2_lowrank_peft_padded", "c_fused_lowrank")
        )
        loop, graph = (_get(rows, c, "c_fused_lowrank", k) for k in ("fwd_bwd_loop_ms", "fwd_bwd_graph_ms"))
        mem = _get(rows, c, "c_fused_lowrank", "peak_mib") / best_b(c, "peak_mib")
        pct = _get(rows, c, "c_fused_lowrank", "graph_pct_matmul_peak")
        lines.append(
            f"| {name(c)} | {f(a)} | {f(b1)} | {f(b2)} | {f(fc)} | {f(min(b1, b2) / fc)} | {f(fc / a)} "
            f"| {f(loop / graph)} | {f(pct, 0)} | {f(mem)} |"
        )
    lines += [
        "",
        "| training, fwd+bwd ms: eager loop / CUDA graph | (a) dense | (b) low-rank | (b′) padded | (c) fused "
        "| best b/c, graphs | (c) host µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in train:
        cell = lambda p: f"{f(_get(rows, c, p, 'fwd_bwd_loop_ms'), 3)} / {f(_get(rows, c, p, 'fwd_bwd_graph_ms'), 3)}"  # noqa: E731
        ratio = best_b(c, "fwd_bwd_graph_ms") / _get(rows, c, "c_fused_lowrank", "fwd_bwd_graph_ms")
        host = _get(rows, c, "c_fused_lowrank", "fwd_bwd_host_us")
        lines.append(
            f"| {name(c)} | {cell('a_dense_peft')} | {cell('b_lowrank_peft')} | {cell('b2_lowrank_peft_padded')} "
            f"| {cell('c_fused_lowrank')} | {f(ratio)} | {f(host, 0)} |"
        )
    lines += ["", "| fused step kernels (µs, TFLOP/s) | " + " | ".join(STEP_KERNELS) + " |", "|---" * 7 + "|"]
    for c in train:
        listed = _get(rows, c, "c_fused_lowrank", "kernels")
        kernels = {k["pass"]: k for k in (listed if isinstance(listed, list) else []) if "pass" in k}
        cells = [f"{kernels[p]['us']:.0f}, {kernels[p]['tflops']:.0f}" if p in kernels else "n/a" for p in STEP_KERNELS]
        lines.append(f"| {name(c)} | " + " | ".join(cells) + " |")
    providers = ("a_dense_peft", "b_lowrank_peft", "b2_lowrank_peft_padded", "c_fused_lowrank")
    quant = ("c_fused_int8", "c_fused_int4_g64", "c_fused_int4_g128")
    lines += [
        "",
        "| decode µs: eager loop / CUDA graph | (a) dense | (b) low-rank | (b′) padded | (c) fused | int8 g "
        "| int4 g64 g | int4 g128 g | c g / floor (≤1.5 at 14336, ≤2 at 4096) | int4 g128 speed-up, graphs (≥1.5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in decode:
        us = lambda p, k: 1e3 * _get(rows, c, p, k)  # noqa: E731
        cells = [f"{f(us(p, 'fwd_loop_ms'), 1)} / {f(us(p, 'fwd_graph_ms'), 1)}" for p in providers]
        cells += [f(us(p, "fwd_graph_ms"), 1) for p in quant]
        floor = _get(rows, c, "c_fused_lowrank", "fwd_graph_vs_weight_floor")
        speed = us("c_fused_lowrank", "fwd_graph_ms") / us("c_fused_int4_g128", "fwd_graph_ms")
        lines.append(f"| {name(c)} | " + " | ".join(cells) + f" | {f(floor)} | {f(speed)} |")
    errs = [
        f"{r['provider']} M={r['M']} out={r['out']}: {r.get('error') or r['graph_error']}"
        for r in rows
        if "error" in r or "graph_error" in r
    ]
    if errs:
        lines += ["", "errors:"] + [f"- {e}" for e in errs]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY", "0") == "1")
    p.add_argument("--out", default=os.environ.get("OUT") or "./out")
    p.add_argument("--tests", default="not run", help="kernel test status to print above the table")
    p.add_argument(
        "--budget",
        type=float,
        default=float("inf"),
        help="seconds; cases not started by then are skipped (results so far are kept)",
    )
    args = p.parse_args()
    t0 = time.monotonic()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use GPU_CHECK_DRY=1 for a CPU dry run)")
    b = Bench(args.dry)
    torch.manual_seed(0)
    try:
        peaks = b.peaks()
    except Exception as e:  # the table still comes out, with the ratios to peak as nan
        print(f"peak measurement failed: {type(e).__name__}: {e}", flush=True)
        peaks = {"matmul_tflops": float("nan"), "copy_gbps": float("nan"), "read_gbps": float("nan")}
    dev = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    print(f"device: {dev}; peaks {peaks}", flush=True)
    if args.dry:
        layers, train_m, decode_m = [(96, 96), (96, 336)], [64, 128], [1, 16]
    else:
        layers, train_m, decode_m = [(4096, 4096), (4096, 14336)], [4096, 16384], [1, 16]
    rows, skipped = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [
        (kind, m, n_in, n_out)
        for n_in, n_out in layers
        for kind, ms in (("train", train_m), ("decode", decode_m))
        for m in ms
    ]
    for kind, m, n_in, n_out in cases:
        if time.monotonic() - t0 > args.budget:
            skipped.append(f"{kind} M={m} {n_in}→{n_out}")
            continue
        rows += run_case(b, kind, m, n_in, n_out, peaks)
        write_results(out, rows, {"device": dev, "torch": torch.__version__, "peaks": peaks, "tests": args.tests})
    print(f"\nwrote {out / 'gpu_bench.csv'} and {out / 'gpu_bench.json'}\n")
    print(summary(rows, peaks, args.tests))
    if skipped:
        print(f"\nskipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}")


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """CSV and JSON of the rows so far (rewritten after every case, so a cut-off run keeps them)."""
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(out / "gpu_bench.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    (out / "gpu_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
