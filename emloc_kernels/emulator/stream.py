"""Build an emulator straight from a model directory, never holding the whole original.

The model is created on the meta device; what runs before the blocks (embeddings, rotary
tables, everything outside the blocks but the output embeddings) is read from the
safetensors; each block is read when the build reaches it, and the linears it replaces are
dropped with it, so at most one block of the original exists at a time. The output
embeddings (when not tied to the input ones) are read last. The result is the emulator that
:func:`~emloc_kernels.emulator.build.build_emulator` makes of the loaded model, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from safetensors import safe_open
from torch import nn

from ..conventions import model_class
from ..files import check_output
from .build import Originals, _build, finish_build
from .calibration import find_blocks
from .checkpoint import BlockCheckpoint, checkpoint_beside
from .io import save_emulator

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names, for a model whose config names no dtype ("auto" reads the weights)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class NotStreamable(ValueError):
    """The directory's weights cannot be read tensor by tensor under the model's own names (no
    safetensors, or tensors stored under other names or in other shapes): load the model
    (:func:`~emloc_kernels.conventions.load_model`) and build from it instead."""


def weight_files(directory: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a checkpoint, single-file or sharded (its index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = {key: directory / name for key, name in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{directory}: {file.name}, named in {INDEX_FILE}, is missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise NotStreamable(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


Entry = tuple[nn.Module, str, str, bool]  # owner, attribute, name in the model, is a parameter


def _entries(module: nn.Module, name: str, recurse: bool = True) -> Iterator[Entry]:
    """The parameters and persistent buffers of ``module`` (named ``name``), with their owners."""
    modules = module.named_modules(prefix=name) if recurse else iter([(name, module)])
    for owner_name, owner in modules:
        prefix = f"{owner_name}." if owner_name else ""
        for attr, p in owner._parameters.items():
            if p is not None:
                yield owner, attr, prefix + attr, True
        for attr, b in owner._buffers.items():
            if b is not None and attr not in owner._non_persistent_buffers_set:
                yield owner, attr, prefix + attr, False


def _read(file: Path) -> tuple[Any, bool]:
    """``safe_open`` of ``file`` reading with ``pread`` (safetensors ≥ 0.8: each tensor in memory
    of its own, no mapping of the file), else mapping it; and whether tensors must be copied."""
    try:
        return safe_open(str(file), framework="pt", backend="pread"), False
    except TypeError:  # an older safetensors: mapped
        return safe_open(str(file), framework="pt"), True


class SafetensorsOriginals(Originals):
    """The original's tensors, read from its safetensors when a module is loaded.

    Each tensor is read into memory of its own (cast to the dtype of the meta tensor it
    replaces, as ``from_pretrained`` casts): no file mapping outlives a load (the pages of a
    mapping count in the process's memory until it closes), and the memory a block held is
    given back once the block drops it.
    """

    def __init__(self, directory: Path, base_prefix: str = "") -> None:
        self.directory = directory
        self.files = weight_files(directory)
        self.base_prefix = f"{base_prefix}." if base_prefix else ""
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if self.files.get(key) != file:  # an index names the file of each tensor
                        continue
                    view = f.get_slice(key)
                    self.shapes[key], self.dtypes[key] = tuple(view.get_shape()), view.get_dtype()

    def key(self, name: str) -> str | None:
        """The checkpoint's name of the model's tensor ``name`` (a checkpoint of the base model
        stores it without the base model's prefix), or None."""
        if name in self.shapes:
            return name
        if self.base_prefix and name.startswith(self.base_prefix) and name[len(self.base_prefix) :] in self.shapes:
            return name[len(self.base_prefix) :]
        return None

    def unreadable(self, names: dict[str, tuple[int, ...]]) -> list[str]:
        """Those of ``{name: shape}`` that the checkpoint lacks or holds in another shape."""
        broken = []
        for name, shape in names.items():
            key = self.key(name)
            if key is None:
                broken.append(name)
            elif self.shapes[key] != shape:
                broken.append(f"{name} {self.shapes[key]} ≠ {shape}")
        return broken

    def load(self, module: nn.Module, name: str, recurse: bool = True) -> None:
        """Materialise (on the CPU) the parameters of ``module`` still on the meta device and
        its persistent buffers, from the checkpoint; what it lacks stays as it is."""
        by_file: dict[Path, list[tuple[Entry, str]]] = {}
        for entry in _entries(module, name, recurse):
            owner, attr, full, is_parameter = entry
            key = self.key(full)
            if key is not None and (getattr(owner, attr).is_meta or not is_parameter):
                by_file.setdefault(self.files[key], []).append((entry, key))
        for file, todo in by_file.items():
            reader, mapped = _read(file)
            with reader as f:
                for (owner, attr, full, is_parameter), key in todo:
                    now = getattr(owner, attr)
                    stored = f.get_tensor(key)
                    if tuple(stored.shape) != tuple(now.shape):
                        raise NotStreamable(
                            f"{self.directory}: {key} has shape {tuple(stored.shape)}, {full} needs {tuple(now.shape)}"
                        )
                    dtype = now.dtype if now.is_floating_point() and stored.is_floating_point() else stored.dtype
                    value = stored.to(dtype=dtype, copy=mapped)
                    del stored  # a file's mapping closes with the last tensor read from it
                    if is_parameter:
                        owner._parameters[attr] = nn.Parameter(value, requires_grad=now.requires_grad)
                    else:
                        owner._buffers[attr] = value

    def release(self, module: nn.Module) -> None:
        for owner in module.modules():
            for attr, p in owner._parameters.items():
                if p is not None and not p.is_meta:
                    owner._parameters[attr] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                    )

    def dtype(self) -> torch.dtype:
        """The floating dtype of the first floating tensor (what ``dtype="auto"`` falls back to)."""
        return next((_DTYPES[d] for d in self.dtypes.values() if d in _DTYPES), torch.get_default_dtype())


def local_directory(source: str | os.PathLike) -> Path:
    """The directory of a model: ``source`` itself, or the snapshot of a Hub id in the local
    cache (as ``from_pretrained`` finds it offline)."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(str(source), "config.json")
    except ValueError:  # not a Hub id either
        config = None
    if isinstance(config, str):
        return Path(config).parent
    raise NotStreamable(f"{source} is neither a directory nor a model in the local Hugging Face cache")


def empty_model(
    directory: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, SafetensorsOriginals]:
    """The model of ``directory`` (or of a Hub id in the local cache) on the meta device, with
    its buffers (rotary tables) computed on the CPU as ``from_pretrained`` computes them, in
    eval mode, with its generation config; and the reader of its weights. ``dtype``: as
    ``from_pretrained``'s (None or "auto": the config's, else the weights')."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    cls = cast(Any, model_class(directory))
    config = AutoConfig.from_pretrained(directory)
    originals = SafetensorsOriginals(local_directory(directory), getattr(cls, "base_model_prefix", ""))
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or originals.dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    if model.can_generate():  # as from_pretrained: generation_config.json, else from config.json
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(
                directory, config_file_name="config.json", _from_model_config=True
            )
    return model, originals


def _streamable(
    model_dir: str | os.PathLike, dtype: torch.dtype | str | None
) -> tuple[nn.Module, SafetensorsOriginals]:
    """The model of ``model_dir`` on the meta device with what runs before its blocks read (the
    output embeddings, when not tied to the input ones, wait on the meta device), and the reader
    of its weights; :class:`NotStreamable` when the safetensors lack a tensor of the model."""
    model, originals = empty_model(model_dir, dtype)
    blocks_name, _ = find_blocks(model)
    m = cast(Any, model)
    inputs, outputs = m.get_input_embeddings(), m.get_output_embeddings()
    deferred = outputs if outputs is not None and outputs is not inputs else None
    last = next((n for n, mod in model.named_modules() if mod is deferred), None)

    def outside(name: str) -> bool:
        return all(name != n and not name.startswith(n + ".") for n in (blocks_name, last) if n is not None)

    m.tie_weights()  # tied output embeddings share the input ones: not read
    needed = {n: tuple(p.shape) for n, p in model.named_parameters()}  # each tied parameter once
    unreadable = originals.unreadable(needed)
    if unreadable:
        raise NotStreamable(
            f"{model_dir}: {len(unreadable)} tensors of the model are not in its safetensors under their names "
            f"or have another shape (e.g. {unreadable[:3]})"
        )
    for name, module in model.named_modules():  # what runs before the blocks: read now
        if outside(name):
            originals.load(module, name, recurse=False)
    m.tie_weights()  # again: the input embeddings are new parameters now
    return model, originals


def _read_rest(model: nn.Module, originals: SafetensorsOriginals) -> None:
    """Read every tensor of ``model`` still on the meta device that the original has (what the
    build does not replace: the output embeddings, or all of it after an offloading build)."""
    originals.load(model, "")
    cast(Any, model).tie_weights()


@torch.no_grad()
def build_emulator_from_pretrained(
    model_dir: str | os.PathLike,
    calibration: Any,
    ratio: float | Mapping[str, float] = 0.4,
    *,
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> nn.Module:
    """The emulator :func:`build_emulator` makes of ``from_pretrained(model_dir, dtype=dtype)``,
    built without ever holding the whole original.

    ``model_dir``: a transformers model directory (or a Hub id in the local cache) with
    safetensors weights (``model.safetensors``, or shards listed in ``model.safetensors.index.json``).
    ``options``: those of :func:`build_emulator` (``tokenizer``, ``targets``, ``device``,
    ``quant``, ``propagate``, ``allocate``, ``checkpoint``, ...).
    Peak memory: the emulator being built, one block of the original and the calibration
    activations; with ``device="cuda"`` the device holds one block and the activations.
    The emulator is on the CPU, like a model loaded without a device.
    :func:`write_emulator_from_pretrained` writes it to a directory without holding it whole.
    Raises :class:`NotStreamable` (before any work) when the directory's weights are not
    safetensors under the model's own names and shapes.
    """
    model, originals = _streamable(model_dir, dtype)
    built = _build(model, calibration, ratio, originals, **options)
    _read_rest(model, originals)
    _check_materialised(model)
    # distillation (which needs the output embeddings) and quantisation after it
    return finish_build(built)


def _check_materialised(model: nn.Module) -> None:
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:  # cannot happen after the checks of _streamable; a half-materialised model must not escape
        raise RuntimeError(f"tensors left on the meta device after the build: {missing[:5]}")


@torch.no_grad()
def write_emulator_from_pretrained(
    model_dir: str | os.PathLike,
    calibration: Any,
    out: str | os.PathLike,
    ratio: float | Mapping[str, float] = 0.4,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    inputs: Iterable[object] = (),
    **options: Any,
) -> Path:
    """Build the emulator :func:`build_emulator_from_pretrained` builds straight into the new
    directory ``out`` (what :func:`~emloc_kernels.emulator.io.save_emulator` writes, as shards),
    holding neither the original nor the emulator whole.

    Each finished block is kept in a checkpoint beside ``out`` (``.NAME.partial``: a rerun
    after a kill resumes from it) and freed; the blocks' files become shards of ``out``.
    The embeddings are freed once the calibration has passed them and read again at the end.
    Peak memory: one block of each model and the calibration activations, then the tensors
    outside the blocks while they are written. With ``distill`` the emulator is trained whole
    after the build, so it is built in memory and then saved. ``overwrite`` and ``inputs``:
    as :func:`~emloc_kernels.emulator.io.save_emulator`'s (``model_dir`` is always an input).
    Returns ``out``.
    """
    protected = [model_dir, *inputs]
    out = check_output(out, protected, overwrite=overwrite, option="out")  # refused before any work
    partial = checkpoint_beside(out)
    if options.get("distill") is not None:
        emulator = build_emulator_from_pretrained(
            model_dir, calibration, ratio, dtype=dtype, checkpoint=partial, **options
        )
        save_emulator(emulator, out, overwrite=overwrite, inputs=protected)
    else:
        model, originals = _streamable(model_dir, dtype)
        built = _build(model, calibration, ratio, originals, checkpoint=partial, offload=True, **options)
        _read_rest(model, originals)
        kept = cast(BlockCheckpoint, built.checkpoint)
        shards = [kept.tensors(i) for i in range(len(find_blocks(model)[1]))]
        save_emulator(model, out, overwrite=overwrite, inputs=protected, written=shards)
    shutil.rmtree(partial)
    return out
