"""How close is an emulator to its original, before any fine-tuning? (stage 1 ablation)

For each build setting: build time, mean per-module error on held-out calibration samples,
and on the validation split of the main job (never the test split): the next-token KL
divergence from the original, the emulator's loss on the prompt+answer texts, and its
zero-shot accuracy.  Fast enough to compare many build options before paying for a full run.

    python bench/emulator_fidelity.py --setting plain --setting "propagate,shrinkage=auto" --samples 64
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from emloc_kernels.emulator import build_emulator
from emloc_kernels.emulator.calibration import as_batches
from emloc_kernels.emulator.distill import distill_emulator, teacher_states
from emloc_kernels.recipe.finetune import FinetuneSettings, calibration_texts, prepare
from emloc_kernels.recipe.models import load_model
from emloc_kernels.recipe.task import accuracy, fill_prompt

OUT = Path(__file__).parent / "results" / "emulator_fidelity.csv"


def parse_setting(text: str) -> dict:
    """``"propagate,shrinkage=auto,allocate=block"`` → build_emulator keyword arguments."""
    kwargs: dict = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "plain":
            continue
        if not value:
            kwargs[key] = True
        else:
            try:
                kwargs[key] = float(value)
            except ValueError:
                kwargs[key] = value
    return kwargs


@torch.no_grad()
def logits_on(model, task, texts: list[str]) -> list[torch.Tensor]:
    tok = task.tokenizer
    out = []
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        out.append((ids, model(input_ids=ids).logits[0].float()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", required=True)
    p.add_argument("--samples", type=int, action="append", help="calibration texts (repeatable); default 64")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--quant", default=None)
    p.add_argument("--validation", type=int, default=100, help="validation texts scored")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    s = FinetuneSettings(validation_samples=200, calibration_samples=max(args.samples or [64]))
    model_path, task, train_rows, val_rows, _ = prepare(s)
    val_rows = val_rows[: args.validation]
    val_texts = [fill_prompt(s.prompt, r["text"]) + " " + r["label"] for r in val_rows]
    original, _ = load_model(model_path, torch.device("cpu"), torch.float32)
    reference = logits_on(original, task, val_texts)
    zero_shot = accuracy(original, task, val_rows)
    del original
    rows = []
    for samples in args.samples or [64]:
        calib = calibration_texts(FinetuneSettings(calibration_samples=samples), train_rows)
        for setting in args.setting:
            model, _ = load_model(model_path, torch.device("cpu"), torch.float32)
            t = time.perf_counter()
            options = parse_setting(setting)
            # distill=STEPS[,distill_rank=ρ,distill_texts=N,distill_lr=η]: distil on N training texts
            # (default: the calibration)
            steps, rank = int(options.pop("distill", 0)), int(options.pop("distill_rank", 8))
            distill_lr = float(options.pop("distill_lr", 1e-3))
            texts = int(options.pop("distill_texts", samples))
            if steps:
                distill_calib = calibration_texts(FinetuneSettings(calibration_samples=texts), train_rows)
                batches = as_batches(distill_calib, task.tokenizer, 256, model=model)
                teacher = teacher_states(model, batches)
            build_emulator(
                model,
                calib,
                args.ratio,
                tokenizer=task.tokenizer,
                progress=False,
                quant=args.quant,
                reserve_rank=rank if steps else 0,
                **options,
            )
            if steps:
                distilled = distill_emulator(
                    model, batches, teacher, rank=rank, steps=steps, lr=distill_lr, progress=False
                )
                print(json.dumps({k: v for k, v in distilled.items() if k != "losses"}), flush=True)
            seconds = time.perf_counter() - t
            kl = loss = n = 0.0
            for (ids, ref), (_, emu) in zip(reference, logits_on(model, task, val_texts)):
                kl += F.kl_div(emu.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
                loss += F.cross_entropy(emu[:-1], ids[0, 1:], reduction="sum").item()
                n += ids.shape[1]
            infos = model.emloc_metadata["modules"].values()
            held = [i["heldout_error"] for i in infos if i.get("heldout_error") is not None]
            row = {
                "setting": setting,
                "samples": samples,
                "ratio": args.ratio,
                "quant": args.quant or "",
                "tokens": model.emloc_metadata["calibration"]["tokens"],
                "build_s": round(seconds, 1),
                "calibration_error": round(sum(i["calibration_error"] for i in infos) / len(infos), 4),
                "heldout_error": round(sum(held) / len(held), 4) if held else "",
                "kl_to_original": round(kl / n, 4),
                "emulator_loss": round(loss / n, 4),
                "emulator_val_acc": round(accuracy(model, task, val_rows), 3),
                "original_val_acc": round(zero_shot, 3),
                "params": sum(i["rank"] * (i["in_features"] + i["out_features"]) for i in infos),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            new = not args.out.exists()
            with args.out.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            del model


if __name__ == "__main__":
    main()
