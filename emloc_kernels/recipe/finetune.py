"""The main job: the whole EMLoC method on one task, end to end.

Build the emulator from calibration samples of the training data, train LoRA on it,
correct the adapter for the original model (choosing the clamp on a validation split of the
training data, evaluated on the original), and report accuracies (label classification) or
held-out loss and perplexity (generative data: chat, prompt-completion, text) and peak memory.

Label classification trains with a plain AdamW loop (:func:`train`); generative data with
transformers' ``Trainer`` (:func:`train_with_trainer`), whose checkpoints in the run's work
directory let a killed run resume its training.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, cast

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..conventions import LINEAR_TYPES, check_built_from, check_device, hidden_states_as_logits, out_in_weight
from ..conventions import load_model as load_checkpoint
from ..correction import correct_adapter
from ..emulator import build_emulator, load_emulator, save_emulator
from ..emulator.build import dense_top_blocks
from ..emulator.calibration import find_blocks, to_device
from ..emulator.distill import Distillation
from ..emulator.io import read_metadata
from ..files import check_output, copy_tokenizer, write_dir_atomically, write_dir_resumably
from ..modules import LowRankLinear
from ..transfer import correct_adapter_aware, transfer_adapter
from . import demo
from .data import IGNORE, LABEL, GenerativeTask, lm_loss, perplexity, read_rows, shifted_nll
from .memory import peak_in_fresh_process
from .models import attach_lora, check_model_source, load_model, load_tokenizer
from .task import NO_PLAIN_HEAD, LabelTask, accuracy, fill_prompt, last_hidden_states, loss_on
from .top_blocks import attach_adapter_top_blocks, write_refined_adapter

logger = logging.getLogger(__name__)
# how a LoRA trained on the emulator becomes one for the original: (method, parameter)
#   none: as trained; paper: the paper's correction with clamp L (None: unclamped);
#   aware: activation-aware correction with λ; stream: layer-streamed transfer with λ
TRANSFERS = {
    "uncorrected": ("none", None),
    "L=1": ("paper", 1.0),
    "L=3": ("paper", 3.0),
    "unclamped": ("paper", None),
    "aware:1": ("aware", 1.0),
    "stream:0": ("stream", 0.0),
    "stream:0.5": ("stream", 0.5),
}
PAPER_TRANSFERS = ("uncorrected", "L=1", "L=3", "unclamped")
# the Trainer's checkpoints in the work directory (removed once their training is done)
CHECKPOINTS, CHECKPOINTS_ORIGINAL = "checkpoints", "checkpoints-original"
CPU = torch.device("cpu")
ANCHOR = "anchor_original.pt"  # the original's final hidden states on the training rows (--anchor)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# the Trainer's options: label data trains with the plain loop and refuses other values than these
TRAINER_DEFAULTS = {"grad_accum": 1, "lr_scheduler": "linear", "warmup_ratio": 0.0, "epochs": None}
VALIDATION_SHARE = 0.2  # of a dataset too small for --validation-samples
# the settings that shape the emulator's build: a run given a built one (--emulator) refuses them
BUILD_OPTIONS = (
    "ratio",
    "quant",
    "group_size",
    "propagate",
    "shrinkage",
    "allocate",
    "distill_steps",
    "distill_rank",
    "distill_lr",
    "distill_samples",
    "dense_top_blocks",
)


# counts a run accepts: (smallest, largest)
COUNTS = {
    "steps": (1, 10**8),
    "batch_size": (1, 4096),
    "lora_rank": (1, 4096),
    "calibration_samples": (1, 10**7),
    "validation_samples": (1, 10**7),
    "eval_samples": (1, 10**9),
    "max_length": (8, 10**6),
    "seed": (0, 2**32 - 1),
    "distill_steps": (0, 10**8),
    "distill_rank": (1, 4096),
    "distill_samples": (1, 10**7),
    "anchor_rounds": (1, 10**6),
    "baseline_top_blocks": (1, 10**6),
    "dense_top_blocks": (0, 10**6),
    "refine_top_blocks": (0, 10**6),
}


# the blocks the adapter trains further on by default (label data): on SmolLM2 the refined adapter
# scored higher on validation in every run measured, below the original's inference peak
# (bench/RESULTS.md); the validation choice still delivers the unrefined one where it scores higher
REFINE_TOP_BLOCKS = 4


def check_count(name: str, value: Any, option: str | None = None) -> None:
    """A ValueError naming the option (``--name``, or ``option``) unless ``value`` is an integer
    in the range :data:`COUNTS` gives ``name``."""
    low, high = COUNTS[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        option = option or f"--{name.replace('_', '-')}"
        raise ValueError(f"{option} must be an integer from {low} to {high}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """A ValueError naming the option ``--name`` unless ``value`` is a positive finite number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"--{name.replace('_', '-')} must be a positive finite number, got {value!r}")


@dataclass
class FinetuneSettings:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    data: str | None = None  # None: the embedded task's data
    eval_data: str | None = None
    prompt: str | None = None  # None: the task's prompt (Rotten Tomatoes' with --data)
    ratio: float = 0.4
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: = lora_rank (scaling 1)
    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    transfer: str = (
        "paper"  # auto (chosen on validation) | paper (the paper's clamps) | a TRANSFERS name, L, aware:λ, stream:λ
    )
    clamp: str | None = None  # the former name of --transfer, still accepted
    seed: int = 0
    out: str = "runs/finetune"
    calibration_samples: int = 64
    validation_samples: int = 200
    eval_samples: int | None = None  # None: the whole evaluation set
    quant: str | None = None
    group_size: int = 128
    device: str | None = None
    max_length: int = 256
    overwrite: bool = False
    progress: bool = True
    # stage-1 options of build_emulator (see its docstring)
    propagate: bool = False
    shrinkage: float | str = 0.0
    allocate: str = "uniform"  # "block": RT recovery 0.86 / 0.29 over two seeds (bench/RESULTS.md)
    distill_steps: int = 300  # distilling the emulator toward the original (0: none); RT recovery 0.61 → 0.88
    distill_rank: int = 8  # rank each emulated linear spends on the distillation (within its budget)
    distill_samples: int = 256  # training examples the distillation matches the original on
    distill_lr: float = 1e-3  # the distillation's AdamW learning rate
    # keep the last N blocks dense, the others compressed to spend --ratio's parameters on all
    dense_top_blocks: int = 0
    # train the LoRA on the emulator around the original's final hidden states (the loss sees
    # h_E(x; LoRA) + h_O(x) − h_E(x)); see train().  None: on for label data (the only kind it
    # serves); RT recovery 0.76 → 0.85 over three seeds (bench/RESULTS.md)
    anchor: bool | None = None
    # anchored training in N rounds: before each round after the first, the original with the
    # LoRA so far (merged, inference only) gives the anchor afresh; see train_in_rounds()
    anchor_rounds: int = 1
    upper_bound: bool = False  # also train LoRA on the original: report lora_original and recovery
    # also train LoRA on the original's last N blocks only (no autograd below them): a baseline
    # that fits in about the original's inference memory; report lora_top_blocks and its peak
    baseline_top_blocks: int | None = None
    # transfer by training: the adapter chosen on validation, trained further on the original's
    # last N blocks, the blocks below replayed from their outputs (refine_on_original); a variant
    # of its own, delivered only if it scores best on validation (0: none). None: the last
    # REFINE_TOP_BLOCKS for label data (on a smaller model all but the first), none for generative
    refine_top_blocks: int | None = None
    emulator: str | None = None  # a built emulator directory to use instead of building one
    task: str | None = None  # an embedded task (demo.TASKS); None: Rotten Tomatoes
    # generative data (transformers' Trainer) only
    grad_accum: int = 1  # gradient accumulation: batches per optimiser step
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0  # share of the steps with a linear warm-up
    epochs: float | None = None  # passes over the training data instead of --steps
    save_steps: int = 50  # a checkpoint every N steps in the work directory (a rerun resumes from it)
    log_steps: int = 10  # the training loss logged (and plotted) every N steps

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.grad_accum < 1 or self.save_steps < 1 or self.log_steps < 1:
            raise ValueError("--grad-accum, --save-steps and --log-steps must be at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.task is not None and (self.data is not None or self.eval_data is not None):
            raise ValueError(
                f"--task {self.task} and --data/--eval-data exclude each other: "
                "--task runs embedded data, --data your own"
            )
        if self.emulator is not None:
            self._check_no_build_options()
        if self.prompt is None:
            self.prompt = demo.get_task(self.task).prompt
        else:
            demo.get_task(self.task)  # an unknown name fails here, before any work
            if "{text}" not in self.prompt:
                raise ValueError(
                    f"--prompt must contain the placeholder {{text}} (other braces are kept as written), "
                    f"got {self.prompt!r}"
                )

    def _check_no_build_options(self) -> None:
        """With ``--emulator``, the build options keep their (task's) defaults: the emulator
        is built already, and a setting it did not follow must not pass unnoticed."""
        defaults = {f.name: f.default for f in fields(self)} | dict(demo.get_task(self.task).settings)
        changed = [k for k in BUILD_OPTIONS if getattr(self, k) != defaults[k]]
        if changed:
            options = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(
                f"{options}: options of the emulator's build, which --emulator {self.emulator} has done already; "
                "drop them, or drop --emulator to build a new emulator"
            )

    def _check_numbers(self) -> None:
        """Counts, learning rate and device in range, before any work (the CLI's options by name)."""
        for name in COUNTS:
            value = getattr(self, name)
            if value is None and name in ("eval_samples", "baseline_top_blocks", "refine_top_blocks"):
                continue
            check_count(name, value)
        for name in ("lr", "lora_alpha", "distill_lr"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        check_device(self.device)


def batch_schedule(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The row indices of every training step: passes over the shuffled rows, in order."""
    order = random.Random(seed)
    pool: list[int] = []
    batches = []
    for _ in range(steps):
        if len(pool) < batch_size:
            pool += order.sample(range(n_rows), n_rows)
        batches.append(pool[:batch_size])
        pool = pool[batch_size:]
    return batches


def train(
    model: torch.nn.Module,
    task: LabelTask,
    rows: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    progress: bool = True,
    offsets: dict[int, torch.Tensor] | None = None,
) -> list[float]:
    """Plain AdamW loop over shuffled batches; returns the loss per step.

    ``offsets`` (row index → hidden-size vector, for every row the schedule uses) anchor the
    training: the output head reads the model's final hidden state plus the row's offset.
    With ``h_O − h_E`` (the original's and the emulator's hidden states before training) the
    loss is that of ``h_O(x) + [h_E(x; LoRA) − h_E(x)]``: the original's starting point moved by
    what the LoRA does to the emulator, a first-order stand-in for the original with the
    LoRA, so the LoRA is not trained to repair the emulator's own errors."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return train_steps(
        model, task, rows, batch_schedule(len(rows), steps, batch_size, seed), opt, device, progress, offsets
    )


def train_steps(
    model: torch.nn.Module,
    task: LabelTask,
    rows: list[dict],
    schedule: list[list[int]],
    opt: torch.optim.Optimizer,
    device: torch.device,
    progress: bool = True,
    offsets: dict[int, torch.Tensor] | None = None,
) -> list[float]:
    """The steps of :func:`train` for the batches of ``schedule`` (row indices), with ``opt``."""
    model.train()
    losses: list[float] = []
    bar = tqdm(schedule, desc="LoRA training", unit="step", disable=not progress)
    with hidden_states_as_logits(model) if offsets is not None else contextlib.nullcontext() as head:
        if offsets is not None and head is None:
            raise ValueError(NO_PLAIN_HEAD)
        for picked in bar:
            batch = task.encode([rows[i] for i in picked], device)
            anchor = None
            if offsets is not None and head is not None:
                anchor = (head, torch.stack([offsets[i] for i in picked]).to(device))
            loss = loss_on(model, batch, anchor)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def anchor_rounds(schedule: list[list[int]], rounds: int) -> list[list[list[int]]]:
    """``schedule`` cut into ``rounds`` consecutive runs of steps (as even as can be; none empty)."""
    rounds = min(rounds, len(schedule))
    return [schedule[len(schedule) * k // rounds : len(schedule) * (k + 1) // rounds] for k in range(rounds)]


def rows_of(steps: list[list[int]]) -> list[int]:
    """The distinct rows ``steps`` use, sorted."""
    return sorted({i for b in steps for i in b})


def report_to() -> str:
    """TensorBoard when it is installed, else no logger."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


def train_with_trainer(
    s: FinetuneSettings,
    model: torch.nn.Module,
    task: GenerativeTask,
    features: list[dict[str, list[int]]],
    checkpoints: Path,
    device: torch.device,
) -> dict[str, list]:
    """LoRA training on generative data with transformers' ``Trainer``: ``--batch-size`` examples
    per batch, ``--grad-accum`` batches per step, ``--steps`` steps (or ``--epochs`` passes),
    AdamW with ``--lr``, ``--lr-scheduler`` and ``--warmup-ratio``.

    A checkpoint is saved in ``checkpoints`` every ``--save-steps`` steps; training resumes
    from the last one there (a killed run, rerun). Returns the logged training losses and
    their steps."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        weight_decay=0.01,  # torch's AdamW default, as in the classification loop
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # a float in [0, 1) is a share of the steps
        max_steps=s.steps if s.epochs is None else -1,
        num_train_epochs=s.epochs if s.epochs is not None else 1.0,
        logging_steps=s.log_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=1,
        report_to=report_to(),
        seed=s.seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=not s.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is not None:
        logger.warning("resuming the training from its checkpoint %s", last)
    with hidden_states_as_logits(model) as head:

        def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            """Mean over the loss tokens of the whole step (Trainer counts them over the accumulated
            batches and the processes), the logits made a chunk at a time."""
            count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE).sum()
            return shifted_nll(outputs.logits, labels, head) / count

        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=cast(Any, features),
            data_collator=task.collate,
            compute_loss_func=loss,
        )
        trainer.train(resume_from_checkpoint=last)
    model.eval()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {"losses": [float(h["loss"]) for h in logged], "steps": [int(h["step"]) for h in logged]}


def transfer_variants(choice: str) -> dict[str, tuple[str, float | None]]:
    """The transfers a run evaluates: ``auto`` all of :data:`TRANSFERS`, ``paper`` the paper's
    clamps and the uncorrected adapter, else one: a name, a clamp bound ``L``, ``aware:λ`` or
    ``stream:λ``."""
    if choice == "auto":
        return dict(TRANSFERS)
    if choice == "paper":
        return {n: TRANSFERS[n] for n in PAPER_TRANSFERS}
    if choice in TRANSFERS:
        return {choice: TRANSFERS[choice]}
    method, _, value = choice.rpartition(":")
    allowed = f"auto, paper, {', '.join(TRANSFERS)}, a clamp bound L > 0, aware:λ or stream:λ"
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"transfer (or clamp) must be one of {allowed}; got {choice!r}") from None
    if method == "" and number > 0:
        return {f"L={number:g}": ("paper", number)}
    if method in ("aware", "stream") and 0 <= number <= 1:
        return {f"{method}:{number:g}": (method, number)}
    raise ValueError(f"transfer (or clamp) must be one of {allowed} (0 ≤ λ ≤ 1); got {choice!r}")


def _variant_dir(name: str) -> str:
    if name == "uncorrected":
        return "adapter"
    if name.startswith("L=") or name == "unclamped":
        return f"corrected-{name.replace('=', '')}"
    return name.replace(":", "-")


def _data(s: FinetuneSettings) -> tuple[str, list[dict], list[dict]]:
    """The data format and the (train, test) rows."""
    if s.data is None and s.eval_data is None:
        task = demo.get_task(s.task)
        return (task.format, *task.load(seed=0))
    if s.data is None or s.eval_data is None:
        raise ValueError("give both --data and --eval-data (or neither, for an embedded task)")
    fmt, train = read_rows(s.data, "--data")
    eval_fmt, test = read_rows(s.eval_data, "--eval-data")
    if eval_fmt != fmt:
        raise ValueError(f"--eval-data {s.eval_data} is in the {eval_fmt!r} format, --data {s.data} in {fmt!r}")
    return fmt, train, test


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def last_blocks(n: int) -> str:
    return f"last {n} block{'s' * (n > 1)}"


def _variant_label(name: str) -> str:
    if name == "uncorrected":
        return "original + adapter, uncorrected"
    if name.startswith("refined"):
        return f"original + adapter {name}"
    return f"original + corrected adapter ({name})"


def format_table(report: dict) -> str:
    """The one table the job prints (markdown): accuracies for label data, held-out loss per
    token and perplexity for generative data."""
    metric = report.get("metric", "accuracy")
    acc = report[metric]
    rows = [("original, zero-shot", acc["zero_shot"], ""), ("emulator, zero-shot", acc["emulator"], "")]
    for name, v in report["variants"].items():
        label = _variant_label(name)
        mark = " ← delivered" if name == report["chosen"] else ""
        val = f"{v['validation']:.3f}" if v.get("validation") is not None else "–"
        rows.append((label + mark, v["test"], val))
    if acc.get("lora_original") is not None:
        rows.append(("original + LoRA trained on it (upper bound)", acc["lora_original"], ""))
    if acc.get("lora_top_blocks") is not None:
        blocks = report["settings"]["baseline_top_blocks"]
        rows.append((f"original + LoRA on its {last_blocks(blocks)} only (baseline)", acc["lora_top_blocks"], ""))
    if metric == "accuracy":
        lines = ["| model | test accuracy | validation accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {a:.3f} | {val} |" for name, a, val in rows]
    else:
        lines = ["| model | test loss | test perplexity | validation loss |", "|---|---|---|---|"]
        lines += [f"| {name} | {a:.3f} | {perplexity(a):.2f} | {val} |" for name, a, val in rows]
    if acc.get("recovery") is not None:
        lines += ["", f"recovery (delivered − zero-shot) / (upper bound − zero-shot): {acc['recovery']:.2f}"]
    mem = report["memory"]
    lines += [
        "",
        "| peak memory (same batch) | bytes |",
        "|---|---|",
        f"| original, inference | {_mib(mem['inference'])} |",
        f"| emulator, LoRA fine-tuning | {_mib(mem['finetune'])} |",
    ]
    if "finetune_original" in mem:  # --upper-bound
        lines.append(f"| original, LoRA fine-tuning | {_mib(mem['finetune_original'])} |")
    if "finetune_refine" in mem:  # --refine-top-blocks
        blocks = report["settings"]["refine_top_blocks"]
        lines.append(f"| original + adapter, refined on its {last_blocks(blocks)} | {_mib(mem['finetune_refine'])} |")
    if "finetune_top_blocks" in mem:  # --baseline-top-blocks
        blocks = report["settings"]["baseline_top_blocks"]
        lines.append(f"| original, LoRA on its {last_blocks(blocks)} | {_mib(mem['finetune_top_blocks'])} |")
    b = report["bytes"]
    lines += [
        "",
        f"emulated linears: {_mib(b['emulator_linears'])} "
        f"({b['emulator_linears'] / b['original_linears_fp16']:.1%} of the same linears in fp16); "
        f"whole emulator {_mib(b['emulator_total'])} vs original {_mib(b['original_total'])}",
    ]
    return "\n".join(lines)


def device_and_dtype(s: FinetuneSettings) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when there is a GPU, else the CPU in fp32."""
    device = check_device(s.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def validation_size(s: FinetuneSettings, n: int) -> int:
    """``--validation-samples``, or, when the data is too small for it and a training batch,
    a share of the data (at least one example) with a warning."""
    if n < 2:
        raise ValueError(f"--data has {n} example(s); need at least two (one for validation, one to train on)")
    if n > s.validation_samples + s.batch_size:
        return s.validation_samples
    size = max(1, int(n * VALIDATION_SHARE))
    logger.warning(
        "--data has %d examples, too few for --validation-samples %d and a batch of --batch-size %d: "
        "%d examples (%.0f%%) are held out for validation instead",
        n,
        s.validation_samples,
        s.batch_size,
        size,
        100 * VALIDATION_SHARE,
    )
    return size


Task = LabelTask | GenerativeTask


def prepare(s: FinetuneSettings) -> tuple[Path, Task, list[dict], list[dict], list[dict]]:
    """The model path, the task and the (train, validation, test) rows a run with ``s`` uses."""
    model_path = Path(check_model_source(s.model, "--model")) if s.model else demo.smollm2_path()
    fmt, train_rows, test_rows = _data(s)
    train_rows = train_rows[:]
    random.Random(s.seed).shuffle(train_rows)
    n_val = validation_size(s, len(train_rows))
    val_rows, train_rows = train_rows[:n_val], train_rows[n_val:]
    test_rows = test_rows[: s.eval_samples] if s.eval_samples else test_rows
    if fmt != LABEL:
        return (
            model_path,
            GenerativeTask(load_tokenizer(model_path), fmt, s.max_length),
            train_rows,
            val_rows,
            test_rows,
        )
    task = LabelTask.create(
        load_tokenizer(model_path), cast(str, s.prompt), [r["label"] for r in train_rows], s.max_length
    )
    task.check_labels(test_rows, "--eval-data")
    return model_path, task, train_rows, val_rows, test_rows


def _check_vocabulary(model_path: Path, task: Task) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows (they do not belong
    together: ids past the end would index out of range)."""
    from transformers import AutoConfig

    vocab = getattr(AutoConfig.from_pretrained(model_path), "vocab_size", None)
    size = len(cast(Any, task.tokenizer))
    if isinstance(vocab, int) and size > vocab:
        raise ValueError(
            f"--model {model_path}: its tokenizer has {size} ids but the model only {vocab}; they do not belong together"
        )


def calibration_texts(
    s: FinetuneSettings, train_rows: list[dict], task: Task | None = None, count: int | None = None
) -> list[str]:
    """The first ``count`` (default ``calibration_samples``) training examples as the model will
    see them: prompt and answer (the chat template's rendering, prompt and completion, or the
    text for generative data)."""
    rows = train_rows[: s.calibration_samples if count is None else count]
    if isinstance(task, GenerativeTask):
        return [task.render(r) for r in rows]
    return [fill_prompt(cast(str, s.prompt), r["text"]) + " " + r["label"] for r in rows]


def calibration_set(s: FinetuneSettings) -> tuple[Path, list[str]]:
    """The model path and the calibration texts a run with ``s`` builds its emulator from."""
    model_path, task, train_rows, _, _ = prepare(s)
    return model_path, calibration_texts(s, train_rows, task)


@dataclass
class Run:
    """What a run works with, derived once from its settings (checked on creation)."""

    settings: FinetuneSettings
    model_path: Path
    task: Task
    train_rows: list[dict]
    val_rows: list[dict]
    test_rows: list[dict]
    device: torch.device
    dtype: torch.dtype
    alpha: float
    variants: dict[str, tuple[str, float | None]]
    anchor: bool  # the settings' anchor, resolved for the data
    refine_top_blocks: int  # the settings' refine_top_blocks, resolved for the data and the model

    @classmethod
    def create(cls, s: FinetuneSettings) -> "Run":
        if not 0 < s.ratio < 1:
            raise ValueError(f"--ratio must be in (0, 1), got {s.ratio}")
        variants = transfer_variants(s.clamp if s.clamp is not None else s.transfer)
        device, dtype = device_and_dtype(s)
        alpha = float(s.lora_alpha if s.lora_alpha is not None else s.lora_rank)
        model_path, task, train_rows, val_rows, test_rows = prepare(s)
        _check_vocabulary(model_path, task)
        if s.emulator is not None:
            read_metadata(s.emulator)  # an emulator directory, or refused before any work
        from transformers import AutoConfig

        blocks = AutoConfig.from_pretrained(model_path).num_hidden_layers
        if s.baseline_top_blocks is not None or s.dense_top_blocks or s.refine_top_blocks:
            for option, value in (
                ("--baseline-top-blocks", s.baseline_top_blocks),
                ("--refine-top-blocks", s.refine_top_blocks),
            ):
                if value is not None and value > blocks:
                    raise ValueError(f"{option} must be at most the model's {blocks} blocks, got {value}")
            if s.dense_top_blocks >= s.ratio * blocks:  # the blocks below would get no parameters
                raise ValueError(
                    f"--dense-top-blocks must be less than --ratio × the model's blocks "
                    f"({s.ratio} × {blocks} = {s.ratio * blocks:g}), got {s.dense_top_blocks}"
                )
        anchor = isinstance(task, LabelTask) if s.anchor is None else s.anchor
        if anchor and not isinstance(task, LabelTask):
            raise ValueError(
                "--anchor: for label classification data only (the loss reads one hidden state per example)"
            )
        if s.anchor_rounds > 1 and not anchor:
            raise ValueError(f"--anchor-rounds {s.anchor_rounds}: rounds of anchored training need --anchor")
        refine = s.refine_top_blocks
        if refine is None:
            refine = min(REFINE_TOP_BLOCKS, blocks - 1) if isinstance(task, LabelTask) else 0
        elif refine and not isinstance(task, LabelTask):
            raise ValueError(
                "--refine-top-blocks: for label classification data only (it replays the inputs of the top "
                "blocks batch by batch, which transformers' Trainer for generative data does not let it do)"
            )
        if isinstance(task, LabelTask):
            changed = [k for k, v in TRAINER_DEFAULTS.items() if getattr(s, k) != v]
            if changed:
                options = ", ".join("--" + k.replace("_", "-") for k in changed)
                raise ValueError(
                    f"{options}: for generative data (messages, prompt-completion, text) only; "
                    "label classification trains with its plain AdamW loop"
                )
        return cls(s, model_path, task, train_rows, val_rows, test_rows, device, dtype, alpha, variants, anchor, refine)

    @property
    def generative(self) -> bool:
        return isinstance(self.task, GenerativeTask)

    @property
    def higher_is_better(self) -> bool:
        """Accuracy for label data; loss (lower is better) for generative data."""
        return not self.generative

    def features(self, split: str) -> list[dict[str, list[int]]]:
        """The encoded rows of ``split`` (train, validation or test) for generative data."""
        if split not in self._features:
            rows = {"train": self.train_rows, "validation": self.val_rows, "test": self.test_rows}[split]
            what = {"train": "--data", "validation": "--data (validation)", "test": "evaluation data"}[split]
            self._features[split] = cast(GenerativeTask, self.task).features(rows, what)
        return self._features[split]

    def __post_init__(self) -> None:
        self._features: dict[str, list[dict[str, list[int]]]] = {}

    def evaluate(self, model: nn.Module, split: str) -> float:
        """Accuracy (label data) or mean loss per token (generative data) of ``model`` on the
        validation or test split."""
        if isinstance(self.task, LabelTask):
            return accuracy(model, self.task, self.val_rows if split == "validation" else self.test_rows)
        return lm_loss(model, self.task, self.features(split))

    def write_memory_batch(self, path: Path) -> Path:
        """The first training batch, as the fresh-process memory measurements read it."""
        s = self.settings
        if isinstance(self.task, LabelTask):
            batch: dict = {"rows": self.train_rows[: s.batch_size], "prompt": s.prompt, "labels": self.task.labels}
        else:
            batch = {"format": self.task.format, "features": self.features("train")[: s.batch_size]}
        path.write_text(json.dumps({**batch, "max_length": s.max_length, "tokenizer": str(self.model_path)}))
        return path

    def train(self, model: torch.nn.Module, checkpoints: Path) -> dict[str, list]:
        """LoRA training of ``model``: losses and their steps (Trainer checkpoints in
        ``checkpoints`` for generative data)."""
        s = self.settings
        if isinstance(self.task, LabelTask):
            losses = train_as_set(s, model, self.task, self.train_rows, self.device)
            return {"losses": losses, "steps": list(range(1, len(losses) + 1))}
        return train_with_trainer(s, model, self.task, self.features("train"), checkpoints, self.device)


def run(s: FinetuneSettings) -> dict:
    """Run the whole job; writes ``s.out`` and returns the report.

    Everything is written aside and renamed at the end: a failed run leaves no half-filled
    ``--out``, and an existing one is replaced (``--overwrite``) only by a finished run."""
    inputs = [s.model, s.data, s.eval_data, s.emulator]
    out = check_output(s.out, inputs, overwrite=s.overwrite)
    r = Run.create(s)
    report: dict = {}
    # the same settings, data, library and thread count resume a killed run's stages
    same = {k: v for k, v in asdict(s).items() if k not in ("out", "overwrite", "progress")}
    key = json.dumps([same, __version__, torch.get_num_threads(), str(r.model_path)], sort_keys=True, default=str)
    write_dir_resumably(
        out,
        lambda work: report.update(_run(r, work)),
        key=key,
        overwrite=s.overwrite,
        inputs=inputs,
        kind="finetune run",
    )
    return report


class Stages:
    """The results of a run's finished stages, kept in ``stages.json`` of its work directory
    (written atomically after each stage), so that a rerun after a kill skips them."""

    def __init__(self, work: Path) -> None:
        self.file = work / "stages.json"
        self.done: dict[str, dict] = json.loads(self.file.read_text()) if self.file.is_file() else {}
        if self.done:
            logger.warning("resuming the run in %s: stages %s are kept", work, ", ".join(self.done))

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def run(self, key: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` (a JSON-able result), or its kept result when it already ran."""
        if key not in self.done:
            t = time.perf_counter()
            result = fn(*args, **kw)
            self.done[key] = {"result": result, "seconds": round(time.perf_counter() - t, 2)}
            tmp = self.file.with_name(f".{self.file.name}.tmp")
            tmp.write_text(json.dumps(self.done))
            os.replace(tmp, self.file)
        return self.done[key]["result"]

    def result(self, key: str) -> Any:
        """The kept result of a finished stage."""
        return self.done[key]["result"]

    def timings(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.done.items()}


def _run(r: Run, out: Path) -> dict:
    s, task, model_path, device, dtype = r.settings, r.task, r.model_path, r.device, r.dtype
    alpha, variants, train_rows, val_rows, test_rows = r.alpha, r.variants, r.train_rows, r.val_rows, r.test_rows
    stages = Stages(out)
    torch.manual_seed(s.seed)
    # memory of the same batch, each in a fresh process (fine-tuning measured after the emulator exists)
    spec = r.write_memory_batch(out / "memory_batch.json")
    calib = calibration_texts(s, train_rows, task)

    def build(original: nn.Module) -> dict[str, int]:
        """Stage 1: the emulator, built in place (the original's weights are not needed again
        in memory), kept block by block for a resume; with ``distill_steps``, then distilled
        toward the original's outputs on ``distill_samples`` training texts.  With
        ``--emulator``: that one, saved into the run (its checksums verified on loading)."""
        original_bytes = tensor_bytes(original)
        if s.emulator is not None:
            emulator = load_emulator(s.emulator)
            save_emulator(emulator, out / "emulator", overwrite=True)
            return weight_sizes(emulator, original_bytes)
        distill = None
        if s.distill_steps > 0:
            texts = calibration_texts(s, train_rows, task, count=s.distill_samples)
            distill = Distillation(s.distill_steps, s.distill_rank, texts=texts, lr=s.distill_lr, seed=s.seed)
        emulator = build_emulator(
            original,
            calib,
            dense_top_blocks(original, s.ratio, s.dense_top_blocks) if s.dense_top_blocks else s.ratio,
            tokenizer=task.tokenizer,
            device=device,
            progress=s.progress,
            quant=s.quant,
            group_size=s.group_size,
            propagate=s.propagate,
            shrinkage=s.shrinkage,
            allocate=s.allocate,
            checkpoint=out / ".emulator.partial",
            distill=distill,
        )
        save_emulator(emulator, out / "emulator", overwrite=True)
        shutil.rmtree(out / ".emulator.partial")
        return weight_sizes(emulator, original_bytes)

    # the training steps, in anchoring rounds (one without --anchor, or with --anchor-rounds 1)
    rounds = anchor_rounds(
        batch_schedule(len(train_rows), s.steps, s.batch_size, s.seed), s.anchor_rounds if r.anchor else 1
    )

    def anchor_original(original: nn.Module) -> dict[str, int]:
        """The original's final hidden states on the training rows of the first round (inference
        only, while it is in memory for the zero-shot score)."""
        rows = rows_of(rounds[0])
        states = last_hidden_states(original, cast(LabelTask, task), [train_rows[i] for i in rows])
        torch.save(states, out / ANCHOR)
        return {"rows": len(rows)}

    def train_on_emulator() -> dict[str, list]:
        """Stage 2: LoRA on the emulator; the adapter names the original (load_emulator sets
        it), as PEFT expects of an adapter for it."""
        peft_model: Any
        logged: dict[str, list]

        def lora_on_emulator() -> Any:
            return attach_lora(load_emulator(out / "emulator", device=device), s.lora_rank, alpha, s.seed)

        if isinstance(task, LabelTask):
            peft_model, losses = train_in_rounds(
                task,
                train_rows,
                rounds,
                lora_on_emulator=lora_on_emulator,
                # the first round's anchor was kept while the original was in memory
                original_states=(
                    (lambda lora, rows: torch.load(out / ANCHOR) if lora is None else original_states(r, lora, rows))
                    if r.anchor
                    else None
                ),
                lr=s.lr,
                device=device,
                progress=s.progress,
            )
            logged = {"losses": losses, "steps": list(range(1, len(losses) + 1))}
        else:
            peft_model = lora_on_emulator()
            logged = r.train(peft_model, out / CHECKPOINTS)

        def write(directory: Path) -> None:
            peft_model.save_pretrained(str(directory))
            copy_tokenizer(model_path, directory)

        write_dir_atomically(out / "adapter", write, overwrite=True)
        return logged

    if "build_emulator" not in stages or (r.anchor and "anchor_original" not in stages):
        original, _ = load_model(model_path, device, dtype)  # in memory for the first stages only
        if s.emulator is not None and "build_emulator" not in stages:
            check_built_from(read_metadata(s.emulator), original, f"--emulator {s.emulator}")
        stages.run("eval_zero_shot", r.evaluate, original, "test")
        if r.anchor:
            stages.run("anchor_original", anchor_original, original)
        stages.run("build_emulator", build, original)
        del original
    if "train" not in stages:
        emulator = load_emulator(out / "emulator", device=device)
        stages.run("eval_emulator", r.evaluate, emulator, "test")
        del emulator
        stages.run("train", train_on_emulator)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the training's checkpoints are done with
    acc = {"zero_shot": stages.result("eval_zero_shot"), "emulator": stages.result("eval_emulator")}
    sizes, logged = stages.result("build_emulator"), stages.result("train")

    # stage 3: transfer variants, chosen on validation data with the original model
    original, _ = load_model(model_path, device, dtype)
    dirs = {name: out / _variant_dir(name) for name in variants}
    for name, (method, param) in variants.items():
        if dirs[name].is_dir():  # written atomically: complete
            continue
        if method == "paper":  # reads the original one module at a time from its files
            stages.run(
                f"correct_{name}",
                correct_adapter,
                out / "adapter",
                out / "emulator",
                model_path,
                dirs[name],
                clamp=param,
                progress=False,
            )
        elif method in ("aware", "stream"):  # forward passes of the original, one block at a time
            stages.run(
                f"transfer_{name}",
                correct_adapter_aware if method == "aware" else transfer_adapter,
                out / "adapter",
                out / "emulator",
                original,
                calib,
                dirs[name],
                lam=cast(float, param),
                tokenizer=task.tokenizer,
                device=device,
                progress=False,
            )
    # validation scores where there is a choice: among the variants, or with the refinement to come
    validate = len(dirs) > 1 or r.refine_top_blocks > 0
    evaluated = stages.run(
        "evaluate_variants", _evaluate_variants, original, dirs, out / "adapter", r.evaluate, validate
    )
    del original
    results = evaluated["variants"]
    chosen = choose(results, r.higher_is_better)
    refined = refined_variant(r.refine_top_blocks) if r.refine_top_blocks else None
    if refined is not None:
        results[refined] = stages.run("refine_top_blocks", refine_on_original, r, out / results[chosen]["dir"])
        chosen = choose(results, r.higher_is_better)
    acc["uncorrected"] = evaluated["uncorrected"]
    acc["corrected"] = results[chosen]["test"]
    if s.upper_bound:
        acc["lora_original"] = stages.run("train_original", lora_on_original, r, out / CHECKPOINTS_ORIGINAL)
        shutil.rmtree(out / CHECKPOINTS_ORIGINAL, ignore_errors=True)
        acc["recovery"] = recovery(acc["corrected"], acc["zero_shot"], acc["lora_original"])
    if s.baseline_top_blocks is not None:
        acc["lora_top_blocks"] = stages.run(
            "train_top_blocks", lora_on_original, r, out / CHECKPOINTS_ORIGINAL, s.baseline_top_blocks
        )
        shutil.rmtree(out / CHECKPOINTS_ORIGINAL, ignore_errors=True)

    memory_args = {"device": str(device), "dtype": str(dtype).split(".")[-1]}
    training_args = {**memory_args, "rank": s.lora_rank, "alpha": alpha, "lr": s.lr}
    mem = {
        "inference": stages.run(
            "peak_mem_inference", peak_in_fresh_process, "inference", model_path, spec, **memory_args
        ),
        "finetune": stages.run(
            "peak_mem_finetune", peak_in_fresh_process, "finetune", out / "emulator", spec, **training_args
        ),
    }
    if s.upper_bound:
        mem["finetune_original"] = stages.run(
            "peak_mem_finetune_original", peak_in_fresh_process, "finetune", model_path, spec, **training_args
        )
    if refined is not None:
        mem["finetune_refine"] = stages.run(
            "peak_mem_finetune_refine",
            peak_in_fresh_process,
            "finetune",
            model_path,
            spec,
            top_blocks=r.refine_top_blocks,
            adapter=out / results[refined]["dir"],
            **training_args,
        )
    if s.baseline_top_blocks is not None:
        mem["finetune_top_blocks"] = stages.run(
            "peak_mem_finetune_top_blocks",
            peak_in_fresh_process,
            "finetune",
            model_path,
            spec,
            top_blocks=s.baseline_top_blocks,
            **training_args,
        )
    timings = stages.timings()
    metric = "loss" if r.generative else "accuracy"
    report = {
        **acc,
        "peak_mem_inference": mem["inference"],
        # every training the delivered adapter may have had: on the emulator, on the original's top blocks
        "peak_mem_finetune": max(mem["finetune"], mem.get("finetune_refine", 0)),
        "format": task.format if isinstance(task, GenerativeTask) else LABEL,
        "metric": metric,
        metric: acc,
        "variants": results,
        "chosen": chosen,
        "delivered_adapter": results[chosen]["dir"],
        "memory": mem,
        "bytes": sizes,
        "emulator_build": {k: v for k, v in read_metadata(out / "emulator").items() if k in ("calibration", "build")},
        "losses": logged["losses"],
        "loss_steps": logged["steps"],
        "timings_s": timings,
        "device": str(device),
        "settings": asdict(s)
        | {"model": str(model_path), "anchor": r.anchor, "refine_top_blocks": r.refine_top_blocks}
        # with --emulator the build options were not used: its build is under "emulator_build"
        | ({k: None for k in BUILD_OPTIONS} if s.emulator is not None else {}),
        "sizes": {"train": len(train_rows), "validation": len(val_rows), "test": len(test_rows)},
    }
    if r.generative:
        report["perplexity"] = {k: perplexity(v) for k, v in acc.items() if k != "recovery" and v is not None}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(format_table(report) + "\n")
    plot_losses(report, out / "loss_curve.png")
    return report


def choose(results: dict[str, dict], higher_is_better: bool) -> str:
    """The variant with the best validation score (the only one when there is no choice)."""
    if len(results) == 1:
        return next(iter(results))
    if higher_is_better:
        return max(results, key=lambda n: results[n]["validation"] or 0.0)
    return min(results, key=lambda n: math.inf if results[n]["validation"] is None else results[n]["validation"])


def plot_losses(report: dict, path: Path) -> None:
    """The training losses against the step (PNG); skipped with a warning without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(report["loss_steps"], report["losses"], marker="." if len(report["losses"]) < 50 else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (emulator)")
    what = "label token" if report["metric"] == "accuracy" else f"{report['format']} data, loss tokens"
    ax.set_title(f"LoRA on the emulator ({what})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _evaluate_variants(
    original: nn.Module,
    dirs: dict[str, Path],
    trained: Path,
    evaluate: Callable[[nn.Module, str], float],
    validate: bool,
) -> dict[str, Any]:
    """Test scores (``evaluate(model, split)``) of the original with each adapter in ``dirs``,
    and validation scores with ``validate`` (when there is a choice); the test score with the
    ``trained`` one as it is."""
    from peft import PeftModel

    results: dict[str, dict] = {}
    peft_model: PeftModel | None = None
    for name, d in dirs.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(original, d, adapter_name=_key(name))
        else:
            peft_model.load_adapter(d, adapter_name=_key(name))
        peft_model.set_adapter(_key(name))
        results[name] = {
            "validation": evaluate(peft_model, "validation") if validate else None,
            "test": evaluate(peft_model, "test"),
            "dir": d.name,
        }
    assert peft_model is not None, "no adapter to evaluate"
    if "uncorrected" in results:
        uncorrected = results["uncorrected"]["test"]
    else:
        peft_model.load_adapter(trained, adapter_name="uncorrected")
        peft_model.set_adapter("uncorrected")
        uncorrected = evaluate(peft_model, "test")
    return {"variants": results, "uncorrected": uncorrected}


def train_as_set(
    s: FinetuneSettings, model: torch.nn.Module, task: LabelTask, rows: list[dict], device: torch.device
) -> list[float]:
    """:func:`train` with the run's steps, batch size, learning rate, seed and progress setting."""
    return train(
        model,
        task,
        rows,
        steps=s.steps,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        device=device,
        progress=s.progress,
    )


def train_in_rounds(
    task: LabelTask,
    rows: list[dict],
    rounds: list[list[list[int]]],
    *,
    lora_on_emulator: Callable[[], Any],
    original_states: Callable[[dict[str, torch.Tensor] | None, list[dict]], torch.Tensor] | None,
    lr: float,
    device: torch.device,
    progress: bool = True,
) -> tuple[Any, list[float]]:
    """LoRA on the emulator over the steps of ``rounds``: the PEFT model and the loss per step.

    ``lora_on_emulator()`` loads the emulator with a fresh LoRA; ``original_states(lora, rows)``
    gives the original's final hidden states on ``rows`` with the adapter state ``lora``
    merged in (None: the LoRA's initial, zero state), or is None for training without anchors.
    Each round anchors afresh where the training stands: the emulator leaves memory, the
    original gives its states on the round's rows (inference only), and the training goes on
    (LoRA and optimizer state kept) around ``h_O(x; LoRA_k) + [h_E(x; LoRA) − h_E(x; LoRA_k)]``,
    so the first-order stand-in for the original is exact at the start of every round."""
    lora: dict[str, torch.Tensor] | None = None
    opt_state: dict | None = None
    losses: list[float] = []
    for k, steps in enumerate(rounds):
        used = rows_of(steps)
        picked = [rows[i] for i in used]
        target = original_states(lora, picked) if original_states is not None else None
        model = lora_on_emulator()
        if lora is not None:
            set_peft_model_state_dict(model, lora)
        offsets = None
        if target is not None:
            offsets = dict(zip(used, target - last_hidden_states(model, task, picked)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        if len(rounds) > 1:
            logger.info("anchoring round %d of %d: %d steps", k + 1, len(rounds), len(steps))
        losses += train_steps(model, task, rows, steps, opt, device, progress, offsets)
        if k + 1 < len(rounds):  # out of memory before the original comes in
            lora = to_device({n: t.detach().clone() for n, t in get_peft_model_state_dict(model).items()}, CPU)
            opt_state = to_device(opt.state_dict(), CPU)
            del model, opt
    return model, losses


def original_states(r: Run, lora: dict[str, torch.Tensor], rows: list[dict]) -> torch.Tensor:
    """The original's final hidden states on ``rows`` with the adapter state ``lora`` merged
    into its weights: inference on the original, at its inference memory."""
    model, _ = load_model(r.model_path, r.device, r.dtype)
    peft_model = attach_lora(model, r.settings.lora_rank, r.alpha, r.settings.seed)
    set_peft_model_state_dict(peft_model, lora)
    return last_hidden_states(peft_model.merge_and_unload(), cast(LabelTask, r.task), rows)


def lora_on_original(r: Run, checkpoints: Path, top_blocks: int | None = None) -> float:
    """The upper bound: the same LoRA training on the original model; its test score.
    ``top_blocks``: on its last N blocks only (the baseline at about inference memory)."""
    model, _ = load_model(r.model_path, r.device, r.dtype)
    peft_model = attach_lora(model, r.settings.lora_rank, r.alpha, r.settings.seed, top_blocks=top_blocks)
    r.train(peft_model, checkpoints)
    return r.evaluate(peft_model, "test")


def refined_variant(blocks: int) -> str:
    return f"refined on the {last_blocks(blocks)}"


def refine_on_original(r: Run, adapter: Path) -> dict[str, Any]:
    """Transfer by training, within the original's inference memory: the original with
    ``adapter``, whose LoRA on the last ``r.refine_top_blocks`` blocks trains further on the task
    (the same steps as on the emulator) with the blocks below frozen and replayed from their
    outputs (:func:`attach_adapter_top_blocks`). The refined adapter is written next to
    ``adapter``; its validation and test scores, on the original with it."""
    from peft import PeftModel

    out_dir = adapter.parent / f"refined-top{r.refine_top_blocks}"
    write_dir_atomically(out_dir, lambda directory: _refine(r, adapter, directory), overwrite=True)
    original, _ = load_model(r.model_path, r.device, r.dtype)
    refined = PeftModel.from_pretrained(original, str(out_dir))
    scores = {split: r.evaluate(refined, split) for split in ("validation", "test")}
    return {**scores, "dir": out_dir.name, "from": adapter.name}


def _refine(r: Run, adapter: Path, directory: Path) -> None:
    """:func:`refine_on_original`'s training; the refined adapter written to ``directory``."""
    s, task = r.settings, cast(LabelTask, r.task)
    schedule = batch_schedule(len(r.train_rows), s.steps, s.batch_size, s.seed)
    batches = (task.encode([r.train_rows[i] for i in picked], r.device) for picked in schedule)
    original = functools.partial(load_checkpoint, r.model_path, dtype=r.dtype)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = Path(tmp) / "top_block_inputs.bin"
        peft_model = attach_adapter_top_blocks(original, adapter, r.refine_top_blocks, batches, store, r.device)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=s.lr)
        train_steps(peft_model, task, r.train_rows, schedule, opt, r.device, s.progress)
    write_refined_adapter(peft_model, adapter, directory)
    copy_tokenizer(r.model_path, directory)


def recovery(delivered: float, zero_shot: float, upper: float) -> float | None:
    """Share of the gain of LoRA on the original that the delivered adapter keeps."""
    return None if upper == zero_shot else (delivered - zero_shot) / (upper - zero_shot)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def weight_sizes(emulator: torch.nn.Module, original_bytes: int) -> dict[str, int]:
    """Bytes of the linears inside the blocks (emulated, or kept dense) against the original's
    (as stored, and in fp16), and of the whole emulator against the whole original."""
    _, blocks = find_blocks(emulator)
    linears = [m for m in blocks.modules() if isinstance(m, LINEAR_TYPES)]

    def stored(m: Any) -> int:
        if isinstance(m, LowRankLinear):
            return m.weight_bytes()
        return sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)

    def fp16(m: Any) -> int:
        out_features, in_features = (
            (m.out_features, m.in_features) if isinstance(m, LowRankLinear) else out_in_weight(m).shape
        )
        return 2 * (in_features + (m.bias is not None)) * out_features

    return {
        "emulator_linears": sum(stored(m) for m in linears),
        "original_linears_fp16": sum(fp16(m) for m in linears),
        "emulator_total": tensor_bytes(emulator),
        "original_total": original_bytes,
    }


def _key(name: str) -> str:
    return name.replace("=", "").replace(".", "_").replace(":", "_")
