"""The references of a MERR dataset for evaluation: every sample's label (recognition) or caption (reasoning), with
its CA-MER subset when a subsets CSV lists it."""

from __future__ import annotations

import csv
from pathlib import Path

from peft_mose.metrics import normalize_subset
from mosear_recipes.scoring import Reference

from .dataset import MERRDataset
from .synthetic import FILES
from .tasks import TASKS

SUBSETS_FILE = FILES["subsets"]
"""Looked for beside the annotation file when no subsets file is given (the synthetic dataset writes it)."""


def read_subsets(path: str | Path) -> dict[str, str]:
    """``{name: subset}`` from a CSV with the columns ``name`` and ``subset`` (others are ignored, so
    ``synthetic_subsets.csv`` is one); subset names are normalised (``Video-Aligned`` -> ``video_aligned``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Subsets file {path} does not exist.")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"name", "subset"} <= set(reader.fieldnames or ()):
            raise ValueError(f"Subsets file {path} needs the columns 'name' and 'subset'; it has {reader.fieldnames}.")
        subsets, lines = {}, {}
        for line, row in enumerate(reader, start=2):
            if row["name"] in lines:
                raise ValueError(f"{path}:{line}: sample {row['name']!r} is listed again (first on line "
                                 f"{lines[row['name']]}); list each sample once.")
            lines[row["name"]] = line
            try:
                subsets[row["name"]] = normalize_subset(row["subset"] or "")
            except ValueError as error:
                raise ValueError(f"{path}:{line} (name {row['name']!r}): {error}") from None
    return subsets


def merr_references(
    dataset: MERRDataset, task: str = "emotion", subsets_file: str | Path | None = None
) -> list[Reference]:
    """One reference per sample of ``dataset``, in its order, for one of its tasks: the label for ``emotion``, the
    caption as written in the caption JSON for ``reason`` / ``reason_v2``. Subsets come from ``subsets_file``, which
    must list every sample (default: ``synthetic_subsets.csv`` beside the annotation file when present, else none)."""
    if subsets_file is None:
        beside = dataset.annotation_file.parent / SUBSETS_FILE
        subsets_file = beside if beside.is_file() else None
    subsets = read_subsets(subsets_file) if subsets_file is not None else {}
    unlisted = [r.name for r in dataset.records if subsets and r.name not in subsets]
    if unlisted:
        shown = ", ".join(repr(n) for n in unlisted[:5]) + (
            f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        )
        raise ValueError(f"Subsets file {subsets_file} lists no subset for {len(unlisted)} samples: {shown}.")
    if TASKS[task].answer_source == "label":
        return [Reference(r.name, label=r.label, subset=subsets.get(r.name)) for r in dataset.records]
    return [Reference(r.name, dataset.caption(r.name, task), subset=subsets.get(r.name)) for r in dataset.records]
