"""Readers for the MERR files: annotation ``.txt``, caption JSON, subtitle CSV and per-sample ``.npy`` features."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mosear_recipes.textfiles import load_json, read_text

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
    """Read ``name nframes label [valence]`` rows (space separated; only name and label are used). A name listed twice
    is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} does not exist.")
    rows: dict[str, Annotation] = {}
    for number, line in enumerate(read_text(path, encoding="utf-8-sig").splitlines(), start=1):  # a BOM is no name
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(f"{path}, line {number}: expected 'name nframes label [valence]', got {line.strip()!r}.")
        if fields[0] in rows:  # it would be trained on twice, or with two labels
            first = rows[fields[0]]
            raise ValueError(
                f"{path}, line {number}: sample {fields[0]!r} is listed again (label {fields[2]!r}; first on line "
                f"{first.line}, label {first.label!r}): each sample must appear once."
            )
        rows[fields[0]] = Annotation(name=fields[0], label=fields[2], file=path, line=number)
    if not rows:
        raise ValueError(f"Annotation file {path} is empty: it has no 'name nframes label' rows.")
    return list(rows.values())


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


def read_captions(path: str | Path, field: str) -> dict[str, str | SampleError]:
    """Read ``{name: {field: text, ...}}`` from a MERR JSON (``caption`` in the coarse file, ``smp_reason_caption``
    or ``reason_caption`` in the fine one). An entry without text (no field, not a string, only spaces and
    punctuation) maps to the :class:`SampleError` it is, raised by the samples that use it (and skipped with them
    under ``--skip_missing``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caption file {path} does not exist.")
    data = load_json(path)  # a name given twice is an error, not "the last caption wins"
    if not isinstance(data, dict):
        raise ValueError(f"Caption file {path} must hold a JSON object {{name: {{...}}}}, got {type(data).__name__}.")
    captions: dict[str, str | SampleError] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
            captions[name] = SampleError(name, path, "missing caption", f"no text field {field!r}")
        elif not any(c.isalnum() for c in entry[field]):
            captions[name] = SampleError(name, path, "empty caption", f"{field!r} is {entry[field]!r}")
        else:
            captions[name] = entry[field]
    return captions


def read_subtitles(path: str | Path, column: str | None = None) -> dict[str, str]:
    """Read the subtitle CSV (columns ``name`` and ``sentence``, or ``sentence_en`` for MER2024). A name with two
    different subtitles is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Subtitle file {path} does not exist.")
    reader = csv.DictReader(io.StringIO(read_text(path, encoding="utf-8-sig"), newline=""))
    header = reader.fieldnames or []
    found = column or next((c for c in SUBTITLE_COLUMNS if c in header), None)
    if "name" not in header or found not in header:
        wanted = column or " or ".join(SUBTITLE_COLUMNS)
        raise ValueError(f"Subtitle file {path} needs the columns 'name' and {wanted!r}; it has {header}.")
    subtitles: dict[str, str] = {}
    lines: dict[str, int] = {}
    for row in reader:
        if row.get(None):  # csv's key for values past the header's fields
            raise ValueError(f"Subtitle file {path}, line {reader.line_num}: more values than the header has fields "
                             f"({row[None]}): put a subtitle that holds a comma in double quotes.")
        name, text = row["name"], row[found] or ""
        if name in subtitles and subtitles[name] != text:  # a repeated identical row is harmless
            raise ValueError(
                f"Subtitle file {path}, line {reader.line_num}: {name!r} has a second, different subtitle (first on "
                f"line {lines[name]}): {subtitles[name]!r} vs {text!r}."
            )
        subtitles[name], lines[name] = text, lines.get(name, reader.line_num)
    return subtitles


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's parser is not thread-safe: reading features from
# the dataset's thread pool failed once with "SystemError: AST constructor recursion depth mismatch" (3.11.7). Headers
# are read one at a time; the data itself is memory-mapped and checked outside the lock.
_NPY_HEADER = threading.Lock()


def read_feature(path: Path, sample: str, shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Memory-map a feature ``.npy`` (never unpickling) and check that its shape is one of ``shapes`` and that every
    value is finite (which reads the whole file); problems raise :class:`SampleError`."""
    if not path.is_file():
        raise SampleError(sample, path, "missing feature file", "no such file")
    try:
        with _NPY_HEADER:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise SampleError(sample, path, "unreadable feature file", str(err) or type(err).__name__) from None
    if not isinstance(array, np.ndarray):
        raise SampleError(sample, path, "unreadable feature file", f"not a .npy array but a {type(array).__name__}")
    if tuple(array.shape) not in shapes or not np.issubdtype(array.dtype, np.floating):
        expected = " or ".join(str(s) for s in shapes)
        raise SampleError(
            sample, path, "wrong feature shape", f"got {tuple(array.shape)} {array.dtype}, expected {expected} float"
        )
    if not np.isfinite(array).all():  # one NaN here would turn every trained weight into NaN within a few steps
        bad = ~np.isfinite(array)
        first = tuple(int(i) for i in np.unravel_index(int(bad.argmax()), array.shape))
        raise SampleError(
            sample, path, "non-finite feature values", f"{int(bad.sum())} NaN or infinite values, the first at {first}"
        )
    if array.dtype.itemsize > 4 and array.size and np.abs(array).max() > np.finfo(np.float32).max:
        raise SampleError(sample, path, "non-finite feature values", "values beyond float32's range, which the model "
                                                                     "reads them in")  # fmt: skip
    return array
