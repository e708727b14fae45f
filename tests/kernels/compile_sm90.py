"""Compile every kernel launch of lowrank_lora / dense_lora forward+backward at real shapes
for sm_90, without a GPU, and print one line per launch (run by test_compile_sm90.py).

The interpreter does not type-check kernels the way the compiler does, so this catches
compile errors (and shared-memory overruns) on machines without a GPU.  Launches are
recorded by stand-ins for the two kernels; Triton's argument specialisation (ints equal
to 1 become constants, multiples of 16 are marked divisible, pointers 16-byte aligned)
is reproduced by hand.

Each line also reads the compiled cubin (cuobjdump and nvdisasm from Triton's NVIDIA
backend): registers per thread, stack bytes (spills land there), and the global loads of
the SASS by width -- ``LDG`` (to registers) and ``LDGSTS`` (asynchronous copies to shared
memory).  An int4 factor read along its packed bytes (decode's operands) must not be loaded
a byte at a time: such a launch fails the check.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from emloc_kernels import ops
from emloc_kernels.ops import _triton_gemm as G
from emloc_kernels.ops.quant import PackedFactor

SMEM_LIMIT = 232448  # H100 / H200 per-block maximum
TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
}
launches = []


class _Recorder:
    def __init__(self, jit):
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args, **kw: launches.append((self.jit, args, kw))


BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def read_cubin(cubin: bytes) -> dict:
    """Registers, stack bytes and global loads by width (bytes) of one compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK):(\d+)", res.stdout))
    loads: dict[str, collections.Counter] = {"LDG": collections.Counter(), "LDGSTS": collections.Counter()}
    for op, mods in re.findall(r"\b(LDGSTS|LDG)((?:\.[A-Z0-9]+)*)", sass):
        widths = [_WIDTH[m] for m in mods.split(".") if m in _WIDTH]
        loads[op][widths[0] if widths else 4] += 1
    return {"regs": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", -1)), "loads": loads}


def compile_launch(jit, args, kw) -> tuple[int, dict]:
    kw = dict(kw)
    options = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages")}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(jit.fn).parameters):
        v = kw[name] if name in kw else args[i]
        if name in kw or (isinstance(v, int) and v == 1):
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(
        ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    return k.metadata.shared, read_cubin(k.asm["cubin"])


def _int4(n: int, k: int, group: int, dt: torch.dtype) -> PackedFactor:
    kp = -(-k // group) * group
    return PackedFactor(
        torch.zeros(n, kp // 2, dtype=torch.uint8),
        torch.ones(n, kp // group, dtype=dt),
        torch.zeros(n, kp // group, dtype=dt),
        "int4",
        (n, k),
        group,
    )


def record(m, n_in, n_out, r, rho, dt, lora_dt, packed=None, v_int4=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n_in, generator=g).to(dt).requires_grad_()
    if packed:  # packed u (int4) and v (int8, or int4): contents do not matter for compiling
        u = _int4(n_out, r, packed, dt)
        if v_int4:
            v = _int4(r, n_in, packed, dt)
        else:
            v = PackedFactor(
                torch.zeros(r, n_in, dtype=torch.int8), torch.ones(r, 1, dtype=dt), None, "int8", (r, n_in)
            )
    else:
        u = ops.aligned_rows(torch.randn(n_out, r, generator=g).to(dt))
        v = ops.aligned_rows(torch.randn(r, n_in, generator=g).to(dt))
    a = torch.randn(rho, n_in, generator=g).to(lora_dt).requires_grad_()
    b = torch.randn(n_out, rho, generator=g).to(lora_dt).requires_grad_()
    ops.lowrank_lora(x, u, v, a, b, 2.0).sum().backward()
    if not packed:
        ops.dense_lora(x, (u @ v).contiguous(), a, b, 2.0).sum().backward()


def main() -> int:
    G._gemm_2k_kernel, G._gemm_2n_kernel = _Recorder(G._gemm_2k_kernel), _Recorder(G._gemm_2n_kernel)
    G._sms = lambda device: 132
    importlib.import_module("emloc_kernels.ops.lowrank_lora").use_triton = lambda t: True
    G._alloc = lambda shape, strides, dtype, device: torch.empty_strided(shape, strides, dtype=dtype).zero_()
    record(2048, 512, 1792, 300, 16, torch.bfloat16, torch.bfloat16)  # training class
    record(300, 512, 1792, 300, 16, torch.bfloat16, torch.float32)  # middle class, fp32 adapters
    record(1, 512, 1792, 300, 8, torch.float16, torch.float16, packed=64)  # decode, packed factors
    record(4, 512, 1792, 300, 8, torch.bfloat16, torch.bfloat16, packed=128, v_int4=True)
    seen, bad = set(), 0
    for jit, args, kw in launches:
        key = (
            jit.fn.__name__,
            tuple(sorted(kw.items())),
            tuple(str(a.dtype) if isinstance(a, torch.Tensor) else a == 1 for a in args),
        )
        if key in seen:
            continue
        seen.add(key)
        try:
            smem, cubin = compile_launch(jit, args, kw)
            byte_loads = cubin["loads"]["LDG"][1]
            ok = smem <= SMEM_LIMIT and not (kw["QUANT1"] == 2 and kw["K_IS_COL1"] and byte_loads)
            ld = "; ".join(
                f"{op} " + " ".join(f"{w}B:{n}" for w, n in sorted(c.items())) for op, c in cubin["loads"].items()
            )
            usage = f"regs={cubin['regs']} stack={cubin['stack']} smem={smem} | {ld}"
        except Exception as e:  # report every failing launch, not just the first
            usage, ok = f"{type(e).__name__}: {str(e)[-400:]}", False
        bad += not ok
        print(f"{'OK ' if ok else 'BAD'} {jit.fn.__name__} {kw} {usage}", flush=True)
    print(f"{len(seen)} launches compiled, {bad} bad")
    return 1 if bad or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
