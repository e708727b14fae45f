"""Save and load an emulator: HF safetensors + the original config + ``emloc.json``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from torch import nn

from ..conventions import EMULATOR_METADATA as METADATA_FILE
from ..conventions import replace_submodule
from ..files import write_dir_atomically
from ..modules import LowRankLinear


def save_emulator(
    model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[object] = ()
) -> Path:
    """Write ``model`` (an emulator from :func:`build_emulator`) to a new directory ``path``.

    ``path`` may not be, contain or lie inside the original model's directory or ``inputs``
    (see :func:`~emloc_kernels.files.write_dir_atomically`, also for ``overwrite``)."""
    metadata = getattr(model, "emloc_metadata", None)
    if metadata is None:
        raise ValueError("model has no emloc_metadata: save an emulator made by build_emulator or load_emulator")

    def writer(tmp: Path) -> None:
        cast(Any, model).save_pretrained(tmp)
        files = {f.name: _sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / METADATA_FILE).write_text(json.dumps({**metadata, "files": files}, indent=1))

    protected = [metadata.get("original_model") or "", *inputs]
    return write_dir_atomically(path, writer, overwrite=overwrite, inputs=protected, kind="emulator")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _weight_files(path: Path, metadata: dict, verify: bool) -> list[Path]:
    """The safetensors files ``save_emulator`` recorded, checked against their SHA-256 (unless
    ``verify=False``); a file it did not write is refused rather than mixed in."""
    found = sorted(path.glob("*.safetensors"))
    recorded = metadata.get("files")
    if recorded is None:  # written before checksums were recorded
        return found
    stray = sorted(f.name for f in found if f.name not in recorded)
    if stray:
        raise ValueError(f"{path}: {stray} are not among the files of this emulator ({sorted(recorded)}); remove them")
    files = [path / name for name in recorded]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{path}: {f.name} of this emulator is missing")
        if verify and _sha256(f) != recorded[f.name]:
            raise ValueError(f"{f}: the content differs from the checksum in {METADATA_FILE} (a damaged copy?)")
    return files


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


def load_emulator(
    path: str | os.PathLike, *, device: torch.device | str | None = None, verify: bool = True
) -> nn.Module:
    """Rebuild an emulator saved by :func:`save_emulator`; needs neither calibration nor the original.

    ``verify``: check each weight file against the SHA-256 recorded at save time (about a
    second per GB); ``False`` skips it."""
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
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path, metadata, verify):
        try:
            tensors = load_file(file)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise ValueError(f"{path}: tensors {twice[:3]} appear in more than one file")
        state.update(tensors)
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
    model.emloc_metadata = {k: v for k, v in metadata.items() if k != "files"}  # "files" describes a directory
    if metadata.get("original_model"):  # adapters trained on the emulator name the original (PEFT reads this)
        model.config.name_or_path = model.name_or_path = metadata["original_model"]
    model.eval()
    return model.to(device) if device is not None else model
