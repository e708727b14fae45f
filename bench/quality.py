"""Accuracy and memory of EMLoC at several emulator ratios and with quantised emulators, with
LoRA on the original as the upper bound; the default material (SmolLM2-135M-Instruct, Rotten
Tomatoes, 300 test reviews).

    python bench/quality.py [--ratios 0.3 0.4 0.6] [--quants int8 int4] [--runs runs/quality]

Writes one finetune run per setting under ``--runs``, ``bench/results/quality.csv`` and
``quality.png``, and prints a markdown table.  About 6 minutes per setting on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

from emloc_kernels.recipe import finetune as ft
from emloc_kernels.recipe.memory import peak_in_fresh_process
from emloc_kernels.recipe.models import attach_lora, load_model
from emloc_kernels.recipe.task import accuracy

COLUMNS = ["setting", "zero_shot", "emulator", "uncorrected", "L=1", "L=3", "unclamped", "delivered", "chosen",
           "peak_mem_inference_mib", "peak_mem_finetune_mib", "linear_bytes_vs_fp16", "emulator_mib", "seconds"]  # seconds: the run's timed stages


def lora_on_original(s: ft.FinetuneSettings, memory_spec: Path) -> dict:
    """The upper bound: the same LoRA training directly on the original model (and its peak
    memory on the batch the EMLoC runs measured, in a fresh process)."""
    device, dtype = ft.device_and_dtype(s)
    model_path, task, train_rows, _, test_rows = ft.prepare(s)
    model, _ = load_model(model_path, device, dtype)
    zero_shot = accuracy(model, task, test_rows)
    alpha = float(s.lora_alpha if s.lora_alpha is not None else s.lora_rank)
    peft_model = attach_lora(model, s.lora_rank, alpha, s.seed)
    ft.train(peft_model, task, train_rows, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
             device=device, progress=s.progress)
    peak = peak_in_fresh_process("finetune", model_path, memory_spec, device=str(device),
                                 dtype=str(dtype).split(".")[-1], rank=s.lora_rank, alpha=alpha, lr=s.lr)
    return {"zero_shot": zero_shot, "delivered": accuracy(peft_model, task, test_rows),
            "peak_mem_finetune_mib": round(peak / 2**20)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4, 0.6])
    p.add_argument("--quants", nargs="*", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=64, choices=[64, 128], help="int4 group size")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--runs", default="runs/quality", help="where the finetune runs are written")
    p.add_argument("--results", default="bench/results", help="where quality.csv and quality.png go")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--reuse", action="store_true", help="read the report of a setting whose run directory exists")
    a = p.parse_args()
    out, results = Path(a.runs), Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    base = ft.FinetuneSettings(steps=a.steps, progress=False, overwrite=a.overwrite)
    settings = [(f"EMLoC ratio {r}", replace(base, ratio=r, out=str(out / f"ratio-{r}"))) for r in a.ratios]
    settings += [(f"EMLoC ratio 0.4 {q}-g{a.group_size}" if q == "int4" else f"EMLoC ratio 0.4 {q}",
                  replace(base, ratio=0.4, quant=q, group_size=a.group_size, out=str(out / f"ratio-0.4-{q}")))
                 for q in a.quants]
    rows = []
    for name, s in settings:
        done = Path(s.out) / "report.json"
        r = json.loads(done.read_text()) if a.reuse and done.exists() else ft.run(s)
        b = r["bytes"]
        rows.append({"setting": name, "zero_shot": r["zero_shot"], "emulator": r["emulator"],
                     **{k: x["test"] for k, x in r["variants"].items()}, "delivered": r["corrected"],
                     "chosen": r["chosen"], "peak_mem_inference_mib": round(r["peak_mem_inference"] / 2**20),
                     "peak_mem_finetune_mib": round(r["peak_mem_finetune"] / 2**20),
                     "linear_bytes_vs_fp16": round(b["emulator_linears"] / b["original_linears_fp16"], 4),
                     "emulator_mib": round(b["emulator_total"] / 2**20), "seconds": round(sum(r["timings_s"].values()))})
        print(json.dumps(rows[-1]), flush=True)
        write_csv(rows, results / "quality.csv")  # after every setting: a long run keeps what it has
    upper_file = out / "lora_on_original.json"
    if not (a.reuse and upper_file.exists()):
        start = time.perf_counter()
        upper = lora_on_original(base, Path(settings[0][1].out) / "memory_batch.json")
        upper_file.write_text(json.dumps({**upper, "seconds": round(time.perf_counter() - start)}))
    rows.append({"setting": "LoRA on the original (upper bound)", **json.loads(upper_file.read_text())})
    write_csv(rows, results / "quality.csv")
    plot(rows, results / "quality.png")
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in COLUMNS) + " |")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emloc = [r for r in rows if r["setting"].startswith("EMLoC") and r["setting"].split()[-1][0].isdigit()]
    ratios = [float(r["setting"].split()[-1]) for r in emloc]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("emulator", "emulator zero-shot"), ("uncorrected", "adapter, uncorrected"),
                       ("delivered", "adapter, delivered (clamp chosen on validation)")):
        ax.plot(ratios, [r[key] for r in emloc], marker="o", label=label)
    ax.axhline(rows[-1]["delivered"], color="k", ls="--", label="LoRA on the original")
    ax.axhline(emloc[0]["zero_shot"], color="gray", ls=":", label="original zero-shot")
    ax.set_xlabel("emulator ratio (fraction of linear parameters kept)")
    ax.set_ylabel("test accuracy (300 reviews)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
