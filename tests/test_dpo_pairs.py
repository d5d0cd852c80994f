"""Perceive-then-reason answers, the consistency-aware pair builder and the pair file format (docs/preference.md)."""

from __future__ import annotations

import json
import re

import pytest

from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.perceive import Cues, conclusion, perceive_then_reason, read_cues
from mosear_recipes.merr.readers import EMOTION_LABELS, SampleError
from mosear_recipes.merr.synthetic import plan_samples, read_synthetic_subsets, write_synthetic_merr
from mosear_recipes.merr.tasks import normalize_answer
from mosear_recipes.preference.pairs import PairMix, PreferencePair, build_pairs, main, read_pairs, write_pairs

CUES = Cues("frowning", "angry", "cheerful", "happy")


def test_template_describes_both_cues_then_concludes():
    text = perceive_then_reason(CUES, "angry", "visual")
    # perception first, each cue with what it suggests, then the verdict and one conclusion
    assert text.index("frowning") < text.index("cheerful") < text.index("more telling") < text.index("is angry.")
    assert "which suggests angry" in text and "which suggests happy" in text
    assert "The face is more telling than the voice." in text
    assert conclusion(text) == "angry" and conclusion(normalize_answer(text)) == "angry"
    assert conclusion(perceive_then_reason(CUES, "happy", "audio")) == "happy"
    assert conclusion("the face and the voice") is None
    with pytest.raises(ValueError, match="follows must be one of"):
        perceive_then_reason(CUES, "angry", "text")
    assert CUES.carrier("angry") == "visual" and CUES.carrier("happy") == "audio"
    assert Cues("a", "sad", "b", "sad").carrier("sad") == "both"
    with pytest.raises(ValueError, match="carried by neither cue"):
        CUES.carrier("sad")


def test_pairs_follow_the_cue_that_carries_the_label(tiny):
    data = tiny.data
    truth = {s.name: s for s in read_synthetic_subsets(data.subsets)}  # written independently of the cue file
    cues = read_cues(data.cues_json, EMOTION_LABELS)
    train = [s for s in truth.values() if s.split == "train"]
    pairs = build_pairs([(s.name, s.label) for s in train], cues, seed=3)
    assert [p.name for p in pairs] == [s.name for s in train]  # mix 1: every sample, in order
    for pair in pairs:
        sample = truth[pair.name]
        assert pair.subset == sample.subset and pair.task == "perceive"
        assert conclusion(pair.chosen) == sample.label
        wrong = conclusion(pair.rejected)
        if sample.subset == "video_aligned":
            assert wrong == sample.audio_label != sample.label and "voice is more telling" in pair.rejected
        elif sample.subset == "audio_aligned":
            assert wrong == sample.visual_label != sample.label and "face is more telling" in pair.rejected
        else:
            assert wrong != sample.label and "agree" in pair.rejected
        # both answers describe the same cues; only the verdict and the conclusion differ
        assert pair.chosen.split(". ")[:2] == pair.rejected.split(". ")[:2]
    assert {p.subset for p in pairs} == {"video_aligned", "audio_aligned", "consistent"}


def test_pair_mix(tiny):
    cues = read_cues(tiny.data.cues_json, EMOTION_LABELS)
    samples = [(s.name, s.label) for s in read_synthetic_subsets(tiny.data.subsets)]
    full = build_pairs(samples, cues, seed=0)
    only_conflicts = build_pairs(samples, cues, PairMix.parse("consistent=0"), seed=0)
    assert [p for p in full if p.subset != "consistent"] == only_conflicts
    half = build_pairs(samples, cues, PairMix(video_aligned=0.5, audio_aligned=0.0, consistent=0.0), seed=1)
    n_video = sum(p.subset == "video_aligned" for p in full)
    assert {p.subset for p in half} == {"video_aligned"} and 0 < len(half) < n_video
    assert half == build_pairs(samples, cues, PairMix(0.5, 0.0, 0.0), seed=1)  # deterministic
    for bad, message in (("video=1", "not SUBSET=SHARE"), ("consistent=x", "not a number"),
                         ("consistent=2", r"must be in \[0, 1\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            PairMix.parse(bad)


def test_builder_refuses_samples_without_a_carrying_cue(tmp_path):
    cues = {"a": CUES}
    with pytest.raises(SampleError, match="'b': missing cues"):
        build_pairs([("b", "angry")], cues)
    with pytest.raises(SampleError, match="'a': bad cues: label 'sad' is carried by neither cue"):
        build_pairs([("a", "sad")], cues)


def test_a_built_pair_whose_answers_are_the_same_once_normalised_is_refused():
    long = Cues(" ".join(["tense and very"] * 70), "angry", "cheerful", "happy")  # the 200-word cut hides the verdict
    with pytest.raises(SampleError, match=r"Sample 'a': indistinct pair: .*cut at 200 words.*\(cues.json\)"):
        build_pairs([("a", "angry")], {"a": long}, where="cues.json")


def test_pair_file_round_trip_and_cli(tiny, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    main([str(tiny.data.root), "--out", str(out), "--mix", "audio_aligned=0"])
    pairs = read_pairs(out)
    assert pairs and all(p.subset != "audio_aligned" for p in pairs)
    assert "pairs from 48 samples" in capsys.readouterr().out
    write_pairs(tmp_path / "again.jsonl", pairs)
    assert read_pairs(tmp_path / "again.jsonl") == pairs
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"name", "subset", "task", "chosen", "rejected"}


GOOD = {"name": "s1", "subset": "video_aligned", "task": "perceive", "chosen": "the emotion is sad.",
        "rejected": "the emotion is happy."}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chosen": None}, r"missing \['chosen'\]"),
        ({"extra": "x"}, r"unknown \['extra'\]"),
        ({"rejected": "  "}, "'rejected' must be a non-empty string"),
        ({"chosen": 3}, "'chosen' must be a non-empty string"),
        ({"rejected": "..."}, "empty once normalised"),
        ({"rejected": "the emotion is sad.", "chosen": "The emotion is SAD!"}, "are the same answer"),
        ({"subset": "both"}, "subset 'both' is not one of"),
        ({"task": "vqa"}, "task 'vqa' is not one of"),
    ],
)
def test_bad_pair_lines_name_the_file_and_line(tmp_path, change, message):
    record = {**GOOD, **change}
    record = {k: v for k, v in record.items() if v is not None}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: .*{message}"):
        read_pairs(path)


def test_bad_pair_files(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:2"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_pairs(path)
    path.write_text(json.dumps(GOOD) + "\n")
    assert read_pairs(path) == [PreferencePair(**GOOD)]


def test_cue_file_is_checked(tmp_path):
    path = tmp_path / "cues.json"
    entry = {"visual_cue": "frowning", "visual_label": "angry", "audio_cue": "calm", "audio_label": "neutral"}
    for bad, message in (({**entry, "audio_cue": ""}, r"missing or empty \['audio_cue'\]"),
                         ({**entry, "visual_label": "bored"}, "visual_label 'bored' is not one of"),
                         ({**entry, "pitch": "high"}, r"unknown \['pitch'\]")):  # fmt: skip
        path.write_text(json.dumps({"s1": bad}))
        with pytest.raises(SampleError, match=f"'s1': bad cues: {message}"):
            read_cues(path, EMOTION_LABELS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_cues(tmp_path / "missing.json", EMOTION_LABELS)


def test_perceive_task_answers_with_the_template(tiny):
    data = tiny.data
    dataset = MERRDataset(data.coarse_txt, data.subtitles, tasks="emotion,perceive", cues_json=data.cues_json)
    truth = {s.name: s for s in read_synthetic_subsets(data.subsets)}
    for index in range(6):
        sample = dataset[(index, "perceive", 0)]
        expected = truth[sample.name]
        assert conclusion(sample.answer) == expected.label
        assert f"suggests {expected.visual_label}" in sample.answer and f"suggests {expected.audio_label}" in sample.answer
        assert "vocal tone" in sample.instruction
    with pytest.raises(ValueError, match="needs the cue file"):
        MERRDataset(data.coarse_txt, data.subtitles, tasks="perceive")


def test_conflict_set_options(tmp_path):
    plan = plan_samples(100, seed=0, test_fraction=0.3, train_subsets={"consistent": 3, "video_aligned": 1})
    train = [s.subset for s in plan if s.split == "train"]
    test = [s.subset for s in plan if s.split == "test"]
    assert "audio_aligned" not in train and train.count("consistent") > 2 * train.count("video_aligned") > 0
    assert {test.count(s) for s in ("video_aligned", "audio_aligned", "consistent")} <= {10}  # balanced test split
    with pytest.raises(ValueError, match="non-negative weights"):
        plan_samples(10, train_subsets={"mixed": 1})
    with pytest.raises(ValueError, match="noise must give"):
        write_synthetic_merr(tmp_path, 6, noise={"pitch": 0.1})
