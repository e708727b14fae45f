"""Writing output directories without ever leaving a half-written one or losing a user's files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_dir_atomically(path: str | os.PathLike, writer: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Run ``writer(tmp)`` in a temporary sibling of ``path``, then rename it to ``path``.

    An existing ``path`` is refused unless ``overwrite=True``, and is then replaced only once
    the new directory is complete; a failure leaves ``path`` as it was.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        writer(tmp)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while writing; pass overwrite=True to replace it")
            old = tmp.with_suffix(".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
