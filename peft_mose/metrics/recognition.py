"""Single-label emotion recognition scores: accuracy, weighted F1 (MER2023), UAR and WAR (DFEW)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score, recall_score

from .grouping import normalize_word

# Emotion-LLaMA's label order (MERR) and the subsets that MER2023/2024 and DFEW evaluate.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "merr": ("neutral", "angry", "happy", "sad", "worried", "surprise", "fear", "contempt", "doubt"),
    "mer2023": ("neutral", "angry", "happy", "sad", "worried", "surprise"),
    "dfew": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
}


def resolve_labels(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A label set: a preset name from :data:`LABEL_SETS`, a comma-separated string or a sequence of labels."""
    if isinstance(spec, str):
        spec = LABEL_SETS.get(spec.strip().lower(), spec.split(","))
    labels = tuple(normalize_word(label) for label in spec)
    if not labels or "" in labels or len(set(labels)) != len(labels):
        raise ValueError(f"Labels must be non-empty and distinct, got {list(spec)!r}.")
    return labels


def recognition_scores(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float | int | dict[str, float]]:
    """``accuracy``, ``weighted_f1``, ``uar`` (macro recall), ``war`` (support-weighted recall, equal to accuracy)
    and ``per_class_recall``; UAR and per-class recall cover the labels that occur in ``references``."""
    labels = resolve_labels(labels)
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if not references:
        raise ValueError("Nothing to score: no predictions and references.")
    y_pred = [normalize_word(p) for p in predictions]
    y_true = [normalize_word(r) for r in references]
    for kind, values in (("prediction", y_pred), ("reference", y_true)):
        unknown = [(i, v) for i, v in enumerate(values) if v not in labels]
        if unknown:
            i, v = unknown[0]
            raise ValueError(
                f"{len(unknown)} {kind}s are not in the label set {list(labels)}, e.g. {v!r} at position {i}."
            )
    seen = set(y_true)
    present = [label for label in labels if label in seen]
    per_class = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=list(labels), average="weighted", zero_division=0)),
        "uar": float(per_class.mean()),
        "war": float(recall_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "per_class_recall": {label: float(r) for label, r in zip(present, per_class)},
        "num_samples": len(y_true),
    }
