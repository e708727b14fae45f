"""Stage 3 alone on finished runs: each transfer method applied to a run's saved emulator and
adapter, scored on the original with the run's own validation and test splits.

    python bench/transfers.py runs/quality/rt/seed0/paper_build_0.4 [--transfer stream:0 aware:1 ...]

Appends one row per run and method to ``bench/results/transfers.csv`` as soon as it exists, so
a method can be compared without retraining.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from peft import PeftModel

from emloc_kernels.correction import correct_adapter
from emloc_kernels.recipe.finetune import (
    FinetuneSettings,
    _variant_dir,
    calibration_texts,
    device_and_dtype,
    prepare,
    recovery,
    transfer_variants,
)
from emloc_kernels.recipe.models import load_model
from emloc_kernels.recipe.task import accuracy
from emloc_kernels.transfer import correct_adapter_aware, transfer_adapter

COLUMNS = ["run", "transfer", "validation", "test", "zero_shot", "lora_original", "recovery", "seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--transfer", nargs="+", default=["aware:1", "stream:0", "stream:0.5"])
    p.add_argument("--upper", type=float, default=None, help="lora_original to compute recovery (default: the run's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfers.csv")
    a = p.parse_args()
    for run in a.runs:
        report = json.loads((run / "report.json").read_text())
        known = FinetuneSettings.__dataclass_fields__
        s = FinetuneSettings(
            **{k: v for k, v in report["settings"].items() if k in known and k != "model" and v is not None}
        )
        model_path, task, train_rows, val_rows, test_rows = prepare(s)
        device, dtype = device_and_dtype(s)
        calib = calibration_texts(s, train_rows)
        upper = a.upper if a.upper is not None else report.get("lora_original")
        for choice in a.transfer:
            for name, (method, param) in transfer_variants(choice).items():
                original, _ = load_model(model_path, device, dtype)
                target = run / _variant_dir(name)
                start = time.perf_counter()
                if method == "paper" and not target.exists():
                    correct_adapter(run / "adapter", run / "emulator", model_path, target, clamp=param, progress=False)
                elif method in ("aware", "stream") and not target.exists():
                    fn = correct_adapter_aware if method == "aware" else transfer_adapter
                    fn(
                        run / "adapter",
                        run / "emulator",
                        original,
                        calib,
                        target,
                        lam=param,
                        tokenizer=task.tokenizer,
                        device=device,
                        progress=True,
                    )
                seconds = time.perf_counter() - start
                model = PeftModel.from_pretrained(original, target)
                row = {
                    "run": str(run),
                    "transfer": name,
                    "validation": accuracy(model, task, val_rows),
                    "test": accuracy(model, task, test_rows),
                    "zero_shot": report["zero_shot"],
                    "lora_original": upper,
                    "seconds": round(seconds, 1),
                }
                row["recovery"] = None if upper is None else recovery(row["test"], report["zero_shot"], upper)
                print(json.dumps(row), flush=True)
                new = not a.out.exists()
                a.out.parent.mkdir(parents=True, exist_ok=True)
                with a.out.open("a", newline="") as f:
                    w = csv.DictWriter(f, COLUMNS)
                    if new:
                        w.writeheader()
                    w.writerow(row)


if __name__ == "__main__":
    main()
