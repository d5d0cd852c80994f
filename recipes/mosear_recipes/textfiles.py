"""Text, JSON and YAML files read with errors that name the file: bad UTF-8 (where), invalid JSON or YAML, duplicate
keys (with their line).

Python's own errors name neither the file nor, for duplicate keys, the problem at all (the last value wins).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml


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


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (``json`` would keep the last value silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _duplicate_line(text: str, key: str) -> int | None:
    """The line of the second ``"key":`` in JSON text (where the duplicate is, for an object's keys)."""
    found = list(re.finditer(re.escape(json.dumps(key)) + r"\s*:", text))
    return text.count("\n", 0, found[1].start()) + 1 if len(found) > 1 else None


def parse_json(text: str, where: str) -> Any:
    """Parse JSON text; invalid JSON or a duplicate key raises a ``ValueError`` starting with ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON: {err}") from None
    except _DuplicateKey as err:
        line = _duplicate_line(text, err.key)
        raise ValueError(f"{where}: duplicate key {err.key!r}{f' (line {line})' if line else ''}") from None


def load_json(path: str | Path) -> Any:
    """A JSON file's content, with :func:`read_text`'s and :func:`parse_json`'s errors naming ``path``."""
    return parse_json(read_text(path), str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping key given twice (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(f"line {line}: duplicate key {key!r} (first given at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content (safe types only), with errors naming ``path``: bad UTF-8, invalid YAML, a duplicate
    key with its line."""
    text = read_text(path)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    except ValueError as err:
        raise ValueError(f"{path}, {err}") from None
