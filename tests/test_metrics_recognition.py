"""Accuracy, weighted F1, UAR and WAR: a hand-computed example and a hand-written counting implementation."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_mose.metrics import LABEL_SETS, recognition_scores, resolve_labels

MER2023 = LABEL_SETS["mer2023"]  # neutral, angry, happy, sad, worried, surprise


def test_hand_computed_example():
    y_true = ["happy", "happy", "happy", "sad", "sad", "angry", "neutral", "neutral"]
    y_pred = ["happy", "happy", "sad", "sad", "neutral", "angry", "neutral", "worried"]
    # correct: positions 0, 1, 3, 5, 6 -> accuracy = 5/8
    # happy:   support 3, tp 2, predicted 2 -> P 1,   R 2/3, F1 = 2 * (2/3) / (5/3) = 4/5
    # sad:     support 2, tp 1, predicted 2 -> P 1/2, R 1/2, F1 1/2
    # angry:   support 1, tp 1, predicted 1 -> F1 1, R 1
    # neutral: support 2, tp 1, predicted 2 -> P 1/2, R 1/2, F1 1/2
    # worried: support 0 (weight 0), surprise: absent
    # weighted F1 = (3 * 4/5 + 2 * 1/2 + 1 * 1 + 2 * 1/2) / 8 = 5.4 / 8 = 0.675
    # UAR = mean recall over the 4 labels with support = (1/2 + 1 + 2/3 + 1/2) / 4 = 2/3
    # WAR = (3 * 2/3 + 2 * 1/2 + 1 * 1 + 2 * 1/2) / 8 = 5/8 = accuracy
    scores = recognition_scores(y_pred, y_true, MER2023)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["weighted_f1"] == pytest.approx(0.675)
    assert scores["uar"] == pytest.approx(2 / 3)
    assert scores["war"] == pytest.approx(5 / 8)
    assert scores["per_class_recall"] == pytest.approx({"neutral": 0.5, "angry": 1.0, "happy": 2 / 3, "sad": 0.5})
    assert list(scores["per_class_recall"]) == ["neutral", "angry", "happy", "sad"]  # label-set order
    assert scores["num_samples"] == 8


def counting_scores(y_pred: list[str], y_true: list[str]) -> dict[str, float]:
    """Independent implementation from confusion counts (classes = labels that occur in y_true)."""
    support = Counter(y_true)
    predicted = Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    n = len(y_true)
    recall = {c: hits[c] / support[c] for c in support}
    f1 = {c: 2 * hits[c] / (support[c] + predicted[c]) for c in support}  # F1 = 2TP / (2TP + FP + FN)
    return {
        "accuracy": sum(hits.values()) / n,
        "weighted_f1": sum(support[c] * f1[c] for c in support) / n,
        "uar": sum(recall.values()) / len(recall),
        "war": sum(support[c] * recall[c] for c in support) / n,
    }


@settings(derandomize=True, deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.sampled_from(LABEL_SETS["dfew"]), st.sampled_from(LABEL_SETS["dfew"])), min_size=1))
def test_against_counting_implementation(pairs):
    y_true = [t for t, _ in pairs]
    y_pred = [p for _, p in pairs]
    ours = recognition_scores(y_pred, y_true, LABEL_SETS["dfew"])
    expected = counting_scores(y_pred, y_true)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["war"] == pytest.approx(ours["accuracy"])


def test_labels_are_normalised():
    scores = recognition_scores(["Happy", " sad "], ["happy", "SAD"], "happy,sad")
    assert scores["accuracy"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        recognition_scores(["happy", "sad"], ["happy"], MER2023)
    with pytest.raises(ValueError, match="Nothing to score"):
        recognition_scores([], [], MER2023)
    with pytest.raises(ValueError, match=r"1 predictions are not in the label set .* 'joy' at position 1"):
        recognition_scores(["happy", "joy"], ["happy", "sad"], MER2023)
    with pytest.raises(ValueError, match=r"1 references are not in the label set .* 'disgust' at position 0"):
        recognition_scores(["happy"], ["disgust"], MER2023)


def test_resolve_labels():
    assert resolve_labels("DFEW") == ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
    assert resolve_labels("Happy, sad ,neutral") == ("happy", "sad", "neutral")
    assert resolve_labels(["a", "b"]) == ("a", "b")
    for bad in ("happy,,sad", "happy,happy", ""):
        with pytest.raises(ValueError, match="non-empty and distinct"):
            resolve_labels(bad)
