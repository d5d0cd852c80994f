"""Consistency-aware preference pairs from labelled samples with CA-MER-style subsets, and their JSONL format.

A sample's subset follows from which cue carries its label (:meth:`~mosear_recipes.merr.perceive.Cues.carrier`):
``video_aligned`` (the face), ``audio_aligned`` (the voice), ``consistent`` (both). Both answers are perceive-then-
reason answers (:mod:`mosear_recipes.merr.perceive`) that describe the same cues; they differ in what they conclude:

| subset | chosen | rejected |
|---|---|---|
| ``video_aligned`` | follows the face, concludes the label | follows the misleading voice, concludes its label |
| ``audio_aligned`` | follows the voice, concludes the label | follows the misleading face, concludes its label |
| ``consistent`` | "face and voice agree", the label | "face and voice agree", another label (drawn with the seed): a conclusion the evidence does not support |

The pair mix (:class:`PairMix`) gives, per subset, the share of its samples that yield a pair (drawn with the seed).

JSONL format, one pair per line (``write_pairs`` / ``read_pairs``)::

    {"name": "sample_00000001", "subset": "video_aligned", "task": "perceive", "chosen": "...", "rejected": "..."}

``name`` is a sample of the annotation the DPO run reads (its features and subtitle are looked up there), ``task``
a MERR task whose first instruction is the prompt (``perceive`` for these pairs), ``subset`` one of the three. Every
field is required and a non-empty string, no other field is allowed, and ``chosen`` must differ from ``rejected``
(after the answer normalisation the recipe trains on); a bad line is refused naming the file and the line.

    python -m mosear_recipes.preference.pairs DATA_ROOT --annotation MERR_coarse_grained.txt --out pairs.jsonl \\
        [--mix video_aligned=1,audio_aligned=1,consistent=0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..merr.perceive import CUES_FILE, Cues, SUBSET_OF, perceive_then_reason, read_cues
from ..merr.readers import EMOTION_LABELS, SampleError, check_label, read_annotations
from ..merr.synthetic import SUBSETS
from ..merr.tasks import TASKS, normalize_answer
from ..scoring import read_jsonl, write_jsonl


@dataclass(frozen=True)
class PreferencePair:
    """One line of a pair file."""

    name: str
    subset: str
    task: str
    chosen: str
    rejected: str


PAIR_FIELDS = tuple(f.name for f in fields(PreferencePair))


@dataclass(frozen=True)
class PairMix:
    """Per subset, the share in [0, 1] of its samples that yield a pair."""

    video_aligned: float = 1.0
    audio_aligned: float = 1.0
    consistent: float = 1.0

    def __post_init__(self) -> None:
        bad = {s: getattr(self, s) for s in SUBSETS if not 0.0 <= getattr(self, s) <= 1.0}
        if bad:
            raise ValueError(f"Pair mix shares must be in [0, 1], got {bad}.")

    @classmethod
    def parse(cls, text: str) -> PairMix:
        """``"video_aligned=1,audio_aligned=0.5,consistent=0"`` (subsets not named keep 1)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in SUBSETS:
                raise ValueError(f"--mix: {item!r} is not SUBSET=SHARE with SUBSET one of {SUBSETS}.")
            try:
                values[key.strip()] = float(value)
            except ValueError as error:
                raise ValueError(f"--mix: {item!r}: {value!r} is not a number.") from error
        return cls(**values)


def rejected_conclusion(
    subset: str, cues: Cues, label: str, rng: np.random.Generator, labels: Sequence[str]
) -> tuple[str, str]:
    """``(follows, label)`` of the rejected answer: the misleading cue in a conflict, a wrong label when the cues
    agree (drawn from ``labels`` with ``rng``)."""
    if subset == "video_aligned":
        return "audio", cues.audio_label
    if subset == "audio_aligned":
        return "visual", cues.visual_label
    return "both", str(rng.choice([x for x in labels if x != label]))


def build_pairs(
    samples: Sequence[tuple[str, str]],
    cues: Mapping[str, Cues],
    mix: PairMix = PairMix(),
    seed: int = 0,
    labels: Sequence[str] | None = None,
    where: str = "the cue file",
) -> list[PreferencePair]:
    """Pairs for the ``(name, label)`` samples whose subset's share of ``mix`` draws them (seeded), in sample order.
    ``labels`` are the wrong labels a consistent sample's rejected answer may conclude (default: every label the
    cues use). A sample without cues, whose label neither cue carries, or whose two answers are the same once
    normalised is refused, naming it and ``where``."""
    rng = np.random.default_rng(seed)
    labels = list(labels) if labels is not None else sorted({c.visual_label for c in cues.values()}
                                                             | {c.audio_label for c in cues.values()})  # fmt: skip
    pairs = []
    for name, label in samples:
        if name not in cues:
            raise SampleError(name, where, "missing cues", "no entry")
        sample_cues = cues[name]
        try:
            subset = SUBSET_OF[sample_cues.carrier(label)]
        except ValueError as error:
            raise SampleError(name, where, "bad cues", str(error)) from error
        keep = rng.random() < getattr(mix, subset)
        follows, wrong = rejected_conclusion(subset, sample_cues, label, rng, labels)
        if keep:
            chosen = perceive_then_reason(sample_cues, label, sample_cues.carrier(label))
            rejected = perceive_then_reason(sample_cues, wrong, follows)
            if normalize_answer(chosen) == normalize_answer(rejected):
                raise SampleError(name, where, "indistinct pair", "its chosen and rejected answers are the same once "
                                  "normalised as trained (cut at 200 words before their conclusions): shorten its cue "
                                  "descriptions")  # fmt: skip
            pairs.append(PreferencePair(name, subset, "perceive", chosen, rejected))
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> None:
    """Write ``pairs`` as JSONL (the format above)."""
    write_jsonl(path, [asdict(p) for p in pairs])


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Read and check a pair file: every error names the file and the line."""
    path = Path(path)
    pairs = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        missing = [f for f in PAIR_FIELDS if f not in record]
        unknown = sorted(set(record) - set(PAIR_FIELDS))
        if missing or unknown:
            raise ValueError(f"{where}: a pair has exactly the fields {list(PAIR_FIELDS)}; missing {missing}, "
                             f"unknown {unknown}.")  # fmt: skip
        for field in PAIR_FIELDS:
            if not isinstance(record[field], str) or not record[field].strip():
                raise ValueError(f"{where}: {field!r} must be a non-empty string, got {record[field]!r}.")
        if record["subset"] not in SUBSETS:
            raise ValueError(f"{where}: subset {record['subset']!r} is not one of {list(SUBSETS)}.")
        if record["task"] not in TASKS:
            raise ValueError(f"{where}: task {record['task']!r} is not one of {list(TASKS)}.")
        if not normalize_answer(record["chosen"]) or not normalize_answer(record["rejected"]):
            raise ValueError(f"{where}: an answer is empty once normalised (it holds only punctuation).")
        if normalize_answer(record["chosen"]) == normalize_answer(record["rejected"]):
            raise ValueError(f"{where}: 'chosen' and 'rejected' are the same answer (after normalisation): a pair "
                             "must prefer one answer to another.")  # fmt: skip
        pairs.append(PreferencePair(**record))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mosear_recipes.preference.pairs``: build a pair file from an annotation and its cue file."""
    parser = argparse.ArgumentParser(prog="python -m mosear_recipes.preference.pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("data_root", type=Path, help=f"holds the annotation and {CUES_FILE}")
    parser.add_argument("--annotation", default="MERR_coarse_grained.txt", help="labelled samples (MERR format)")
    parser.add_argument("--cues", default=CUES_FILE, help=f"cue file under data_root (default {CUES_FILE})")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL pair file to write")
    parser.add_argument("--mix", default="", help="SUBSET=SHARE,... (default: every sample of every subset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    annotation = args.data_root / args.annotation
    samples = [(a.name, check_label(a, EMOTION_LABELS)) for a in read_annotations(annotation)]
    cues_path = args.data_root / args.cues
    pairs = build_pairs(samples, read_cues(cues_path, EMOTION_LABELS), PairMix.parse(args.mix), args.seed,
                        where=str(cues_path))  # fmt: skip
    write_pairs(args.out, pairs)
    counts = {s: sum(p.subset == s for p in pairs) for s in SUBSETS}
    print(f"{len(pairs)} pairs from {len(samples)} samples of {annotation} -> {args.out} ({counts})")


if __name__ == "__main__":
    main()
