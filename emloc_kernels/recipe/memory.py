"""Peak memory of one inference batch, of LoRA fine-tuning (of an emulator or of the
original) and of building an emulator, each in a fresh process.

CPU: peak RSS above the process's RSS before the model is loaded (``/proc/self/status``,
peak reset through ``/proc/self/clear_refs``).  The child runs with a fixed glibc mmap
threshold, so freed tensors go back to the OS and RSS follows live memory rather than the
allocator's retained heap (which otherwise depends on the order of frees).  CUDA: ``torch.cuda.max_memory_allocated``.
Run as ``python -m emloc_kernels.recipe.memory {inference,finetune} ...``; prints one JSON line.
The batch file's optional ``"loss_positions": "all"`` trains on the causal-LM loss of every
position instead of the label task's last position (``"last"``, the default).
:func:`build_peak_in_fresh_process` measures :func:`measure_build` the same way.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMeter:
    """Peak bytes above the baseline taken at construction."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        self.device = device

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def measure(
    kind: str,
    model_dir: str,
    batch_file: str,
    device: str,
    dtype: str,
    rank: int,
    alpha: float,
    lr: float,
    top_blocks: int | None = None,
    adapter: str | None = None,
) -> int:
    from ..conventions import is_emulator_dir
    from ..conventions import load_model as load_checkpoint
    from ..emulator.io import load_emulator
    from .data import GenerativeTask, lm_nll
    from .models import attach_lora, load_model, load_tokenizer
    from .task import LabelTask, lm_loss_on, loss_on, next_token_logits
    from .top_blocks import attach_adapter_top_blocks

    if adapter is not None and (top_blocks is None or kind != "finetune"):
        raise ValueError("adapter: measured only for its refinement on the top blocks (finetune, with top_blocks)")
    dev = torch.device(device)
    spec = json.loads(Path(batch_file).read_text())
    meter = PeakMeter(dev)
    if is_emulator_dir(model_dir):
        model, tokenizer = load_emulator(model_dir, device=dev), load_tokenizer(spec["tokenizer"])
    elif adapter is None:
        model, tokenizer = load_model(model_dir, dev, getattr(torch, dtype))
    else:  # the refinement loads the original itself (twice)
        tokenizer = load_tokenizer(model_dir)
    if "features" in spec:  # generative data: the loss of every position, as emloc finetune evaluates and trains
        if adapter is not None:
            raise ValueError("adapter: its refinement on the top blocks trains on label data only")
        generative = GenerativeTask(tokenizer, spec["format"], spec["max_length"])
        batch = {k: v.to(dev) for k, v in generative.collate(spec["features"]).items()}

        def forward(m: torch.nn.Module) -> torch.Tensor:
            return loss_of(m)

        def loss_of(m: torch.nn.Module) -> torch.Tensor:
            nll, count = lm_nll(m, batch)
            return nll / max(count, 1)
    else:
        task = LabelTask.create(tokenizer, spec["prompt"], spec["labels"], spec["max_length"])
        batch = task.encode(spec["rows"], dev)
        # "last": the label's next token (emloc finetune); "all": every position (emloc plan's LM loss)
        label_loss = {"last": loss_on, "all": lm_loss_on}[spec.get("loss_positions", "last")]

        def forward(m: torch.nn.Module) -> torch.Tensor:
            return next_token_logits(m, batch)

        def loss_of(m: torch.nn.Module) -> torch.Tensor:
            return label_loss(m, batch)

    if kind == "inference":
        with torch.no_grad():
            forward(model)
    else:
        steps = 2  # the second step runs with the optimiser state allocated
        with tempfile.TemporaryDirectory() as tmp:
            if adapter is not None and top_blocks is not None:  # the refinement of an adapter on the top blocks
                original = functools.partial(load_checkpoint, model_dir, dtype=getattr(torch, dtype))
                store = Path(tmp) / "top_block_inputs.bin"
                peft_model = attach_adapter_top_blocks(original, adapter, top_blocks, [batch] * steps, store, dev)
            else:
                peft_model = attach_lora(model, rank, alpha, seed=0, top_blocks=top_blocks)
            peft_model.train()  # gradient checkpointing acts in training mode only, as in finetune.train
            opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
            for _ in range(steps):
                loss_of(peft_model).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return meter.peak()


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(storages.values())


BUILDS = ("write", "stream", "whole")


def measure_build(model_dir: str, texts_file: str, ratio: float, how: str) -> dict[str, int]:
    """Peak bytes of building the fp32 emulator of ``model_dir`` on the CPU from the calibration
    texts in ``texts_file`` (a JSON list; the ``emloc build`` defaults otherwise), ``how``:
    ``"write"`` streamed into a directory (:func:`write_emulator_from_pretrained`, as ``emloc
    build`` does; a temporary one), ``"stream"`` streamed into memory
    (:func:`build_emulator_from_pretrained`) or ``"whole"`` from the loaded model. The baseline
    is taken with the texts and the tokenizer ready; also returns the emulator's own bytes
    (its tensors in memory, or its files)."""
    from transformers import AutoTokenizer

    from ..conventions import load_model
    from ..emulator import build_emulator, build_emulator_from_pretrained, write_emulator_from_pretrained

    if how not in BUILDS:
        raise ValueError(f"how must be one of {BUILDS}, got {how!r}")
    texts = json.loads(Path(texts_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options: dict[str, Any] = dict(tokenizer=tokenizer, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        meter = PeakMeter(torch.device("cpu"))
        if how == "write":
            out = write_emulator_from_pretrained(
                model_dir, texts, Path(tmp) / "emulator", ratio, dtype=torch.float32, **options
            )
            peak = meter.peak()
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        else:
            if how == "stream":
                emulator = build_emulator_from_pretrained(model_dir, texts, ratio, dtype=torch.float32, **options)
            else:
                emulator = build_emulator(load_model(model_dir, dtype=torch.float32), texts, ratio, **options)
            peak, size = meter.peak(), tensor_bytes(emulator)
    return {"peak_bytes": peak, "emulator_bytes": size}


def build_peak_in_fresh_process(model_dir: str | Path, *, texts: list[str], ratio: float, how: str) -> dict[str, int]:
    """Run :func:`measure_build` on ``texts`` in a new Python process (glibc mmap threshold as
    for :func:`peak_in_fresh_process`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    code = (
        "import json, sys; from emloc_kernels.recipe.memory import measure_build; "
        "print(json.dumps(measure_build(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])))"
    )
    cmd = [sys.executable, "-c", code, str(model_dir), f.name, repr(ratio), how]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement (build) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_in_fresh_process(
    kind: str,
    model_dir: str | Path,
    batch_file: str | Path,
    *,
    device: str,
    dtype: str,
    rank: int = 8,
    alpha: float = 8.0,
    lr: float = 1e-3,
    top_blocks: int | None = None,
    adapter: str | Path | None = None,
) -> int:
    """Run :func:`measure` in a new Python process and return its peak bytes (``top_blocks``:
    LoRA on the last N blocks only, see :func:`attach_lora`; with ``adapter``, that adapter
    trained on them, see :func:`attach_adapter_top_blocks`)."""
    cmd = [
        sys.executable,
        "-m",
        "emloc_kernels.recipe.memory",
        kind,
        str(model_dir),
        str(batch_file),
        "--device",
        device,
        "--dtype",
        dtype,
        "--rank",
        str(rank),
        "--alpha",
        str(alpha),
        "--lr",
        str(lr),
        *(["--top-blocks", str(top_blocks)] if top_blocks is not None else []),
        *(["--adapter", str(adapter)] if adapter is not None else []),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement ({kind}) failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["inference", "finetune"])
    p.add_argument("model_dir")
    p.add_argument("batch_file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--top-blocks", type=int, default=None, help="finetune: LoRA on the last N blocks only")
    p.add_argument("--adapter", default=None, help="finetune with --top-blocks: this adapter, trained on them")
    a = p.parse_args()
    if a.adapter is not None and a.top_blocks is None:
        p.error("--adapter needs --top-blocks: an adapter is measured only for its refinement on the top blocks")
    peak = measure(a.kind, a.model_dir, a.batch_file, a.device, a.dtype, a.rank, a.alpha, a.lr, a.top_blocks, a.adapter)
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    main()
