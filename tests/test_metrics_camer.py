"""CA-MER: stage-2 majority-vote subset assignment, per-subset aggregation and the audio-minus-video gap."""

from __future__ import annotations

import pytest

from peft_mose.metrics import (
    SynonymTable,
    assign_subsets,
    audio_video_gap,
    normalize_subset,
    scores_by_subset,
    set_level_scores,
    vote_subset,
)


@pytest.mark.parametrize(
    "audio, visual, multimodal, expected",
    [
        ("angry", "angry", "angry", ("consistent", "angry", None)),
        ("neutral", "happy", "happy", ("video_aligned", "happy", None)),
        ("angry", "happy", "angry", ("audio_aligned", "angry", None)),
        ("doubt", "doubt", "happy", (None, "doubt", "multimodal_disagrees")),
        ("doubt", "happy", "sad", (None, None, "inconsistent")),
        # GPT-4o answers with the prompt's words, Emotion-LLaMA with the MERR labels: compared after grouping.
        ("Surprised", "surprised", "surprise", ("consistent", "surprise", None)),
        ("doubtful", "fearful", "fear", ("video_aligned", "fear", None)),
        ("worried", "contemptuous", "worried", ("audio_aligned", "worried", None)),
    ],
)
def test_vote_subset(audio, visual, multimodal, expected):
    assert tuple(vote_subset(audio, visual, multimodal)) == expected


def test_vote_subset_with_a_custom_grouping():
    grouping = SynonymTable.from_clusters([["happy", "cheerful"]])
    assert vote_subset("sad", "cheerful", "happy", grouping).subset == "video_aligned"
    assert vote_subset("sad", "cheerful", "happy", lambda w: w).discard_reason == "inconsistent"


def test_assign_subsets_counts_and_discards():
    samples = [
        {"id": "s1", "audio": "angry", "visual": "angry", "multimodal": "angry"},
        {"id": "s2", "audio": "neutral", "visual": "happy", "multimodal": "happy"},
        {"id": "s3", "audio": "sad", "visual": "happy", "multimodal": "sad"},
        {"id": "s4", "audio": "sad", "visual": "happy", "multimodal": "worried"},
        {"id": "s5", "audio": "neutral", "visual": "neutral", "multimodal": "sad"},
        {"id": 6, "audio": "fearful", "visual": "scared", "multimodal": "fear"},
        {"id": "s7", "audio": "sad", "visual": "angry", "multimodal": "happy"},
    ]
    assignment = assign_subsets(samples)
    assert assignment.subsets == {"s1": "consistent", "s2": "video_aligned", "s3": "audio_aligned", "6": "consistent"}
    assert assignment.discarded == {"inconsistent": ["s4", "s7"], "multimodal_disagrees": ["s5"]}
    assert assignment.counts() == {
        "video_aligned": 1,
        "audio_aligned": 1,
        "consistent": 2,
        "inconsistent": 2,
        "multimodal_disagrees": 1,
    }
    assert assignment.votes["s3"].label == "sad"


def test_assign_subsets_errors():
    with pytest.raises(ValueError, match="Duplicate sample id 'a' \\(position 1\\)"):
        assign_subsets([{"id": "a", "audio": "sad", "visual": "sad", "multimodal": "sad"}] * 2)
    with pytest.raises(ValueError, match="position 0 has no visual"):
        assign_subsets([{"id": "a", "audio": "sad", "visual": " ", "multimodal": "sad"}])
    with pytest.raises(ValueError, match="position 0 has no id"):
        assign_subsets([{"id": None, "audio": "sad", "visual": "sad", "multimodal": "sad"}])
    zero = assign_subsets([{"id": 0, "audio": "sad", "visual": "sad", "multimodal": "sad"}])
    assert zero.subsets == {"0": "consistent"}


@pytest.mark.parametrize("name", ["video_aligned", "Video-Aligned", "video aligned", "VIDEO_ALIGNED"])
def test_normalize_subset(name):
    assert normalize_subset(name) == "video_aligned"


def test_unknown_subset():
    with pytest.raises(ValueError, match="Unknown CA-MER subset 'visual_aligned'"):
        normalize_subset("visual_aligned")


def test_scores_by_subset_order_and_pooled_overall():
    subsets = ["consistent", "video_aligned", "Audio-Aligned", "video_aligned"]
    result = scores_by_subset(subsets, lambda idx: {"indices": idx})
    assert list(result) == ["video_aligned", "audio_aligned", "consistent", "overall"]
    assert result["video_aligned"]["indices"] == [1, 3]
    assert result["audio_aligned"]["indices"] == [2]
    assert result["overall"]["indices"] == [0, 1, 2, 3]
    assert scores_by_subset([None, None], lambda idx: {"indices": idx}) == {"overall": {"indices": [0, 1]}}


def test_scores_by_subset_with_set_level_scores():
    predictions = [["sad"], ["happy"], ["happy", "sad"], ["angry"]]
    references = [["sad"], ["sad"], ["happy"], ["angry"]]
    subsets = ["video_aligned", "video_aligned", "consistent", "audio_aligned"]
    result = scores_by_subset(
        subsets, lambda idx: set_level_scores([predictions[i] for i in idx], [references[i] for i in idx])
    )
    # video: (1, 1) and (0, 0) -> 0.5 / 0.5; consistent: (1/2, 1); audio: (1, 1)
    # overall is pooled over the 4 samples: accuracy (1 + 0 + 1/2 + 1) / 4 = 5/8, recall (1 + 0 + 1 + 1) / 4 = 3/4
    assert result["video_aligned"]["accuracy"] == 0.5
    assert result["consistent"]["accuracy"] == 0.5 and result["consistent"]["recall"] == 1.0
    assert result["overall"]["accuracy"] == pytest.approx(5 / 8)
    assert result["overall"]["recall"] == pytest.approx(3 / 4)
    gap = audio_video_gap(result, ["accuracy", "recall", "average"])
    assert gap == {"accuracy": 0.5, "recall": 0.5, "average": 0.5}


def test_scores_by_subset_errors():
    with pytest.raises(ValueError, match="position 1 has no subset while others have one"):
        scores_by_subset(["consistent", None], lambda idx: {})
    with pytest.raises(ValueError, match="Unknown CA-MER subset 'mixed'"):
        scores_by_subset(["consistent", "mixed"], lambda idx: {})
    with pytest.raises(ValueError, match="No samples"):
        scores_by_subset([], lambda idx: {})
    with pytest.raises(ValueError, match="Subset 'consistent': No sample has a non-empty reference"):
        scores_by_subset(["consistent"], lambda idx: set_level_scores([["sad"]], [[]]))


def test_gap_reproduces_the_papers_audio_bias_number():
    # Table 1, Emotion-LLaMA: accuracy 47.66 (video-aligned) vs 59.94 (audio-aligned): "12% lower" (section 6.2).
    table_1 = {
        "video_aligned": {"accuracy": 0.4766, "average": 0.4956},
        "audio_aligned": {"accuracy": 0.5994, "average": 0.5578},
    }
    gap = audio_video_gap(table_1, ["accuracy", "average"])
    assert gap["accuracy"] == pytest.approx(0.1228)
    assert gap["average"] == pytest.approx(0.0622)
    assert audio_video_gap({"overall": {"accuracy": 1.0}}, ["accuracy"]) is None
