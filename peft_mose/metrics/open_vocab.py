"""Set-level accuracy and recall of open-vocabulary emotion words (paper Appendix C.1, Eq. 22-24).

Conventions of MER-OV (zeroQiaoba/MERTools, ``MER2024/main-ov.py``): an empty prediction scores 0 on both, a sample
whose reference is empty is skipped. Means use :func:`math.fsum`, so scores do not depend on the sample order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .grouping import DEFAULT_GROUPING, Grouping, normalize_word


def _grouped(words: Iterable[str], grouping: Grouping) -> set[str]:
    if isinstance(words, str):
        raise TypeError(f"Expected a collection of emotion words, got the string {words!r}; extract words first.")
    return {grouping(word) for word in map(normalize_word, words) if word}


def sample_set_scores(
    prediction: Iterable[str], reference: Iterable[str], grouping: Grouping | None = None
) -> tuple[float, float] | None:
    """(accuracy, recall) of one sample (Eq. 22-23), or ``None`` when the reference is empty (sample skipped)."""
    grouping = DEFAULT_GROUPING if grouping is None else grouping
    pred, ref = _grouped(prediction, grouping), _grouped(reference, grouping)
    if not ref:
        return None
    if not pred:
        return 0.0, 0.0
    hits = len(pred & ref)
    return hits / len(pred), hits / len(ref)


def set_level_scores(
    predictions: Sequence[Iterable[str]], references: Sequence[Iterable[str]], grouping: Grouping | None = None
) -> dict[str, float | int]:
    """Mean set-level ``accuracy`` and ``recall`` and their ``average`` (Eq. 24) over samples with a reference,
    plus ``num_samples`` (scored) and ``num_skipped`` (empty reference)."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    scored = [s for s in (sample_set_scores(p, r, grouping) for p, r in zip(predictions, references)) if s is not None]
    if not scored:
        raise ValueError(f"No sample has a non-empty reference ({len(references)} samples), nothing to score.")
    accuracy = math.fsum(a for a, _ in scored) / len(scored)
    recall = math.fsum(r for _, r in scored) / len(scored)
    return {
        "accuracy": accuracy,
        "recall": recall,
        "average": (accuracy + recall) / 2,
        "num_samples": len(scored),
        "num_skipped": len(references) - len(scored),
    }
