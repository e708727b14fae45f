"""Conventions shared by the stages, in one place: adapter file names and key prefix, the
emulator's metadata file, replacing a submodule, the out×in weight of a transformers
``Conv1D``, padding a tokenizer without changing it and loading a model from a directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# what PEFT's save_pretrained writes, and the prefix of its keys for a LoRA adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
# the emulator's own metadata beside its safetensors and config.json
EMULATOR_METADATA = "emloc.json"
# the linear layer types an emulator replaces (GPT-2 and relatives use Conv1D)
LINEAR_TYPES = (nn.Linear, Conv1D)

PathLike = Union[str, "os.PathLike[str]"]


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` below ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The out×in weight of a linear; transformers' ``Conv1D`` stores it in×out."""
    weight = cast(torch.Tensor, module.weight)
    return weight.T if isinstance(module, Conv1D) else weight


@contextmanager
def padding(tokenizer: Any, side: str) -> Iterator[Any]:
    """The tokenizer padding on ``side`` (with EOS as the pad token if it has none) inside the
    block, and exactly as it was after it."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    try:
        tokenizer.padding_side = side
        if old_pad is None:
            tokenizer.pad_token = tokenizer.eos_token
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad


def model_class(directory: PathLike) -> type:
    """The transformers model class named in the directory's ``config.json``.

    Refused: an emulator directory, and a config that names no transformers model class."""
    import transformers

    if (Path(directory) / EMULATOR_METADATA).is_file():
        raise ValueError(
            f"{directory} is an emulator (it has {EMULATOR_METADATA}); pass the original model here "
            "(an emulator loads with emloc_kernels.load_emulator)"
        )
    architectures = transformers.AutoConfig.from_pretrained(directory).architectures or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(
            f"config.json in {directory} names no transformers model class (architectures={architectures})"
        )
    return cls


def load_model(directory: PathLike, **kwargs: Any) -> nn.Module:
    """The model class named in the directory's ``config.json``, loaded from it.

    Refused, instead of being filled with random weights by transformers: an emulator
    directory, and a checkpoint that lacks tensors of the model or holds them in another shape.
    """
    model, info = cast(Any, model_class(directory)).from_pretrained(directory, output_loading_info=True, **kwargs)
    broken = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if broken:
        raise ValueError(
            f"{directory}: {len(broken)} tensors of the model are missing or of another shape "
            f"(e.g. {broken[:3]}); transformers would initialise them at random"
        )
    return model


# how many values of an original weight the emulator records, to recognise that original later
PROBE_SIZE = 8


def weight_probe(weight: torch.Tensor) -> dict[str, Any]:
    """A few values of an out×in weight at fixed positions, with its dtype: enough to tell the
    weight an emulator was built from from another of the same shape."""
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, PROBE_SIZE).round().long().to(flat.device)
    return {"dtype": str(flat.dtype).removeprefix("torch."), "values": flat[index].double().cpu().tolist()}


def matches_probe(weight: torch.Tensor, probe: dict[str, Any]) -> bool:
    """Whether ``weight`` holds the probed values: exactly in the same dtype; in another, up to
    the rounding of the coarser of the two."""
    now = weight_probe(weight)
    a, b = torch.tensor(now["values"], dtype=torch.float64), torch.tensor(probe["values"], dtype=torch.float64)
    if a.shape != b.shape:
        return False
    if now["dtype"] == probe["dtype"]:
        return bool(torch.equal(a, b))
    eps = max(torch.finfo(getattr(torch, d)).eps for d in (now["dtype"], probe["dtype"]))
    return bool(((a - b).abs() <= eps * torch.maximum(a.abs(), b.abs())).all())
