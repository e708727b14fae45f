"""Conventions shared by the stages, in one place: adapter file names and key prefix, the
emulator's metadata file, replacing a submodule, the out×in weight of a transformers
``Conv1D``, padding a tokenizer without changing it and loading a model from a directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


def load_model(directory: PathLike, **kwargs: Any) -> nn.Module:
    """The model class named in the directory's ``config.json``, loaded from it."""
    import transformers

    architectures = transformers.AutoConfig.from_pretrained(directory).architectures or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(
            f"config.json in {directory} names no transformers model class (architectures={architectures})"
        )
    return cls.from_pretrained(directory, **kwargs)
