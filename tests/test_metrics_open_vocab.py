"""Set-level accuracy / recall / average of Eq. 22-24 with the MER-OV conventions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_mose.metrics import sample_set_scores, set_level_scores

PREDICTIONS = [
    ["joyful", "surprised"],  # G -> {happy, surprise}
    ["anger"],  # {angry}
    [],  # empty prediction
    ["sad"],
    ["Worry", "anxious", "fearful"],  # {worried, fear}: worry and anxious are one group
]
REFERENCES = [
    ["happy"],  # {happy}
    ["angry", "frustrated"],  # {angry, frustrated}
    ["sad"],
    [],  # empty reference: skipped
    ["worried", "scared", "doubt"],  # {worried, fear, doubt}
]


def test_hand_computed_example():
    # per sample (accuracy = |∩| / |pred|, recall = |∩| / |gt|):
    #   1: ∩ = {happy}            -> 1/2, 1/1
    #   2: ∩ = {angry}            -> 1/1, 1/2
    #   3: empty prediction       -> 0,   0
    #   4: empty reference        -> skipped
    #   5: ∩ = {worried, fear}    -> 2/2, 2/3
    # accuracy = (1/2 + 1 + 0 + 1) / 4 = 5/8; recall = (1 + 1/2 + 0 + 2/3) / 4 = 13/24;
    # average = (15/24 + 13/24) / 2 = 7/12
    scores = set_level_scores(PREDICTIONS, REFERENCES)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["recall"] == pytest.approx(13 / 24)
    assert scores["average"] == pytest.approx(7 / 12)
    assert (scores["num_samples"], scores["num_skipped"]) == (4, 1)


def test_per_sample_scores():
    assert sample_set_scores(["joyful", "surprised"], ["happy"]) == (0.5, 1.0)
    assert sample_set_scores([], ["sad"]) == (0.0, 0.0)
    assert sample_set_scores(["sad"], []) is None
    assert sample_set_scores(["  ", ""], ["sad"]) == (0.0, 0.0)  # blank words do not count
    assert sample_set_scores(["happy", "joy", "glad"], ["happiness"]) == (1.0, 1.0)  # one group counted once


def test_grouping_is_what_makes_synonyms_match():
    # With the identity as G no word of the example matches: every scored sample gets 0.
    scores = set_level_scores(PREDICTIONS, REFERENCES, grouping=lambda word: word)
    assert (scores["accuracy"], scores["recall"], scores["num_samples"]) == (0.0, 0.0, 4)


def test_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        set_level_scores([["sad"], ["happy"]], [["sad"]])
    with pytest.raises(ValueError, match="No sample has a non-empty reference"):
        set_level_scores([["sad"]], [[]])
    with pytest.raises(TypeError, match="got the string 'happy'"):
        set_level_scores(["happy"], [["happy"]])


WORD = st.sampled_from(["happy", "joyful", "Joy", "sad", "sadness", "angry", "fury", "calm", "neutral", "bored", ""])


@settings(derandomize=True, deadline=None, max_examples=50)
@given(
    st.lists(st.tuples(st.lists(WORD, max_size=4), st.lists(WORD, max_size=4)), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_scores_do_not_depend_on_sample_or_word_order(pairs, rng):
    if all(not [w for w in ref if w] for _, ref in pairs):
        pairs.append((["happy"], ["joy"]))
    shuffled = [(rng.sample(p, len(p)), rng.sample(r, len(r))) for p, r in rng.sample(pairs, len(pairs))]
    original = set_level_scores([p for p, _ in pairs], [r for _, r in pairs])
    permuted = set_level_scores([p for p, _ in shuffled], [r for _, r in shuffled])
    assert original == permuted  # exact: means use math.fsum
    assert 0.0 <= original["accuracy"] <= 1.0 and 0.0 <= original["recall"] <= 1.0
