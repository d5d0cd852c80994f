"""Text and JSON files read with errors that name the file: bad UTF-8 (where), invalid JSON, duplicate JSON keys.

Python's own errors name neither the file nor, for JSON's duplicate keys, the problem at all (the last value wins).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The file's text; bytes that are not ``encoding`` raise a ``ValueError`` naming the file, line and byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}, column {column}: byte 0x{data[err.start]:02x} is not valid {encoding} "
            f"({err.reason}); save the file as {encoding}."
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (``json`` would keep the last value silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_json(text: str, where: str) -> Any:
    """Parse JSON text; invalid JSON or a duplicate key raises a ``ValueError`` starting with ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON: {err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def load_json(path: str | Path) -> Any:
    """A JSON file's content, with :func:`read_text`'s and :func:`parse_json`'s errors naming ``path``."""
    return parse_json(read_text(path), str(path))
