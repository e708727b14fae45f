"""Reading the user's data files (stdlib only): JSONL rows with string fields, and plain text
one sample per line.

Lines are split at ``\\n`` only (a trailing ``\\r`` is dropped): ``str.splitlines`` would also
split at U+2028, U+0085 and other characters that valid JSON strings may hold unescaped.
Every error is a ``ValueError`` (``FileNotFoundError`` for a missing file) with a one-line
message naming the option, the file and, for a bad row, its line number and field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence


def _lines(path: str | os.PathLike, what: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines of a UTF-8 file (a leading BOM is skipped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory; give a file") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}:{at} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if line.strip():
            yield i, line


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one sample each."""
    return [line for _, line in _lines(path, what)]


def read_jsonl_objects(path: str | os.PathLike, what: str, expected: str = "a JSON object") -> list[tuple[int, dict]]:
    """``(line number, object)`` of a JSONL file, one JSON object per non-blank line; a line that
    is not an object is refused with ``expected`` in the message."""
    rows = []
    for i, line in _lines(path, what):
        try:
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or an integer beyond Python's digit limit
            raise ValueError(f"{what} {path}:{i} is not JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{what} {path}:{i} is not JSON this reader accepts: nested too deeply") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what} {path}:{i} must be {expected}")
        rows.append((i, row))
    return rows


def read_jsonl(path: str | os.PathLike, what: str, fields: Sequence[str]) -> list[dict[str, str]]:
    """Rows ``{field: str, ...}`` of a JSONL file, one JSON object per non-blank line; other
    keys of a row are dropped."""
    rows = []
    for i, row in read_jsonl_objects(path, what, f"a JSON object with string fields {_names(fields)}"):
        check_string_fields(row, fields, f"{what} {path}:{i}")
        rows.append({field: row[field] for field in fields})
    return rows


def check_string_fields(row: dict, fields: Sequence[str], where: str, needed: str | None = None) -> None:
    """Each of ``fields`` is in ``row`` and a string; else an error starting with ``where``
    (such as ``--data FILE:LINE``) that names the field."""
    for field in fields:
        if field not in row:
            raise ValueError(f'{where} has no field "{field}" (each line needs {needed or _names(fields)})')
        if not isinstance(row[field], str):
            raise ValueError(f'{where} field "{field}" must be a string, got {_short(row[field])}')
        try:
            row[field].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise ValueError(f'{where} field "{field}" holds an unpaired surrogate; not text') from None


def _names(fields: Sequence[str]) -> str:
    return " and ".join(f'"{f}"' for f in fields)


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"
