"""Accuracy, recovery and memory of EMLoC settings, with LoRA on the original as the upper bound
in the same run; the default material (SmolLM2-135M-Instruct; Rotten Tomatoes or another
shipped task), 300 test examples.

    python bench/quality.py [--preset ablation|ratios] [--only NAME ...] [--seeds 0 1] [--task rt]

Each setting is one ``emloc finetune`` run under ``--runs`` (kept, and reused with ``--reuse``);
``bench/results/quality.csv`` gets a row per setting and seed as soon as it finishes, and
``quality.png`` plots recovery against the fine-tuning peak memory.  ``recovery`` is
``(delivered − zero_shot) / (lora_original − zero_shot)``.  About 6–10 minutes per setting on
2 idle CPU cores.
A setting with ``emulator_of`` trains on the emulator that setting's run of the same task and
seed built under the same ``--runs`` (``emloc finetune --emulator``): a pair that differs in
the training alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from emloc_kernels.recipe import finetune as ft
from emloc_kernels.recipe.memory import peak_in_fresh_process
from emloc_kernels.recipe.models import load_model

COLUMNS = [
    "task",
    "setting",
    "seed",
    "zero_shot",
    "emulator",
    "uncorrected",
    "delivered",
    "chosen",
    "lora_original",
    "recovery",
    "peak_mem_inference_mib",
    "peak_mem_finetune_mib",
    "peak_mem_lora_original_mib",
    "linear_bytes_vs_fp16",
    "emulator_mib",
    "build_s",
    "seconds",
]

# the paper's build, spelled out: the recipe's own default distils the emulator
PAPER = {"allocate": "uniform", "distill_steps": 0}
# the recipe's default build: the paper's, then distilled 300 steps on 256 texts
DISTILLED = {"allocate": "uniform", "distill_steps": 300, "distill_samples": 256}
NEW = {"propagate": True, "shrinkage": "auto", "allocate": "block", "distill_steps": 0}
PRESETS = {
    # each technique alone and combined, at ratio 0.4 (fp32 and int4 g64) and 0.3
    "ablation": {
        "paper build, 0.4": dict(ratio=0.4, **PAPER),
        "calibration 256, 0.4": dict(ratio=0.4, calibration_samples=256, **PAPER),
        "shrinkage auto, 0.4": dict(ratio=0.4, shrinkage="auto", **PAPER),
        "propagate, 0.4": dict(ratio=0.4, propagate=True, **PAPER),
        "allocate block, 0.4": dict(ratio=0.4, allocate="block", distill_steps=0),
        "combined, 0.4": dict(ratio=0.4, **NEW),
        "combined, 0.4 int4-g64": dict(ratio=0.4, quant="int4", group_size=64, **NEW),
        "combined, 0.3": dict(ratio=0.3, **NEW),
        "distill 200, 0.4": dict(ratio=0.4, allocate="uniform", distill_steps=200, distill_samples=64),
        "distill 300 on 256, 0.4": dict(ratio=0.4, **DISTILLED),
        "distill 50 on 256, 0.4": dict(ratio=0.4, allocate="uniform", distill_steps=50, distill_samples=256),
        "distill 50 on 256 lr 3e-3, 0.4": dict(
            ratio=0.4, allocate="uniform", distill_steps=50, distill_samples=256, distill_lr=3e-3
        ),
        "distill 300 on 256 + block, 0.4": dict(ratio=0.4, distill_steps=300, distill_samples=256, allocate="block"),
        "distill rank 16, 300 on 256, 0.4": dict(ratio=0.4, distill_rank=16, **DISTILLED),
        # the recipe's default (distilled) at the other two points
        "distill 300 on 256, 0.4 int4-g64": dict(ratio=0.4, quant="int4", group_size=64, **DISTILLED),
        "distill 300 on 256, 0.3": dict(ratio=0.3, **DISTILLED),
        "distill 300 on 256 + anchor, 0.4": dict(ratio=0.4, anchor=True, **DISTILLED),
        "distill 300 on 256 + anchor, 0.3": dict(ratio=0.3, anchor=True, **DISTILLED),
        "distill 300 on 256 + anchor, 0.4 int4-g64": dict(
            ratio=0.4, quant="int4", group_size=64, anchor=True, **DISTILLED
        ),
        # the default with the whitening on 256 texts, or the distillation on 1024 (same steps)
        "calibration 256 + distill 300 on 256 + anchor, 0.4": dict(
            ratio=0.4, calibration_samples=256, anchor=True, **DISTILLED
        ),
        "distill 300 on 1024 + anchor, 0.4": dict(
            ratio=0.4, allocate="uniform", distill_steps=300, distill_samples=1024, anchor=True
        ),
        # the default, its adapter then trained further on the original's last 4 blocks (a variant
        # chosen on validation; the blocks below replayed from one inference pass)
        "distill 300 on 256 + anchor + refine top 4, 0.4": dict(
            ratio=0.4, anchor=True, refine_top_blocks=4, **DISTILLED
        ),
        # the default (with its refinement) at the other two points
        "distill 300 on 256 + anchor + refine top 4, 0.4 int4-g64": dict(
            ratio=0.4, quant="int4", group_size=64, anchor=True, refine_top_blocks=4, **DISTILLED
        ),
        "distill 300 on 256 + anchor + refine top 4, 0.3": dict(
            ratio=0.3, anchor=True, refine_top_blocks=4, **DISTILLED
        ),
        # the same refinement on top of the paper's build (no distillation: its build time)
        "paper build + anchor + refine top 4, 0.4": dict(ratio=0.4, anchor=True, refine_top_blocks=4, **PAPER),
        # the last two blocks kept dense, the 28 below at the ratio that spends 0.4's budget (0.357)
        "distill 300 on 256 + anchor + 2 dense top blocks, 0.4": dict(
            ratio=0.4, anchor=True, dense_top_blocks=2, **DISTILLED
        ),
        # a baseline without an emulator: LoRA on the original's top blocks only (no autograd below)
        "LoRA on the original's last 4 blocks": dict(baseline_top_blocks=4),
        # paired: the training alone differs, on the emulator another setting's run of the same seed built
        "default on the anchored run's emulator": dict(emulator_of="distill 300 on 256 + anchor, 0.4"),
        "anchor on the default's emulator": dict(anchor=True, emulator_of="distill 300 on 256, 0.4"),
        "anchor on the default's emulator, 0.3": dict(anchor=True, emulator_of="distill 300 on 256, 0.3"),
        "anchor in 4 rounds on the anchored run's emulator": dict(
            anchor=True, anchor_rounds=4, emulator_of="distill 300 on 256 + anchor, 0.4"
        ),
    },
    "ratios": {f"paper build, {r}": dict(ratio=r, **PAPER) for r in (0.3, 0.4, 0.6)},
}


def top_blocks_report(s: ft.FinetuneSettings) -> dict:
    """The baseline's report in the keys :func:`row_of` reads: LoRA on the original's last
    ``s.baseline_top_blocks`` blocks as the delivered adapter (no emulator), its fine-tuning
    peak as the fine-tuning peak; LoRA on all blocks too when ``s.upper_bound``."""
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    r = ft.Run.create(s)
    timings = {}
    t = time.perf_counter()
    original, _ = load_model(r.model_path, r.device, r.dtype)
    zero_shot = r.evaluate(original, "test")
    del original
    timings["eval_zero_shot"] = time.perf_counter() - t
    t = time.perf_counter()
    baseline = ft.lora_on_original(r, out / "checkpoints", top_blocks=s.baseline_top_blocks)
    timings["train_top_blocks"] = time.perf_counter() - t
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the Trainer's (generative data)
    spec = r.write_memory_batch(out / "memory_batch.json")
    args = {"device": str(r.device), "dtype": str(r.dtype).split(".")[-1]}
    training = {**args, "rank": s.lora_rank, "alpha": r.alpha, "lr": s.lr}
    memory = {
        "inference": peak_in_fresh_process("inference", r.model_path, spec, **args),
        "finetune": peak_in_fresh_process("finetune", r.model_path, spec, top_blocks=s.baseline_top_blocks, **training),
    }
    report: dict = {"zero_shot": zero_shot, "corrected": baseline, "lora_top_blocks": baseline}
    if s.upper_bound:
        t = time.perf_counter()
        report["lora_original"] = ft.lora_on_original(r, out / "checkpoints")
        timings["train_original"] = time.perf_counter() - t
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        report["recovery"] = ft.recovery(baseline, zero_shot, report["lora_original"])
        memory["finetune_original"] = peak_in_fresh_process("finetune", r.model_path, spec, **training)
    report |= {
        "peak_mem_inference": memory["inference"],
        "peak_mem_finetune": memory["finetune"],
        "memory": memory,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def row_of(task: str, name: str, seed: int, r: dict) -> dict:
    b = r.get("bytes")  # None: a baseline without an emulator
    return {
        "task": task,
        "setting": name,
        "seed": seed,
        "zero_shot": r["zero_shot"],
        "emulator": r.get("emulator"),
        "uncorrected": r.get("uncorrected"),
        "delivered": r["corrected"],
        "chosen": r.get("chosen"),
        "lora_original": r.get("lora_original"),
        "recovery": r.get("recovery"),
        "peak_mem_inference_mib": round(r["peak_mem_inference"] / 2**20),
        "peak_mem_finetune_mib": round(r["peak_mem_finetune"] / 2**20),
        "peak_mem_lora_original_mib": round(r["memory"]["finetune_original"] / 2**20)
        if "finetune_original" in r["memory"]
        else None,
        "linear_bytes_vs_fp16": round(b["emulator_linears"] / b["original_linears_fp16"], 4) if b else None,
        "emulator_mib": round(b["emulator_total"] / 2**20) if b else None,
        "build_s": r["timings_s"].get("build_emulator"),
        "seconds": round(sum(r["timings_s"].values())),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ablation", choices=sorted(PRESETS))
    p.add_argument("--only", nargs="*", help="run only these settings of the preset (by name)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--task", default=None, help="a shipped task name (default: the recipe's default)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--runs", default="runs/quality", help="where the finetune runs are written")
    p.add_argument("--results", default="bench/results", help="where quality.csv and quality.png go")
    p.add_argument("--reuse", action="store_true", help="read the report of a setting whose run directory exists")
    p.add_argument(
        "--known-upper",
        action="store_true",
        help="take LoRA on the original (accuracy, peak) from quality.csv's row of the same task and seed "
        "instead of training it again (it does not depend on the setting)",
    )
    a = p.parse_args()
    settings = PRESETS[a.preset]
    if a.only:
        unknown = sorted(set(a.only) - set(settings))
        if unknown:
            raise SystemExit(f"--only: unknown settings {unknown}; the preset has {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in a.only}
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    task_kw = {"task": a.task} if a.task else {}
    # a setting trains anchored, and refines, only where it says so (the rows name what they measure)
    base = ft.FinetuneSettings(
        steps=a.steps, progress=False, overwrite=True, anchor=False, refine_top_blocks=0, **task_kw
    )
    task = base.task or "rt"
    csv_path = results / "quality.csv"
    for seed in a.seeds:
        upper: dict | None = None  # LoRA on the original: trained once per seed, in the first run
        if a.known_upper:
            upper = known_upper(csv_path, task, seed)
        for name, kw in settings.items():
            out = run_dir(a.runs, task, seed, name)
            if "emulator_of" in kw:
                kw = {k: v for k, v in kw.items() if k != "emulator_of"}
                kw["emulator"] = str(run_dir(a.runs, task, seed, settings[name]["emulator_of"]) / "emulator")
            done = out / "report.json"
            if a.reuse and done.exists():
                r = json.loads(done.read_text())
            elif "baseline_top_blocks" in kw:
                r = top_blocks_report(replace(base, seed=seed, out=str(out), upper_bound=upper is None, **kw))
            else:
                r = ft.run(replace(base, seed=seed, out=str(out), upper_bound=upper is None, **kw))
            if "lora_original" in r:
                upper = {"lora_original": r["lora_original"], "finetune_original": r["memory"]["finetune_original"]}
            elif upper is not None:
                r = {
                    **r,
                    "lora_original": upper["lora_original"],
                    "recovery": ft.recovery(r["corrected"], r["zero_shot"], upper["lora_original"]),
                    "memory": {**r["memory"], "finetune_original": upper["finetune_original"]},
                }
            row = row_of(task, name, seed, r)
            print(json.dumps(row), flush=True)
            append_csv(row, csv_path)  # after every setting: a long run keeps what it has
    plot(read_csv(csv_path), results / "quality.png")


def run_dir(runs: str, task: str, seed: int, setting: str) -> Path:
    return Path(runs) / task / f"seed{seed}" / setting.replace(" ", "_").replace(",", "")


def known_upper(path: Path, task: str, seed: int) -> dict:
    """LoRA on the original of an earlier run of ``task`` and ``seed`` (same steps assumed)."""
    for r in read_csv(path):
        if r["task"] == task and str(r["seed"]) == str(seed) and r["lora_original"] not in ("", None):
            return {
                "lora_original": float(r["lora_original"]),
                "finetune_original": int(r["peak_mem_lora_original_mib"]) * 2**20,
            }
    raise SystemExit(f"--known-upper: {path} has no LoRA-on-the-original row for task {task}, seed {seed}")


def append_csv(row: dict, path: Path) -> None:
    rows = [
        r
        for r in read_csv(path)
        if (r["task"], r["setting"], str(r["seed"])) != (row["task"], row["setting"], str(row["seed"]))
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows + [row])


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows if rows and set(COLUMNS) <= set(rows[0]) else []


def plot(rows: list[dict], path: Path) -> None:
    """Recovery against the fine-tuning peak memory, one point per setting (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    markers = dict(zip(sorted({r["task"] for r in rows}), "osD^v"))
    # one colour per setting across tasks (tab20: no two settings of a task share one up to 20)
    names = sorted({r["setting"] for r in rows})
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["recovery"] not in ("", None)]
        by_setting: dict[str, list[dict]] = {}
        for r in mine:
            by_setting.setdefault(r["setting"], []).append(r)
        for name, rs in by_setting.items():
            x = sum(float(r["peak_mem_finetune_mib"]) for r in rs) / len(rs)
            y = sum(float(r["recovery"]) for r in rs) / len(rs)
            baseline = "baseline_top_blocks" in PRESETS["ablation"].get(name, {})  # no emulator: marked apart
            ax.scatter(
                x,
                y,
                marker="X" if baseline else markers[task],
                s=90 if baseline else None,
                color=colours[name],
                label=f"{task}: {name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
            )
    upper = [
        float(r["peak_mem_lora_original_mib"]) for r in rows if r.get("peak_mem_lora_original_mib") not in ("", None)
    ]
    if upper:
        ax.scatter(sum(upper) / len(upper), 1.0, marker="*", s=150, color="k", label="LoRA on the original")
    inference = [float(r["peak_mem_inference_mib"]) for r in rows]
    if inference:
        ax.axvline(sum(inference) / len(inference), color="r", ls=":", label="original inference peak")
    ax.axhline(0.9, color="gray", ls=":", label="target 0.9")
    ax.set_xlabel("fine-tuning peak memory (MiB, same batch)")
    ax.set_ylabel("recovery of the fine-tuning gain")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: no point hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
