"""Manifests of raw clips: a CSV (header row) or JSONL file, one clip per row/line, with the fields ``id``,
``video`` (.mp4 etc.), ``audio`` (.wav etc.; optional: the video's own track is used when absent), ``target`` (the
answer to train on), and optionally ``label`` (an emotion, for recognition scores) and ``subset`` (CA-MER:
video-aligned, audio-aligned or consistent). Relative paths are relative to the manifest's folder. Problems name
the file and line."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from peft_mose.metrics import normalize_subset

from ..scoring import read_jsonl
from ..textfiles import read_text

FIELDS = ("id", "video", "audio", "target", "label", "subset")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class ClipRecord:
    """One manifest row: the clip's id, its media files (absolute), target, label and subset, and where it was read."""

    id: str
    video: Path | None
    audio: Path | None
    target: str | None
    label: str | None
    subset: str | None
    file: Path
    line: int

    @property
    def where(self) -> str:
        """``manifest:line (id 'x')``, for messages."""
        return f"{self.file}:{self.line} (id {self.id!r})"


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    reader = csv.DictReader(io.StringIO(read_text(path, encoding="utf-8-sig"), newline=""))
    header = reader.fieldnames or []
    unknown = [name for name in header if name not in FIELDS]
    if "id" not in header or unknown:
        raise ValueError(f"{path}: the header must name 'id' and only the fields {list(FIELDS)}; it has {header}.")
    rows = []
    for row in reader:
        extra = row.pop(None, None)  # csv's key for values past the header's fields
        if extra:
            raise ValueError(f"{path}:{reader.line_num}: {len(extra)} value(s) more than the header has fields "
                             f"({extra}): put a value that holds a comma in double quotes.")
        rows.append((reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}))
    if not rows:
        raise ValueError(f"{path} is empty: it holds no clips.")
    return rows


def _text(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}.")
    return value


def read_manifest(path: str | Path, need_target: bool = True) -> list[ClipRecord]:
    """The clips of a CSV or JSONL manifest, checked: unique ids, known fields, a video or an audio file per clip,
    a ``target`` when ``need_target``, a valid ``subset`` given for all clips or none."""
    path = Path(path)
    if path.suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path}: a manifest is a .csv or .jsonl file.")
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {path} does not exist.")
    clips: list[ClipRecord] = []
    first_line: dict[str, int] = {}
    for line, record in _rows(path):
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise ValueError(f"{path}:{line}: unknown fields {unknown} (known: {list(FIELDS)}).")
        clip_id = record.get("id")
        if isinstance(clip_id, int) and not isinstance(clip_id, bool):
            clip_id = str(clip_id)
        if not isinstance(clip_id, str) or not clip_id:
            raise ValueError(f"{path}:{line}: 'id' must be a non-empty string, got {clip_id!r}.")
        if clip_id in first_line:
            raise ValueError(f"{path}:{line}: duplicate id {clip_id!r} (first on line {first_line[clip_id]}).")
        first_line[clip_id] = line
        where = f"{path}:{line} (id {clip_id!r})"
        video, audio = (_text(record, key, where) for key in ("video", "audio"))
        if video is None and audio is None:
            raise ValueError(f"{where}: give a 'video' or an 'audio' file (or both).")
        target = _text(record, "target", where)
        if need_target and target is None:
            raise ValueError(f"{where}: no 'target' (the answer to train on).")
        subset = _text(record, "subset", where)
        if subset is not None:
            try:
                subset = normalize_subset(subset)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        clips.append(ClipRecord(
            id=clip_id,
            video=(path.parent / video).resolve() if video else None,
            audio=(path.parent / audio).resolve() if audio else None,
            target=target,
            label=_text(record, "label", where),
            subset=subset,
            file=path,
            line=line,
        ))  # fmt: skip
    subsets = [c.subset is not None for c in clips]
    if any(subsets) and not all(subsets):
        missing = clips[subsets.index(False)]
        raise ValueError(f"{missing.where}: some clips have a 'subset', this one not: give all or none.")
    return clips
