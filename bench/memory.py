"""Weight memory of one decoder block's linears: dense vs low-rank emulator vs quantised emulator.

Bytes are exact (``weight_bytes`` of modules built on the meta device, nothing allocated).
With ``--device cuda`` the modules are also built on the GPU, and the allocated memory and
the peak of one forward pass over ``--tokens`` tokens are measured.

    PYTHONPATH=. python3 bench/memory.py --model smollm2-135m --ratio 0.4
    PYTHONPATH=. python3 bench/memory.py --model llama3-8b --device cuda --out runs/memory.csv
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch
from torch import nn

from emloc_kernels.emulator.svd import rank_for
from emloc_kernels.modules.lowrank import LowRankLinear
from emloc_kernels.modules.quantized import QuantLowRankLinear

# (name, in_features, out_features) of the linears in one decoder block
MODELS = {
    "smollm2-135m": [
        ("q", 576, 576),
        ("k", 576, 192),
        ("v", 576, 192),
        ("o", 576, 576),
        ("gate", 576, 1536),
        ("up", 576, 1536),
        ("down", 1536, 576),
    ],
    "llama3-8b": [
        ("q", 4096, 4096),
        ("k", 4096, 1024),
        ("v", 4096, 1024),
        ("o", 4096, 4096),
        ("gate", 4096, 14336),
        ("up", 4096, 14336),
        ("down", 14336, 4096),
    ],
}
VARIANTS = ("dense", "lowrank", "int8", "int4-g128", "int4-g64")


def build(variant: str, in_f: int, out_f: int, rank: int, dtype: torch.dtype, device: str) -> nn.Module:
    if variant == "dense":
        return nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
    if variant == "lowrank":
        return LowRankLinear(in_f, out_f, rank, bias=False, dtype=dtype, device=device)
    quant, _, group = variant.partition("-g")
    return QuantLowRankLinear(
        in_f, out_f, rank, bias=False, quant=quant, group_size=int(group or 128), dtype=dtype, device=device
    )


def nbytes(m: nn.Module) -> int:
    if isinstance(m, QuantLowRankLinear):
        return m.weight_bytes()
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def cuda_measure(variant: str, in_f: int, out_f: int, rank: int, dtype: torch.dtype, tokens: int) -> tuple[int, int]:
    """(allocated bytes of the module, peak extra bytes of one forward) on the current GPU."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    m = build(variant, in_f, out_f, rank, dtype, "cuda")
    if isinstance(m, QuantLowRankLinear):  # realistic codes, not zeros
        m.load_state_dict(
            QuantLowRankLinear.from_lowrank(
                LowRankLinear.from_factors(
                    torch.randn(out_f, rank, dtype=dtype, device="cuda"),
                    torch.randn(rank, in_f, dtype=dtype, device="cuda"),
                ),
                m.quant,
                m.group_size or 128,
            ).state_dict()
        )
    held = torch.cuda.memory_allocated() - base
    x = torch.randn(tokens, in_f, dtype=dtype, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad():
        m(x)
    torch.cuda.synchronize()
    return held, torch.cuda.max_memory_allocated() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.4, help="fraction of each layer's parameters kept")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--device", choices=["meta", "cuda"], default="meta")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the measured forward (cuda)")
    ap.add_argument("--out", help="CSV file (default: stdout)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows, totals = [], dict.fromkeys(VARIANTS, 0)
    for name, in_f, out_f in MODELS[args.model]:
        rank = rank_for(in_f, out_f, args.ratio)
        for variant in VARIANTS:
            b = nbytes(build(variant, in_f, out_f, rank, dtype, "meta"))
            totals[variant] += b
            row = {"layer": name, "in": in_f, "out": out_f, "rank": rank, "variant": variant, "bytes": b}
            if args.device == "cuda":
                row["cuda_allocated"], row["cuda_forward_peak"] = cuda_measure(
                    variant, in_f, out_f, rank, dtype, args.tokens
                )
            rows.append(row)
    for variant, b in totals.items():
        rows.append({"layer": "block", "variant": variant, "bytes": b, "rank": "", "in": "", "out": ""})
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
        out.close()
    dense = totals["dense"]
    print(", ".join(f"{v}: {b / 2**20:.2f} MiB ({b / dense:.3f}×)" for v, b in totals.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
