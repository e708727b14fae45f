"""Conventions shared by the stages, in one place: adapter file names and key prefix, the
emulator's metadata file and its transformers quantization config (telling an emulator
directory, giving a model its quantizer), replacing a submodule, the out×in weight of a
transformers ``Conv1D``, padding a tokenizer without changing it, loading a model from a
directory, switching activation checkpointing and reading the final hidden states in place
of the logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
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
LORA_A_KEY, LORA_B_KEY = ".lora_A.weight", ".lora_B.weight"  # a LoRA pair's keys end so
# the emulator's own metadata beside its safetensors and config.json
EMULATOR_METADATA = "emloc.json"
# the transformers quantization method of an emulator (the quant_method in its config.json)
EMULATOR_QUANT_METHOD = "emloc"
# the linear layer types an emulator replaces (GPT-2 and relatives use Conv1D)
LINEAR_TYPES = (nn.Linear, Conv1D)

# config attributes that make a causal LM's logits more than its output head of the final hidden state
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

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


def emulator_quantization_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of an emulator's ``config.json``: its metadata (as in
    ``emloc.json``, without the files' checksums) with ``quant_method`` (implemented by
    :mod:`emloc_kernels.emulator.hf`)."""
    return {"quant_method": EMULATOR_QUANT_METHOD, **{k: v for k, v in metadata.items() if k != "files"}}


def attach_quantizer(model: nn.Module, quantization_config: Mapping[str, Any]) -> None:
    """Give ``model`` what ``from_pretrained`` gives a model loaded with ``quantization_config``:
    the quantizer registered with transformers for its ``quant_method`` (made by transformers'
    own factory), ``config.quantization_config`` and the quantized marks; ``save_pretrained``
    then writes the config and the tensors that quantizer loads again."""
    from transformers import PreTrainedModel
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(dict(quantization_config), pre_quantized=True)
    m = cast(Any, model)
    m.config.quantization_config = quantizer.quantization_config
    m.hf_quantizer = quantizer
    m.is_quantized = True
    m.quantization_method = quantizer.quantization_config.quant_method
    for sub in model.modules():  # as transformers marks the configs of a quantized model
        if isinstance(sub, PreTrainedModel):
            cast(Any, sub).config._is_quantized = True


def is_emulator_config(config: Any) -> bool:
    """Whether a transformers config (or the dict of a ``config.json``) is an emulator's."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return method == EMULATOR_QUANT_METHOD


def is_emulator_dir(directory: PathLike) -> bool:
    """Whether ``directory`` holds an emulator: its ``emloc.json``, or a ``config.json`` whose
    quantization method is the emulator's (a directory its ``save_pretrained`` wrote)."""
    path = Path(directory)
    if (path / EMULATOR_METADATA).is_file():
        return True
    try:
        return is_emulator_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def model_class(directory: PathLike) -> type:
    """The transformers model class named in the directory's ``config.json``.

    Refused: an emulator directory, and a config that names no transformers model class."""
    import transformers

    if is_emulator_dir(directory):
        raise ValueError(
            f"{directory} is an emulator (it has {EMULATOR_METADATA} or an emloc quantization_config); pass the "
            "original model here (an emulator loads with emloc_kernels.load_emulator)"
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
    try:
        model, info = cast(Any, model_class(directory)).from_pretrained(directory, output_loading_info=True, **kwargs)
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise ValueError(f"{directory}: tensors of the checkpoint have another shape than config.json says") from e
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


def check_probe(weight: torch.Tensor, info: Mapping[str, Any], where: str, built_from: str | None) -> None:
    """Refuse a linear ``weight`` of an original other than the one the emulator's build probed
    (``info``: the emulator's record of that linear, ``built_from``: the original's name there);
    ``where`` starts the message."""
    probe = info.get("original_probe")
    if probe is not None and not matches_probe(weight, probe):
        raise ValueError(
            f"{where}: the original is not the model the emulator was built from "
            f"({built_from or 'unnamed'}): its weights differ; pass that model"
        )


def check_built_from(metadata: Mapping[str, Any], original: nn.Module, option: str) -> None:
    """Refuse an ``original`` other than the model an emulator (its ``metadata``) was built
    from: another architecture, a missing linear, or weights other than the build probed."""
    architecture = metadata.get("architecture")
    if architecture and architecture != type(original).__name__:
        raise ValueError(f"{option}: the emulator is a {architecture}, the model a {type(original).__name__}")
    for path, info in metadata.get("modules", {}).items():
        try:
            weight = out_in_weight(original.get_submodule(path))
        except AttributeError:
            raise ValueError(f"{option}: the emulator has a linear {path} that the model lacks") from None
        if tuple(weight.shape) != (info["out_features"], info["in_features"]):
            raise ValueError(
                f"{option}: the emulator was built from another model "
                f"({metadata.get('original_model') or 'unnamed'}): {path} is {tuple(weight.shape)} in the model, "
                f"{(info['out_features'], info['in_features'])} in the emulator"
            )
        check_probe(weight, info, f"{option}: {path}", metadata.get("original_model"))


def check_device(name: str | None, option: str = "--device") -> torch.device | None:
    """``name`` as a device this process can use (``None`` stays ``None``); else a ValueError
    naming ``option``."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{option} {name}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {name}: MPS is not available here")
    elif device.type != "cpu":
        raise ValueError(f"{option} {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def set_checkpointing(model: nn.Module, on: bool) -> bool:
    """Switch transformers' non-reentrant activation checkpointing of ``model`` on or off
    (``activation_checkpointing_*``, or the older ``gradient_checkpointing_*`` names);
    returns whether it was on before.  A model without either does nothing."""
    m = cast(Any, model)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(m), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    was = bool(getattr(m, name, False))
    if on and hasattr(m, "activation_checkpointing_enable"):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on and hasattr(m, "gradient_checkpointing_enable"):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and hasattr(m, "activation_checkpointing_disable"):
        m.activation_checkpointing_disable()
    elif not on and hasattr(m, "gradient_checkpointing_disable"):
        m.gradient_checkpointing_disable()
    return was


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a causal LM (or of a PEFT model around one) whose logits are exactly
    ``head(final hidden state)``: a plain ``nn.Linear``, no logit softcapping or scaling in
    the config. None otherwise (a LoRA on the head, a scaled or capped head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


class HiddenStatesHead(nn.Module):
    """Stands in for an output head: passes the final hidden states through as the "logits",
    for a loss that applies the head itself a chunk at a time (:mod:`emloc_kernels.ops.linear_loss`)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def hidden_states_as_logits(model: nn.Module) -> Iterator[nn.Linear | None]:
    """Within the block, ``model(...).logits`` are the final hidden states and the output head
    is yielded (put back on exit); a model without a plain head (:func:`plain_output_head`)
    is left as it is, its logits logits, and None is yielded."""
    head = plain_output_head(model)
    if head is None:
        yield None
        return
    m = cast(Any, model)
    m.set_output_embeddings(HiddenStatesHead(head))
    try:
        yield head
    finally:
        m.set_output_embeddings(head)
