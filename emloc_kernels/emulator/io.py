"""Save and load an emulator: HF safetensors + the original config + ``emloc.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from torch import nn

from ..conventions import EMULATOR_METADATA as METADATA_FILE
from ..conventions import replace_submodule
from ..files import write_dir_atomically
from ..modules import LowRankLinear


def save_emulator(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (an emulator from :func:`build_emulator`) to a new directory ``path``."""
    metadata = getattr(model, "emloc_metadata", None)
    if metadata is None:
        raise ValueError("model has no emloc_metadata: save an emulator made by build_emulator or load_emulator")

    def writer(tmp: Path) -> None:
        cast(Any, model).save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))

    return write_dir_atomically(path, writer, overwrite=overwrite)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``emloc.json`` of an emulator directory."""
    file = Path(path) / METADATA_FILE
    if not file.exists():
        raise FileNotFoundError(f"{path} is not an emulator directory (no {METADATA_FILE})")
    return json.loads(file.read_text())


def empty_module_for(info: Mapping[str, Any], dtype: torch.dtype) -> LowRankLinear:
    """An unallocated (meta) module with the shape ``info`` describes, ready for ``assign``."""
    args = (info["in_features"], info["out_features"], info["rank"])
    if info.get("quant"):
        from ..modules.quantized import QuantLowRankLinear

        return QuantLowRankLinear(
            *args,
            bias=info["bias"],
            quant=info["quant"],
            group_size=info["group_size"] or 128,
            device="meta",
            dtype=dtype,
        )
    return LowRankLinear(*args, bias=info["bias"], device="meta", dtype=dtype)


def load_emulator(path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild an emulator saved by :func:`save_emulator`; needs neither calibration nor the original."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    metadata = read_metadata(path)
    config = AutoConfig.from_pretrained(path)
    cls = getattr(transformers, metadata["architecture"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {metadata['architecture']!r} (saved by a newer version?)")
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    for name, info in metadata["modules"].items():
        dtype = (
            state[f"{name}.bias"].dtype
            if info["bias"]
            else next(t.dtype for k, t in state.items() if k.startswith(name + "."))
        )
        replace_submodule(model, name, empty_module_for(info, dtype))
    incompatible = model.load_state_dict(state, strict=False, assign=True)
    if incompatible.unexpected_keys:
        raise ValueError(f"{path}: tensors that fit no module: {incompatible.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"{path}: tensors missing for {missing[:5]}")
    model.emloc_metadata = metadata
    if metadata.get("original_model"):  # adapters trained on the emulator name the original (PEFT reads this)
        model.config.name_or_path = model.name_or_path = metadata["original_model"]
    model.eval()
    return model.to(device) if device is not None else model
