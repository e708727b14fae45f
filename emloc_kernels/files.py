"""Writing output directories without ever leaving a half-written one or losing a user's files,
and the tokenizer files every model or adapter directory carries (:func:`copy_tokenizer`).

Every directory the library writes carries a marker file (:data:`MARKER`); ``overwrite`` only
ever replaces such a directory, never a user's file, symbolic link or foreign directory, and
an output may not be, contain or lie inside any of the inputs it is made from. The new content
is written in a hidden temporary sibling and renamed into place when complete; the hidden
siblings a killed write leaves behind are removed by the next write to the same path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]

# the file that marks a directory as written by this library (and so replaceable with overwrite)
MARKER = ".emloc_output.json"


def _is_path(x: object) -> bool:
    return isinstance(x, (str, os.PathLike))


def _real(path: PathLike) -> Path:
    """``path`` absolute with every symbolic link resolved (also when it does not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check_output(
    out: PathLike, inputs: Iterable[object] = (), *, overwrite: bool = False, option: str = "--out"
) -> Path:
    """``out`` as a Path, once it is safe to write there; raises before any work is done.

    Refused: an ``out`` that is, contains or lies inside one of ``inputs`` (non-path inputs,
    such as model objects, are ignored); an existing ``out`` unless ``overwrite``; with
    ``overwrite``, anything but a directory this library wrote; an ``out`` whose parent cannot
    be written.
    """
    path = Path(out)
    target = _real(path)
    for x in inputs:
        if not _is_path(x) or not os.path.lexists(x):  # type: ignore[arg-type]
            continue  # a model object, or a name that is no path here: nothing to destroy
        source = _real(x)  # type: ignore[arg-type]
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(
                f"{option} {path} is, contains or lies inside the input {x}; choose a directory apart from the inputs"
            )
    if path.is_symlink() or path.exists():
        if not overwrite:
            raise FileExistsError(f"{option} {path} exists; choose another directory or pass --overwrite")
        if path.is_symlink() or not path.is_dir():
            kind = "a symbolic link" if path.is_symlink() else "a file"
            raise FileExistsError(
                f"{option} {path} is {kind}; --overwrite replaces only directories that emloc_kernels wrote"
            )
        if not (path / MARKER).is_file():
            raise FileExistsError(
                f"{option} {path} was not written by emloc_kernels (no {MARKER}); --overwrite replaces only "
                "directories that emloc_kernels wrote: choose another directory or remove it yourself"
            )
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: {parent} is not a writable directory")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Remove the hidden temporary siblings of ``path`` that a killed write left behind: ours
    (they carry the marker) and of a process that no longer runs."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^/]*\.(tmp|old)$")
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        m = pattern.match(sibling.name)
        if (
            m
            and not sibling.is_symlink()
            and sibling.is_dir()
            and (sibling / MARKER).is_file()
            and not _pid_alive(int(m.group(1)))
        ):
            shutil.rmtree(sibling, ignore_errors=True)


def write_dir_atomically(
    path: PathLike,
    writer: Callable[[Path], object],
    *,
    overwrite: bool = False,
    inputs: Iterable[object] = (),
    kind: str = "output",
) -> Path:
    """Run ``writer(tmp)`` in a hidden temporary sibling of ``path``, then rename it to ``path``.

    ``path`` is checked by :func:`check_output` before and again after writing; an existing
    one is replaced only once the new directory is complete, and a failure leaves it as it
    was. ``kind`` is recorded in the marker file.
    """
    from ._version import __version__

    inputs = list(inputs)
    path = check_output(path, inputs, overwrite=overwrite, option="output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / MARKER).write_text(json.dumps({"written_by": "emloc_kernels", "version": __version__, "kind": kind}))
        os.chmod(tmp, 0o755)
        writer(tmp)
        _publish(tmp, path, overwrite=overwrite, inputs=inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _publish(tmp: Path, path: Path, *, overwrite: bool, inputs: list[object]) -> None:
    """Rename the complete ``tmp`` to ``path``, replacing a directory the library wrote there."""
    check_output(path, inputs, overwrite=overwrite, option="output directory")
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.{os.getpid()}.replaced.old"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


def write_dir_resumably(
    path: PathLike,
    writer: Callable[[Path], object],
    *,
    key: str,
    overwrite: bool = False,
    inputs: Iterable[object] = (),
    kind: str = "output",
) -> Path:
    """As :func:`write_dir_atomically`, but the work directory is the hidden sibling
    ``.NAME.partial`` and is kept when ``writer`` fails or the process is killed: a later call
    with the same ``key`` hands ``writer`` what it holds, so that it can skip finished work;
    another ``key`` starts over."""
    from ._version import __version__

    inputs = list(inputs)
    path = check_output(path, inputs, overwrite=overwrite, option="output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    work = path.parent / f".{path.name}.partial"
    if work.is_symlink() or (work.exists() and not (work / MARKER).is_file()):
        raise FileExistsError(f"{work} is in the way and was not written by emloc_kernels: remove it")
    if work.exists() and json.loads((work / MARKER).read_text()).get("key") != key:
        shutil.rmtree(work)  # a killed run with other settings
    if not work.exists():
        work.mkdir()
        marker = {"written_by": "emloc_kernels", "version": __version__, "kind": kind, "key": key}
        (work / MARKER).write_text(json.dumps(marker))
    writer(work)
    _publish(work, path, overwrite=overwrite, inputs=inputs)
    return path


# what a model directory holds besides its config and weights that a model or adapter written
# from it should carry: the tokenizer (the files any tokenizer class saves) and generation settings
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_PATTERNS = ("tokenizer*", "*.tiktoken")  # vocabularies under other names
TOKENIZER_DIRS = ("additional_chat_templates",)
GENERATION_CONFIG = "generation_config.json"


def copy_tokenizer(source: object, directory: PathLike) -> list[str]:
    """Copy the tokenizer files and ``generation_config.json`` of the model directory ``source``
    into ``directory`` (an output being written), keeping any file of the same name already
    there; returns the names copied. Nothing happens when ``source`` is not a local directory
    (a Hub id, a model object, empty)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return []
    src, dst = Path(source), Path(directory)
    copied = []
    found = {f.name for pattern in TOKENIZER_PATTERNS for f in src.glob(pattern)}
    for name in sorted({*TOKENIZER_FILES, *found, GENERATION_CONFIG}):
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir() and not (dst / name).exists():
            shutil.copytree(src / name, dst / name)
            copied.append(name)
    return copied
