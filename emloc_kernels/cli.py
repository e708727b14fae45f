"""``emloc``: the command line of the three EMLoC stages and the main job."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

RATIO_FORM = "a number in (0, 1) or regex=ratio pairs such as 'mlp=0.3,self_attn=0.5'"


def _ratio_value(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--ratio{where} must be {RATIO_FORM}; got {text!r}") from None
    if not 0.0 < value < 1.0:  # also refuses nan
        raise ValueError(
            f"--ratio{where} must be in (0, 1) (the fraction of each linear's parameters kept); got {text!r}"
        )
    return value


def _ratio(text: str) -> float | dict[str, float]:
    """``0.4`` or ``'q_proj=0.3,mlp=0.5'`` (regex=ratio pairs; the first matching pattern wins).

    Errors are ``ValueError`` s with a one-line message naming ``--ratio``."""
    if "=" not in text:
        return _ratio_value(text, "")
    ratios: dict[str, float] = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--ratio pair {item!r} has no '=': give {RATIO_FORM}")
        pattern, value = item.rsplit("=", 1)
        if pattern in ratios:
            raise ValueError(f"--ratio gives the pattern {pattern!r} twice")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--ratio pattern {pattern!r} is not a valid regular expression: {e}") from None
        ratios[pattern] = _ratio_value(value, f" of {pattern!r}")
    return ratios


def _texts(path: str, limit: int) -> list[str]:
    """Calibration texts: a .jsonl with a "text" field per line, or a plain text file, one sample per line
    (lines end at \n only)."""
    from .datafiles import read_jsonl, read_text_lines

    if path.endswith(".jsonl"):
        texts = [row["text"] for row in read_jsonl(path, "--data", ("text",))]
    else:
        texts = read_text_lines(path, "--data")
    if not texts:
        raise ValueError(f"--data {path} holds no samples")
    return texts[:limit]


def cmd_build(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from .conventions import LINEAR_TYPES, check_device, load_model, model_class, out_in_weight
    from .emulator import NotStreamable, build_emulator, save_emulator, write_emulator_from_pretrained
    from .emulator.build import dense_top_blocks
    from .emulator.calibration import find_blocks
    from .emulator.checkpoint import checkpoint_beside
    from .emulator.distill import Distillation
    from .emulator.io import read_metadata
    from .emulator.stream import empty_model
    from .files import check_output
    from .recipe.finetune import check_count, check_positive

    start = time.perf_counter()
    ratio = _ratio(a.ratio)
    check_count("calibration_samples", a.samples, "--samples")
    for name in ("distill_steps", "distill_rank", "distill_samples"):
        check_count(name, getattr(a, name))
    check_positive("distill_lr", a.distill_lr)
    check_count("dense_top_blocks", a.dense_top_blocks)
    if a.dense_top_blocks and not isinstance(ratio, float):
        raise ValueError("--dense-top-blocks needs one --ratio for all linears, not regex=ratio pairs")
    check_device(a.device)
    if a.model != "demo":
        from .recipe.models import check_model_source

        model_dir = check_model_source(a.model, "model")
    if a.model == "demo" or a.data == "demo":
        from .recipe.finetune import FinetuneSettings, calibration_set

        demo_model, demo_texts = calibration_set(
            FinetuneSettings(calibration_samples=max(a.samples, a.distill_samples))
        )
        if a.model == "demo":
            model_dir = str(demo_model)
    inputs = [model_dir, a.data]
    out = check_output(a.out, inputs, overwrite=a.overwrite)
    # finished blocks: a rerun after a kill resumes (refused early if a user's folder is there)
    partial = checkpoint_beside(out)
    pool = demo_texts if a.data == "demo" else _texts(a.data, max(a.samples, a.distill_samples))
    texts = pool[: a.samples]
    dtype = getattr(torch, a.dtype)
    model_class(model_dir)  # an emulator directory or a config without a model class: refused before the tokenizer
    dense: list[int] = []  # parameters of each linear kept dense
    if a.dense_top_blocks:
        skeleton = empty_model(model_dir)[0]
        ratio = dense_top_blocks(skeleton, cast(float, ratio), a.dense_top_blocks)
        top = find_blocks(skeleton)[1][-a.dense_top_blocks :]
        dense = [out_in_weight(m).numel() for m in top.modules() if isinstance(m, LINEAR_TYPES)]
    options: dict[str, Any] = dict(
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        device=a.device,
        quant=a.quant,
        group_size=a.group_size,
        propagate=a.propagate,
        shrinkage=a.shrinkage,
        allocate=a.allocate,
        distill=Distillation(a.distill_steps, a.distill_rank, texts=pool[: a.distill_samples], lr=a.distill_lr)
        if a.distill_steps
        else None,
    )
    try:  # one block of the original (and of the emulator) in memory at a time
        write_emulator_from_pretrained(
            model_dir, texts, out, ratio, dtype=dtype, overwrite=a.overwrite, inputs=inputs, **options
        )
    except NotStreamable as e:  # refused before any work: weights not in safetensors under the model's names
        logging.getLogger(__name__).warning("%s: loading the whole model instead", e)
        emulator = build_emulator(load_model(model_dir, dtype=dtype), texts, ratio, checkpoint=partial, **options)
        save_emulator(emulator, out, overwrite=a.overwrite, inputs=inputs)
        shutil.rmtree(partial)
    modules = read_metadata(out)["modules"]
    total = sum(m["in_features"] * m["out_features"] for m in modules.values()) + sum(dense)
    kept = sum(m["rank"] * (m["in_features"] + m["out_features"]) for m in modules.values()) + sum(dense)
    kept_dense = f" and {len(dense)} kept dense" if dense else ""
    print(
        f"emulator of {len(modules)} linears{kept_dense} written to {out} in {time.perf_counter() - start:.1f} s: "
        f"{kept / 1e6:.1f}M of {total / 1e6:.1f}M linear parameters ({kept / total:.1%})"
    )


def cmd_finetune(a: argparse.Namespace) -> None:
    from .recipe.finetune import FinetuneSettings, format_table, run

    fields = FinetuneSettings.__dataclass_fields__
    settings = FinetuneSettings(**{k: v for k, v in vars(a).items() if k in fields})
    report = run(settings)
    print(format_table(report))
    print(f"\noutputs in {settings.out} (report.json; delivered adapter: {report['delivered_adapter']})")


def cmd_correct(a: argparse.Namespace) -> None:
    from .correction import correct_adapter

    clamp = None if a.clamp in ("none", "off") else float(a.clamp)
    report = correct_adapter(a.adapter, a.emulator, a.original, a.out, clamp=clamp, overwrite=a.overwrite)
    totals = report.get("totals", {})
    print(f"corrected adapter written to {a.out}: {json.dumps(totals)}")


def cmd_merge(a: argparse.Namespace) -> None:
    from .correction import merge_adapter
    from .files import check_output, copy_tokenizer, write_dir_atomically
    from .recipe.models import check_model_source

    inputs = [a.original, a.adapter]
    check_output(a.out, inputs, overwrite=a.overwrite)
    original = check_model_source(a.original, "--original")
    model = merge_adapter(original, a.adapter)

    def write(directory: Path) -> None:
        cast(Any, model).save_pretrained(directory)
        copy_tokenizer(original, directory)

    write_dir_atomically(a.out, write, overwrite=a.overwrite, inputs=inputs, kind="merged model")
    print(f"merged model written to {a.out}")


def cmd_plan(a: argparse.Namespace) -> None:
    from .recipe.plan import Workload, architecture, choose, format_plan, parse_size, read_config

    budget = parse_size(a.budget, "--budget")
    workload = Workload(a.seq, a.batch, a.lora_rank, a.dtype, a.loss_positions)
    config, name = read_config(a.model)
    arch = architecture(config)
    choice = choose(arch, workload, budget, a.quant, a.group_size, a.max_ratio)
    print(format_plan(arch, workload, budget, choice, name, a.model))


def _shrinkage(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _build_options(p: argparse.ArgumentParser, allocate: str) -> None:
    p.add_argument(
        "--propagate",
        action="store_true",
        help="fit each block on the emulator's own inputs to the "
        "original's outputs, so later blocks compensate earlier ones (error-propagating build)",
    )
    p.add_argument(
        "--shrinkage",
        type=_shrinkage,
        default=0.0,
        help="relative ridge γ on the calibration Gram "
        "matrices, or 'auto' to choose it on held-out calibration samples (default 0)",
    )
    p.add_argument(
        "--allocate",
        default=allocate,
        choices=["uniform", "block"],
        help="uniform: every linear keeps "
        f"its ratio; block: the same parameters per block, spent where the spectra remove most error "
        f"(default {allocate})",
    )
    p.add_argument(
        "--dense-top-blocks",
        type=int,
        default=0,
        metavar="N",
        help="keep the emulator's last N blocks dense (the original's weights, which LoRA on them then meets) "
        "and compress the blocks below harder, to the same parameter budget as --ratio (default 0)",
    )


def _distill_options(p: argparse.ArgumentParser, samples: str, steps: int) -> None:
    p.add_argument(
        "--distill-steps",
        type=int,
        default=steps,
        help="after the build, train each emulated linear's last --distill-rank ranks for N steps so that the "
        f"emulator's next-token distribution matches the original's (default {steps}; 0: off)",
    )
    p.add_argument(
        "--distill-rank",
        type=int,
        default=8,
        help="ranks of each emulated linear's budget left to the distillation (default 8)",
    )
    p.add_argument(
        "--distill-lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate of the distillation (default 1e-3)",
    )
    p.add_argument(
        "--distill-samples",
        type=int,
        default=256,
        help=f"{samples} the distillation matches the original on (default 256; only the original's outputs "
        "on them are computed, no statistics)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose error message stays on one line: argparse quotes most values it
    reports, but not unrecognised arguments or ambiguous option names."""

    def error(self, message: str):  # type: ignore[override]
        super().error("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def parser(task: str | None = None) -> argparse.ArgumentParser:
    """The ``emloc`` parser; with ``task``, ``finetune`` defaults to that embedded task's
    settings (:attr:`~emloc_kernels.recipe.demo.Task.settings`) where they differ."""
    from .recipe.demo import DEFAULT_TASK, TASKS  # stdlib only

    p = _Parser(prog="emloc", description="EMLoC: fine-tune a model inside the memory its inference needs.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="stage 1: build a low-rank emulator of a model from calibration data")
    b.add_argument("model", help="transformers model directory, or 'demo' for the embedded SmolLM2-135M-Instruct")
    b.add_argument(
        "--data",
        required=True,
        help="calibration samples: .jsonl with a 'text' field, one sample per line "
        "of a text file, or 'demo' for Rotten Tomatoes training reviews in the finetune prompt",
    )
    b.add_argument("--samples", type=int, default=64, help="number of calibration samples used (default 64)")
    b.add_argument(
        "--ratio",
        default="0.4",
        help="fraction of each linear's parameters kept, in (0, 1); "
        "or regex=ratio pairs such as 'mlp=0.3,self_attn=0.5' (default 0.4)",
    )
    b.add_argument("--out", required=True, help="new directory for the emulator (refused if it exists)")
    b.add_argument("--device", default=None, help="where blocks are processed, e.g. cuda (default: where the model is)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    b.add_argument("--quant", default=None, choices=["int8", "int4"], help="quantise the emulator's factors")
    b.add_argument("--group-size", type=int, default=128, choices=[64, 128], help="int4 group size (default 128)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _build_options(b, "uniform")
    _distill_options(b, "samples of --data", 0)
    b.set_defaults(func=cmd_build)

    f = sub.add_parser(
        "finetune",
        help="the whole method on a task: label classification or generative data (chat, prompt-completion, "
        "text) (default: SmolLM2 on Rotten Tomatoes)",
    )
    f.add_argument("--model", default=None, help="causal LM directory (default: the embedded SmolLM2-135M-Instruct)")
    f.add_argument(
        "--task",
        default=None,
        choices=list(TASKS),
        help="embedded task: "
        + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
        + f" (default {DEFAULT_TASK})",
    )
    f.add_argument(
        "--data",
        default=None,
        help='training .jsonl (instead of --task), each line one of: {"messages": [{"role", "content"}, ...]} '
        '(chat template, loss on the assistant turns), {"prompt", "completion"} (loss on the completion), '
        '{"text"} (loss on all tokens) or {"text", "label"} (label classification); the first line sets the format',
    )
    f.add_argument("--eval-data", default=None, help="held-out .jsonl in the same format (needed with --data)")
    f.add_argument(
        "--prompt",
        default=None,
        help="label data: template with {text}; the label is the next word (default: the task's)",
    )
    f.add_argument("--ratio", type=float, default=0.4, help="emulator ratio in (0, 1) (default 0.4)")
    f.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8; alpha = rank)")
    f.add_argument("--steps", type=int, default=120, help="training (optimiser) steps (default 120)")
    f.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    f.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    f.add_argument("--max-length", type=int, default=256, help="tokens per example; longer ones are cut (default 256)")
    t = f.add_argument_group("training on generative data (transformers' Trainer)")
    t.add_argument("--grad-accum", type=int, default=1, help="batches per optimiser step (default 1)")
    t.add_argument(
        "--lr-scheduler",
        default="linear",
        choices=["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"],
        help="learning-rate schedule (default linear)",
    )
    t.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps warming up (default 0)")
    t.add_argument("--epochs", type=float, default=None, help="passes over the training data, instead of --steps")
    t.add_argument(
        "--save-steps",
        type=int,
        default=50,
        help="a checkpoint every N steps in the hidden work directory; the same command, rerun after a kill, "
        "resumes the training from the last one (default 50)",
    )
    t.add_argument("--log-steps", type=int, default=10, help="log the training loss every N steps (default 10)")
    f.add_argument(
        "--transfer",
        default="paper",
        help="how the LoRA is carried to the original, chosen on validation "
        "data: paper (default: uncorrected and the paper's clamps L=1, L=3, unclamped), auto (those and the "
        "activation-aware and layer-streamed transfers), uncorrected, unclamped, "
        "a clamp bound L, aware:λ (activation-aware correction) or stream:λ (layer-streamed transfer)",
    )
    f.add_argument("--clamp", default=None, help="former name of --transfer (same values)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    f.add_argument("--calibration-samples", type=int, default=64, help="emulator calibration samples (default 64)")
    f.add_argument(
        "--validation-samples",
        type=int,
        default=200,
        help="training examples held out to choose the transfer "
        "(default 200; a dataset too small for it holds out 20%% of its examples)",
    )
    f.add_argument("--eval-samples", type=int, default=None, help="use only the first N evaluation examples")
    f.add_argument("--quant", default=None, choices=["int8", "int4"], help="quantise the emulator's factors")
    f.add_argument("--group-size", type=int, default=128, choices=[64, 128], help="int4 group size (default 128)")
    f.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    f.add_argument("--out", default="runs/finetune", help="new output directory (default runs/finetune)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    f.add_argument(
        "--upper-bound",
        action="store_true",
        help="also train LoRA on the original and report its "
        "accuracy (lora_original) and the share of its gain the delivered adapter keeps (recovery)",
    )
    f.add_argument(
        "--baseline-top-blocks",
        type=int,
        default=None,
        metavar="N",
        help="also train LoRA on the original's last N blocks only (the blocks below run without autograd), a "
        "baseline that fits in about the original's inference memory; reports lora_top_blocks and its peak memory",
    )
    f.add_argument(
        "--refine-top-blocks",
        type=int,
        default=None,
        metavar="N",
        help="transfer by training: the adapter chosen on validation trains further on the original's last N "
        "blocks, whose inputs one inference pass writes to a file (the blocks below are then not held), a variant "
        "delivered only if it scores best on validation; label data (default: the last 4 blocks; 0: none)",
    )
    f.add_argument(
        "--anchor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the LoRA around the original's final hidden states on its training examples (computed "
        "once, inference only), so that it learns the task, not the emulator's errors (default: on for label "
        "data, the only kind it serves)",
    )
    f.add_argument(
        "--anchor-rounds",
        type=int,
        default=1,
        metavar="N",
        help="anchored training in N rounds: before each round after the first, the original with the LoRA "
        "so far merged in (inference only, the emulator out of memory meanwhile) gives the anchor afresh "
        "(default 1)",
    )
    f.add_argument(
        "--emulator",
        default=None,
        metavar="DIR",
        help="fine-tune on this emulator (from emloc build, or an earlier run's emulator/) instead of building "
        "one: it must come from --model, and the build options below are refused",
    )
    _build_options(f, "uniform")
    _distill_options(f, "training examples", 300)
    f.set_defaults(func=cmd_finetune, **(TASKS[task].settings if task in TASKS else {}))

    c = sub.add_parser("correct", help="stage 3: correct an adapter trained on the emulator for the original model")
    c.add_argument("adapter", help="PEFT LoRA directory trained on the emulator")
    c.add_argument("--emulator", required=True, help="emulator directory (from emloc build)")
    c.add_argument("--original", required=True, help="original model directory")
    c.add_argument("--out", required=True, help="new directory for the corrected adapter")
    c.add_argument("--clamp", default="3", help="per-row bound L on the correction (default 3); 'none' disables it")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_correct)

    pl = sub.add_parser(
        "plan",
        help="the largest emulator ratio (and least quantisation) whose LoRA fine-tuning fits a memory budget, "
        "estimated from config.json alone",
    )
    pl.add_argument("model", help="model directory, Hugging Face id in the local cache, or 'demo' (SmolLM2-135M)")
    pl.add_argument(
        "--budget", required=True, help="memory budget: 24GB (10⁹ bytes), 24GiB (2³⁰), 500MB, 0.5GiB, bytes"
    )
    pl.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    pl.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on every block linear (default 16)")
    pl.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="emulator factors: auto (default) takes the least quantisation that reaches the largest ratio",
    )
    pl.add_argument("--group-size", type=int, default=128, choices=[64, 128], help="int4 group size (default 128)")
    pl.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="training dtype (default bfloat16)",
    )
    pl.add_argument(
        "--loss-positions",
        default="all",
        choices=["all", "last"],
        help="all (default): causal-LM loss on every position; last: the last position only (emloc finetune's task)",
    )
    pl.add_argument("--max-ratio", type=float, default=0.5, help="largest ratio considered (default 0.5)")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("merge", help="merge a (corrected) adapter into the original model and save it")
    m.add_argument("adapter", help="PEFT LoRA directory")
    m.add_argument("--original", required=True, help="original model directory")
    m.add_argument("--out", required=True, help="new directory for the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "task", None) is not None:  # parsed again: the options given override the task's settings
        args = parser(args.task).parse_args(argv)
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: a
    # warning per adapter loaded that no user of the command can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    log = logging.getLogger("emloc_kernels")
    if not log.handlers:  # the library's notes (such as a resumed build) on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"emloc {args.command}: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"emloc {args.command}: error: interrupted; run the same command again to resume\n")
        sys.exit(130)
    except (ValueError, OSError) as e:  # OSError: files that cannot be read or written, a full disk
        sys.exit(f"emloc {args.command}: error: {' '.join(str(e).split())}")
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' error for a damaged file
            raise
        sys.exit(f"emloc {args.command}: error: a damaged safetensors file ({' '.join(str(e).split())})")


if __name__ == "__main__":
    main()
