"""Save and load an emulator: HF safetensors + the original config + ``emloc.json``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from torch import nn

from ..conventions import EMULATOR_METADATA as METADATA_FILE
from ..conventions import attach_quantizer, emulator_quantization_config, is_emulator_config
from ..files import copy_tokenizer, write_dir_atomically
from ..modules import LowRankLinear


def save_emulator(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[object] = (),
    written: Sequence[Path] = (),
) -> Path:
    """Write ``model`` (an emulator from :func:`build_emulator`) to a new directory ``path``.

    The directory is a transformers checkpoint whose ``config.json`` carries the emulator as its
    ``quantization_config`` (``AutoModelForCausalLM.from_pretrained(path)`` loads the emulator
    once ``emloc_kernels`` is imported), with ``emloc.json`` (metadata and the weight files'
    SHA-256) and the tokenizer files of the original model's directory when it is local.
    ``path`` may not be, contain or lie inside the original model's directory or ``inputs``
    (see :func:`~emloc_kernels.files.write_dir_atomically`, also for ``overwrite``).
    ``written``: safetensors files that already hold the model's tensors left on the meta device
    (the blocks of :func:`~emloc_kernels.emulator.stream.write_emulator_from_pretrained`); they
    become shards of the directory (hard links where the file system allows, else copies)
    beside one shard of the model's other tensors."""
    metadata = getattr(model, "emloc_metadata", None)
    if metadata is None:
        raise ValueError("model has no emloc_metadata: save an emulator made by build_emulator or load_emulator")
    if hasattr(model, "config"):  # config.json describes the emulator as its metadata stands now
        attach_quantizer(model, emulator_quantization_config(metadata))

    def writer(tmp: Path) -> None:
        if written:
            _save_sharded(model, tmp, written)
        else:
            cast(Any, model).save_pretrained(tmp)
        files = {f.name: _sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / METADATA_FILE).write_text(json.dumps({**metadata, "files": files}, indent=1))
        copy_tokenizer(metadata.get("original_model"), tmp)

    protected = [metadata.get("original_model") or "", *inputs]
    return write_dir_atomically(path, writer, overwrite=overwrite, inputs=protected, kind="emulator")


def _save_sharded(model: nn.Module, directory: Path, written: Sequence[Path]) -> None:
    """What ``save_pretrained`` writes (configs, tensors as its quantizer gives them, ties once),
    as shards with an index: the ``written`` files, then one file of the tensors in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = cast(Any, model)
    names = [f"model-{k:05d}-of-{len(written) + 1:05d}.safetensors" for k in range(1, len(written) + 2)]
    weight_map: dict[str, str] = {}
    for file, name in zip(written, names):
        try:
            os.link(file, directory / name)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(file, directory / name)
        with safe_open(str(file), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), name))
    state, _ = m.hf_quantizer.get_state_dict_and_metadata(model)
    rest: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.Size]] = set()
    for key, t in state.items():  # a tied tensor under its first name, as save_pretrained keeps it
        if key in weight_map:
            continue
        if t.is_meta:
            raise ValueError(f"{key} is on the meta device and in none of the written files")
        if t.numel() and (t.data_ptr(), t.shape) in seen:
            continue
        seen.add((t.data_ptr(), t.shape))
        rest[key] = t.detach().contiguous()
    save_file(rest, str(directory / names[-1]), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, names[-1]))
    total = sum(_tensor_bytes(directory / name) for name in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    m.config.dtype = str(m.dtype).split(".")[1]  # as save_pretrained records them
    m.config.architectures = [type(model).__name__]
    m.config.save_pretrained(directory)
    if m.can_generate():
        m.generation_config.save_pretrained(directory)


def _tensor_bytes(file: Path) -> int:
    """The bytes of a safetensors file's tensors: all of it but the 8-byte length and the header."""
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


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
    """The metadata of an emulator directory: its ``emloc.json`` or, in a directory that
    ``save_pretrained`` wrote, the same (without the files' checksums) from the
    ``quantization_config`` in ``config.json``."""
    file = Path(path) / METADATA_FILE
    if file.exists():
        return json.loads(file.read_text())
    config = Path(path) / "config.json"
    if config.is_file():
        content = json.loads(config.read_text())
        if is_emulator_config(content):
            return {k: v for k, v in content["quantization_config"].items() if k != "quant_method"}
    raise FileNotFoundError(f"{path} is not an emulator directory (no {METADATA_FILE}, no emloc quantization_config)")


def _check_tensor_files(path: Path, files: list[Path]) -> None:
    """Each file a readable safetensors file, no tensor in two of them (from their headers)."""
    from safetensors import safe_open

    seen: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = set(handle.keys())
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
        twice = sorted(keys & seen)
        if twice:
            raise ValueError(f"{path}: tensors {twice[:3]} appear in more than one file")
        seen |= keys


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

    transformers' ``from_pretrained`` loads it (the ``emloc`` quantization method puts the
    low-rank layers in place), after the checks a plain ``from_pretrained`` does not make: each
    weight file against the SHA-256 recorded at save time (``verify``; about a second per GB,
    ``False`` skips it), no file this emulator did not write, no tensor twice; and after it: no
    tensor missing or left over. Unlike ``from_pretrained`` the model names the original
    (``name_or_path``), as PEFT adapters trained on it should, and carries ``emloc.json``'s
    metadata. A directory written before ``config.json`` carried the emulator loads the same."""
    import transformers

    path = Path(path)
    metadata = read_metadata(path)
    files = _weight_files(path, metadata, verify)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    _check_tensor_files(path, files)
    cls = getattr(transformers, metadata["architecture"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {metadata['architecture']!r} (saved by a newer version?)")
    kwargs: dict[str, Any] = {}
    config = json.loads((path / "config.json").read_text())
    if not is_emulator_config(config):
        kwargs["quantization_config"] = emulator_quantization_config(metadata)
    elif config["quantization_config"].get("modules") != metadata.get("modules"):
        raise ValueError(f"{path}: the modules in emloc.json and in config.json's quantization_config differ")
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    if info["unexpected_keys"]:
        raise ValueError(f"{path}: tensors that fit no module: {sorted(info['unexpected_keys'])[:5]}")
    missing = sorted(info["missing_keys"]) + [str(k[0]) for k in info.get("mismatched_keys") or []]
    if missing:
        raise ValueError(f"{path}: tensors missing for {missing[:5]}")
    model.emloc_metadata = {k: v for k, v in metadata.items() if k != "files"}  # "files" describes a directory
    if metadata.get("original_model"):  # adapters trained on the emulator name the original (PEFT reads this)
        model.config.name_or_path = model.name_or_path = metadata["original_model"]
    model.eval()
    return model.to(device) if device is not None else model
