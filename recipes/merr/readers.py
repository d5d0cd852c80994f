"""Readers for the MERR files: annotation ``.txt``, caption JSON, subtitle CSV and per-sample ``.npy`` features."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMOTION_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise", "fear", "contempt", "doubt")
SUBTITLE_COLUMNS = ("sentence", "sentence_en")  # MERR / MER2023, MER2024


class SampleError(ValueError):
    """A problem with one sample; ``kind`` groups the problems in skip reports."""

    def __init__(self, sample: str, file: str | Path, kind: str, detail: str) -> None:
        super().__init__(f"Sample {sample!r}: {kind}: {detail} ({file})")
        self.sample = sample
        self.file = Path(file)
        self.kind = kind


@dataclass(frozen=True)
class Annotation:
    """One annotation row: the sample name, its label as written, and where it was read."""

    name: str
    label: str
    file: Path
    line: int


def read_annotations(path: str | Path) -> list[Annotation]:
    """Read ``name nframes label [valence]`` rows (space separated; only name and label are used)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(f"{path}, line {number}: expected 'name nframes label [valence]', got {line.strip()!r}.")
        rows.append(Annotation(name=fields[0], label=fields[2], file=path, line=number))
    if not rows:
        raise ValueError(f"Annotation file {path} is empty: it has no 'name nframes label' rows.")
    return rows


def check_label(annotation: Annotation, labels: Sequence[str] = EMOTION_LABELS) -> str:
    """The annotation's label, lowercased; an unknown label raises :class:`SampleError`."""
    label = annotation.label.lower()
    if label not in labels:
        raise SampleError(
            annotation.name,
            annotation.file,
            "unknown label",
            f"{annotation.label!r} on line {annotation.line}; known labels: {', '.join(labels)}",
        )
    return label


def read_captions(path: str | Path, field: str) -> dict[str, str]:
    """Read ``{name: {field: text, ...}}`` from a MERR JSON (``caption`` in the coarse file, ``smp_reason_caption``
    or ``reason_caption`` in the fine one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caption file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Caption file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Caption file {path} must hold a JSON object {{name: {{...}}}}, got {type(data).__name__}.")
    captions = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
            raise SampleError(name, path, "missing caption", f"no text field {field!r}")
        captions[name] = entry[field]
    return captions


def read_subtitles(path: str | Path, column: str | None = None) -> dict[str, str]:
    """Read the subtitle CSV (columns ``name`` and ``sentence``, or ``sentence_en`` for MER2024)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Subtitle file {path} does not exist.")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        found = column or next((c for c in SUBTITLE_COLUMNS if c in header), None)
        if "name" not in header or found not in header:
            wanted = column or " or ".join(SUBTITLE_COLUMNS)
            raise ValueError(f"Subtitle file {path} needs the columns 'name' and {wanted!r}; it has {header}.")
        return {row["name"]: row[found] or "" for row in reader}


def read_feature(path: Path, sample: str, shapes: Sequence[tuple[int, ...]], header_only: bool = False) -> np.ndarray:
    """Load a feature ``.npy`` (never unpickling) and check its shape is one of ``shapes``; problems raise
    :class:`SampleError`. ``header_only`` memory-maps the file, reading only its header."""
    if not path.is_file():
        raise SampleError(sample, path, "missing feature file", "no such file")
    try:
        array = np.load(path, mmap_mode="r" if header_only else None, allow_pickle=False)
    except ValueError as err:
        raise SampleError(sample, path, "unreadable feature file", str(err)) from None
    if tuple(array.shape) not in shapes or not np.issubdtype(array.dtype, np.floating):
        expected = " or ".join(str(s) for s in shapes)
        raise SampleError(
            sample, path, "wrong feature shape", f"got {tuple(array.shape)} {array.dtype}, expected {expected} float"
        )
    return array
