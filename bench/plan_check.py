"""``emloc plan``'s estimate against the measured peak of LoRA fine-tuning on SmolLM2-135M-Instruct.

Each setting trains two AdamW steps on one batch in a fresh process
(:func:`emloc_kernels.recipe.memory.peak_in_fresh_process`, as ``emloc finetune`` measures
its peaks: CPU RSS above the pre-load baseline) and compares the peak with
:mod:`emloc_kernels.recipe.plan`'s estimate for the same seq, batch, LoRA rank, dtype and
loss. The batch: ``--batch`` reviews truncated to ``--seq`` tokens, the last one shorter (a
padded batch, as training batches are). Emulators are built once under ``--emulators``
(``emloc build demo --data demo``, about 3 minutes each on 2 CPU cores) and reused.

    PYTHONPATH=. python bench/plan_check.py [--only NAME ...] [--out bench/results/plan_check.json]

Writes the figures to ``--out`` (tests/test_plan.py compares the estimate with them) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from emloc_kernels.recipe.demo import smollm2_path
from emloc_kernels.recipe.memory import peak_in_fresh_process
from emloc_kernels.recipe.plan import Workload, architecture, emulator_estimate, lora_estimate

PROMPT = "Review: {text}\nSentiment:"
# fp32 only: bf16 on the CPU runs matmuls with backend transients a GPU does not have (the tied
# output layer's bf16 matmul alone peaked 433 MiB above its 54 MiB weight; bench/RESULTS.md)
# name: (ratio or None for the original, quant, group size, seq, batch, LoRA rank, dtype, loss positions)
SETTINGS: dict[str, tuple[float | None, str, int, int, int, int, str, str]] = {
    "emulator 0.4, fp32, label loss": (0.4, "none", 128, 128, 8, 16, "float32", "last"),
    "emulator 0.2 int4-g128, fp32, LM loss": (0.2, "int4", 128, 128, 8, 16, "float32", "all"),
    "emulator 0.4, fp32, LM loss, seq 64": (0.4, "none", 128, 64, 8, 16, "float32", "all"),
    "LoRA on the original, fp32, label loss": (None, "none", 128, 128, 8, 16, "float32", "last"),
}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {threads} thread(s); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.python_implementation()} {platform.python_version()}"
    )


def emulator_dir(root: Path, ratio: float, quant: str, group_size: int) -> Path:
    """The emulator of SmolLM2 at ``ratio``/``quant``, built (uniform ranks) if it is missing."""
    name = f"r{ratio:.2f}-{quant}" + (f"-g{group_size}" if quant == "int4" else "")
    out = root / name
    if not (out / "emloc.json").is_file():
        cmd = [sys.executable, "-m", "emloc_kernels.cli", "build", "demo", "--data", "demo"]
        cmd += ["--ratio", str(ratio), "--out", str(out)]
        if quant != "none":
            cmd += ["--quant", quant, "--group-size", str(group_size)]
        subprocess.run(cmd, check=True)
    return out


def batch_file(path: Path, seq: int, batch: int, loss_positions: str) -> Path:
    """``batch`` rows longer than ``seq`` tokens (truncated to it), the last about ¾ as long."""
    long = " ".join(["the film was surprisingly good and the cast was fine"] * seq)
    short = " ".join(["the film was dull"] * max(1, seq // 6))
    rows = [{"text": long if k < batch - 1 else short, "label": ("negative", "positive")[k % 2]} for k in range(batch)]
    spec = {
        "rows": rows,
        "prompt": PROMPT,
        "labels": ["negative", "positive"],
        "max_length": seq,
        "tokenizer": str(smollm2_path()),
        "loss_positions": loss_positions,
    }
    path.write_text(json.dumps(spec))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="setting names (default: all)")
    p.add_argument("--emulators", default=str(Path(tempfile.gettempdir()) / "plan_check"), help="emulator cache")
    p.add_argument("--out", default="bench/results/plan_check.json")
    a = p.parse_args()
    arch = architecture(json.loads((smollm2_path() / "config.json").read_text()))
    rows = []
    for name, (ratio, quant, group, seq, batch, rank, dtype, positions) in SETTINGS.items():
        if a.only and name not in a.only:
            continue
        w = Workload(seq, batch, rank, dtype, positions)
        if ratio is None:
            model, estimate = smollm2_path(), lora_estimate(arch, w)
        else:
            model, estimate = (
                emulator_dir(Path(a.emulators), ratio, quant, group),
                emulator_estimate(arch, w, ratio, quant, group),
            )
        with tempfile.TemporaryDirectory() as tmp:
            spec = batch_file(Path(tmp) / "batch.json", seq, batch, positions)
            start = time.perf_counter()
            peak = peak_in_fresh_process(
                "finetune", model, spec, device="cpu", dtype=dtype, rank=rank, alpha=float(rank)
            )
        row = {
            "name": name,
            "ratio": ratio,
            "quant": quant,
            "group_size": group,
            "seq": seq,
            "batch": batch,
            "lora_rank": rank,
            "dtype": dtype,
            "loss_positions": positions,
            "measured_bytes": peak,
            "estimate_bytes": estimate.total,
            "estimate_over_measured": round(estimate.total / peak, 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['machine']}\n")
    print("| setting | seq × batch | LoRA rank | measured MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['seq']} × {r['batch']} | {r['lora_rank']} | {r['measured_bytes'] / 2**20:.0f} "
            f"| {r['estimate_bytes'] / 2**20:.0f} | {r['estimate_over_measured']:.3f} |"
        )


if __name__ == "__main__":
    main()
