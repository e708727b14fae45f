"""Finished blocks of a build kept on disk, so that a killed build resumes where it stopped.

Each block's emulated linears (their tensors) and report entries are written atomically as the
block finishes; a rerun with the same settings restores them instead of fitting again and only
replays the forward passes that carry the calibration activations through those blocks. The
result is bit-identical to an uninterrupted build on the same machine and thread count (the
thread count changes the order of floating-point sums: kept blocks of another are not used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..conventions import replace_submodule
from .io import empty_module_for

SETTINGS_FILE = "build.json"
logger = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """A SHA-256 over tensors (their dtype, shape and bytes) and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


WRITER = "emloc_kernels block checkpoint"


def check_checkpoint_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path when it is absent or a block checkpoint this library wrote;
    anything else (a user's folder, a file, a symbolic link) is refused, never emptied."""
    path = Path(directory)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"checkpoint {path} is a symbolic link or a file; remove it or choose another")
    if path.exists():
        try:
            ours = json.loads((path / SETTINGS_FILE).read_text()).get("written_by") == WRITER
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"checkpoint {path} exists and is not a block checkpoint of emloc_kernels; remove it or choose another"
            )
    return path


def checkpoint_beside(out: Path) -> Path:
    """The block checkpoint of a build written to ``out``: its hidden sibling ``.NAME.partial``
    (checked by :func:`check_checkpoint_dir`)."""
    return check_checkpoint_dir(out.parent / f".{out.name}.partial")


class BlockCheckpoint:
    """The finished blocks of one build in ``directory``, valid for one ``settings`` digest; a
    checkpoint kept for other settings is emptied first, a directory that is not one is refused."""

    def __init__(self, directory: str | os.PathLike, settings: str) -> None:
        self.directory = check_checkpoint_dir(directory)
        file = self.directory / SETTINGS_FILE
        if file.is_file() and json.loads(file.read_text()).get("settings") != settings:
            logger.warning(
                "%s holds blocks of a build with other settings, calibration, model or thread count: starting over",
                self.directory,
            )
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not file.is_file():
            _write_atomically(file, lambda p: p.write_text(json.dumps({"settings": settings, "written_by": WRITER})))

    def tensors(self, i: int) -> Path:
        """The safetensors file of block ``i``'s emulated linears (a shard of a streamed emulator)."""
        return self._files(i)[0]

    def _files(self, i: int) -> tuple[Path, Path]:
        return self.directory / f"block{i:05d}.safetensors", self.directory / f"block{i:05d}.json"

    def done(self, i: int) -> bool:
        return self._files(i)[1].is_file()

    def finished(self) -> int:
        """How many blocks from the first are kept."""
        i = 0
        while self.done(i):
            i += 1
        return i

    def save(self, i: int, model: nn.Module, report: dict[str, dict]) -> None:
        """Keep block ``i``: the tensors of its emulated linears, then (last) its report."""
        tensors_file, report_file = self._files(i)
        state = {
            f"{name}.{key}": t.detach().cpu().contiguous()
            for name in report
            for key, t in model.get_submodule(name).state_dict().items()
        }
        _write_atomically(tensors_file, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _write_atomically(report_file, lambda p: p.write_text(json.dumps(report)))

    def load(self, i: int, device: torch.device) -> tuple[dict[str, nn.Module], dict[str, dict]] | None:
        """Block ``i``'s emulated linears (on ``device``) and report; ``None`` when its files are
        damaged, after removing them and those of every later block (they are fitted again)."""
        tensors_file, report_file = self._files(i)
        try:
            report = json.loads(report_file.read_text())
            state = load_file(str(tensors_file))
            modules: dict[str, nn.Module] = {}
            for name, info in report.items():
                mine = {k[len(name) + 1 :]: t for k, t in state.items() if k.startswith(name + ".")}
                dtype = mine["bias"].dtype if info["bias"] else next(iter(mine.values())).dtype  # as load_emulator
                module = empty_module_for(info, dtype)
                module.load_state_dict(mine, assign=True)
                modules[name] = module.to(device)
        except Exception as e:  # a damaged file of any kind: fit this block again
            logger.warning(
                "block %d kept in %s is damaged (%s): fitting it and the later ones again", i, self.directory, e
            )
            j = i
            while self.done(j) or self._files(j)[0].exists():
                for f in self._files(j):
                    f.unlink(missing_ok=True)
                j += 1
            return None
        return modules, report

    @staticmethod
    def place(model: nn.Module, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            replace_submodule(model, name, module)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
