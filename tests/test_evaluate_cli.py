"""recipes/merr_evaluate.py in scoring mode (--predictions / --references) on small files, good and bad."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from peft_mose.metrics import LABEL_SETS
from mosear_recipes import evaluate_cli, scoring
from mosear_recipes.plots import plot_scores

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "merr_evaluate.py"

REASONING_REFS = [
    {
        "id": "a",
        "reference": "The face shows sadness. The voice is calm. Overall the person is sad.",
        "subset": "video_aligned",
    },
    {"id": "b", "reference": ["angry", "frustrated"], "subset": "Audio-Aligned"},
    {"id": "c", "reference": "Joyful smile. The final emotion is happiness.", "subset": "consistent"},
    {"id": "d", "reference": "No emotion word here.", "subset": "consistent"},
]
REASONING_PREDS = [
    {"id": "c", "prediction": "She is happy and excited."},
    {"id": "a", "prediction": "The person seems neutral."},
    {"id": "b", "prediction": ["anger"]},
    {"id": "d", "prediction": "sad"},
]
RECOGNITION_REFS = [
    {"id": 1, "label": "happy"},
    {"id": 2, "label": "happy"},
    {"id": 3, "label": "sad"},
    {"id": 4, "label": "Neutral"},
]
RECOGNITION_PREDS = [
    {"id": 1, "prediction": "happy"},
    {"id": 2, "prediction": "The emotion is joyful."},
    {"id": 3, "prediction": "sad"},
    {"id": 4, "prediction": "sad"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(tmp_path: Path, preds: list[dict], refs: list[dict], *extra: str) -> dict:
    argv = [
        "--predictions", str(write_jsonl(tmp_path / "preds.jsonl", preds)),
        "--references", str(write_jsonl(tmp_path / "refs.jsonl", refs)),
        "--out_dir", str(tmp_path / "out"),
        *extra,
    ]
    assert evaluate_cli.main(argv) == 0
    return json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8"))


def test_reasoning_with_subsets(tmp_path, capsys, caplog):
    result = run(tmp_path, REASONING_PREDS, REASONING_REFS)
    scores = result["scores"]
    # a: {neutral} vs conclusion {sad} -> 0, 0      b: {angry} vs {angry, frustrated} -> 1, 1/2
    # c: {happy, excited} vs {happy}    -> 1/2, 1   d: no emotion word in the reference -> skipped
    assert list(scores) == ["video_aligned", "audio_aligned", "consistent", "overall"]
    assert (scores["video_aligned"]["accuracy"], scores["video_aligned"]["recall"]) == (0.0, 0.0)
    assert (scores["audio_aligned"]["accuracy"], scores["audio_aligned"]["recall"]) == (1.0, 0.5)
    assert (scores["consistent"]["accuracy"], scores["consistent"]["recall"]) == (0.5, 1.0)
    assert (scores["consistent"]["num_samples"], scores["consistent"]["num_skipped"]) == (1, 1)
    assert scores["overall"]["accuracy"] == pytest.approx(0.5)  # (0 + 1 + 1/2) / 3
    assert scores["overall"]["average"] == pytest.approx(0.5)
    assert result["gap"] == {"accuracy": 1.0, "recall": 0.5, "average": 0.75}
    assert result["name"] == "preds" and result["num_samples"] == 4
    assert result["settings"] == {"grouping": "default", "extractor": "default (scope=conclusion)"}

    out = capsys.readouterr()
    row = "| preds | 0.00 | 0.00 | 0.00 | 100.00 | 50.00 | 75.00 | 50.00 | 100.00 | 75.00 | 50.00 | 50.00 | 50.00 |"
    assert row + " +100.00 | +50.00 | +75.00 |" in out.out
    assert out.out.startswith("| Model | Video-Aligned Acc. | Video-Aligned Rec. | Video-Aligned Avg. |")
    assert "1 samples have no emotion word in their reference and are skipped" in caplog.text and "'d'" in caplog.text

    files = tmp_path / "out"
    assert (files / "scores.md").read_text(encoding="utf-8") == out.out
    assert (files / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_sample = [json.loads(line) for line in (files / "per_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in per_sample] == ["a", "b", "c", "d"]
    assert per_sample[0]["reference_words"] == ["sad"] and per_sample[3]["accuracy"] is None


def test_scope_all_and_grouping_file_change_the_scores(tmp_path):
    # scope=all: a's reference words become {sadness, calm, sad} -> groups {sad, neutral}: accuracy 1, recall 1/2
    result = run(tmp_path, REASONING_PREDS, REASONING_REFS, "--scope", "all")
    assert (result["scores"]["video_aligned"]["accuracy"], result["scores"]["video_aligned"]["recall"]) == (1.0, 0.5)

    grouping = tmp_path / "groups.json"
    clusters = [["happy", "happiness", "joyful", "excited"], ["sad", "sadness"], ["neutral", "calm"], ["angry"]]
    grouping.write_text(json.dumps(clusters[:-1] + [["angry", "anger"]]), encoding="utf-8")
    # c: {happy} vs {happy} -> 1, 1 ("excited" now groups with happy); "frustrated" is its own group.
    result = run(tmp_path, REASONING_PREDS, REASONING_REFS, "--grouping", str(grouping), "--name", "wheel")
    assert (result["scores"]["consistent"]["accuracy"], result["scores"]["consistent"]["recall"]) == (1.0, 1.0)
    assert result["scores"]["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert result["settings"]["grouping"] == str(grouping) and result["name"] == "wheel"


def test_recognition_without_subsets(tmp_path, capsys):
    result = run(tmp_path, RECOGNITION_PREDS, RECOGNITION_REFS, "--scoring", "recognition")
    # Emotion-LLaMA parser: "...joyful." -> neutral.
    # y_pred = happy, neutral, sad, sad; y_true = happy, happy, sad, neutral
    # accuracy 2/4; recall happy 1/2, sad 1, neutral 0 -> UAR 1/2
    # F1: happy (P 1, R 1/2) 2/3, sad (P 1/2, R 1) 2/3, neutral 0 -> weighted (2 * 2/3 + 1 * 2/3 + 0) / 4 = 1/2
    overall = result["scores"]["overall"]
    assert list(result["scores"]) == ["overall"] and result["gap"] is None
    assert overall["accuracy"] == 0.5 and overall["uar"] == 0.5 and overall["war"] == 0.5
    assert overall["weighted_f1"] == pytest.approx(0.5)
    assert overall["per_class_recall"] == {"neutral": 0.0, "happy": 0.5, "sad": 1.0}
    assert result["settings"] == {"labels": list(LABEL_SETS["mer2023"]), "parser": "emotion_llama"}
    assert "| Model | Neutral | Happy | Sad | Acc. | W-F1 | UAR | WAR |" in capsys.readouterr().out

    # The robust parser reads "joyful" as happy: 3 of 4 correct.
    result = run(tmp_path, RECOGNITION_PREDS, RECOGNITION_REFS, "--scoring", "recognition", "--parser", "robust")
    assert result["scores"]["overall"]["accuracy"] == 0.75
    assert result["settings"]["grouping"] == "default"


def test_recognition_with_subsets_and_dfew_labels(tmp_path):
    subsets = ["video_aligned", "audio_aligned", "audio_aligned", "consistent"]
    refs = [dict(r, subset=s) for r, s in zip(RECOGNITION_REFS, subsets)]
    result = run(tmp_path, RECOGNITION_PREDS, refs, "--scoring", "recognition", "--labels", "dfew")
    assert result["scores"]["video_aligned"]["accuracy"] == 1.0
    assert result["scores"]["audio_aligned"]["accuracy"] == 0.5
    assert result["gap"]["accuracy"] == -0.5
    assert result["settings"]["labels"] == list(LABEL_SETS["dfew"])


def test_library_entry_points_for_a_model_running_mode(tmp_path):
    # A model-running mode hands its predictions to score() and write_report() directly.
    references = [scoring.Reference("x", "She is happy."), scoring.Reference("y", ["sad"])]
    config = scoring.ScoringConfig(extractor=lambda text: ["joy"])
    result, rows = scoring.score({"x": "anything", "y": "ignored"}, references, config)
    assert result["scores"]["overall"]["accuracy"] == 0.5  # x: {happy} vs {happy}; y: {happy} vs {sad}
    assert result["settings"]["extractor"] == "custom"
    second, _ = scoring.score({"x": "a", "y": ["sad"]}, references, config)
    table = scoring.markdown_table([("first", result), ("second", second)])
    assert table.splitlines()[2:] == ["| first | 50.00 | 50.00 | 50.00 |", "| second | 100.00 | 100.00 | 100.00 |"]
    plot_scores([("first", result), ("second", second)], tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 0
    paths = scoring.write_report(result, rows, tmp_path / "report", "first")
    assert sorted(p.name for p in paths.values()) == ["per_sample.jsonl", "scores.json", "scores.md", "scores.png"]


def test_markdown_table_rejects_rows_with_different_columns():
    reasoning = {"scoring": "reasoning", "scores": {"overall": {"accuracy": 1, "recall": 1, "average": 1}}, "gap": None}
    recognition = {
        "scoring": "recognition",
        "scores": {"overall": {"accuracy": 1, "weighted_f1": 1, "uar": 1, "war": 1, "per_class_recall": {}}},
        "gap": None,
    }
    with pytest.raises(ValueError, match="'b' has different columns"):
        scoring.markdown_table([("a", reasoning), ("b", recognition)])


def _lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD_PREDS = _lines({"id": "a", "prediction": "sad"}, {"id": "b", "prediction": "happy"})
GOOD_REFS = _lines({"id": "a", "reference": "sad"}, {"id": "b", "reference": "happy"})
LABEL_REFS = _lines({"id": "a", "label": "sad"}, {"id": "b", "label": "happy"})
RECOGNITION = ["--scoring", "recognition"]


def bad(preds: str, refs: str, message: str, *extra: str, name: str) -> object:
    return pytest.param(preds, refs, list(extra), message, id=name)


BAD_INPUTS = [
    bad(_lines({"id": "a", "prediction": "sad"}), GOOD_REFS, r"1 reference ids have no prediction: 'b'", name="miss"),
    bad(
        GOOD_PREDS + _lines({"id": "zz", "prediction": "sad"}),
        GOOD_REFS,
        r"1 prediction ids are not in the references: 'zz'",
        name="extra",
    ),
    bad(
        GOOD_PREDS + _lines({"id": "a", "prediction": "x"}),
        GOOD_REFS,
        r"preds.jsonl:3: duplicate id 'a' \(first on line 1\)",
        name="duplicate-prediction",
    ),
    bad(
        GOOD_PREDS,
        GOOD_REFS + _lines({"id": "b", "reference": "x"}),
        r"refs.jsonl:3: duplicate id 'b'",
        name="duplicate-reference",
    ),
    bad("", GOOD_REFS, r"preds.jsonl is empty", name="empty-predictions"),
    bad(GOOD_PREDS, "\n  \n", r"refs.jsonl is empty", name="blank-references"),
    bad(GOOD_PREDS, GOOD_REFS + "{not json\n", r"refs.jsonl:3: invalid JSON", name="invalid-json"),
    bad(GOOD_PREDS, _lines(["a", "sad"]), r"refs.jsonl:1: expected a JSON object, got list", name="not-an-object"),
    bad(
        _lines({"id": "a", "text": "sad"}, {"id": "b", "prediction": "x"}),
        GOOD_REFS,
        r"preds.jsonl:1 \(id 'a'\): missing field 'prediction'",
        name="no-prediction-field",
    ),
    bad(
        GOOD_PREDS,
        _lines({"id": "a"}, {"id": "b", "reference": "x"}),
        r"refs.jsonl:1 \(id 'a'\): reasoning scoring needs a field 'reference'",
        name="no-reference-field",
    ),
    bad(
        _lines({"id": True, "prediction": "sad"}),
        GOOD_REFS,
        r"preds.jsonl:1: 'id' must be a non-empty string or an integer",
        name="bad-id",
    ),
    bad(
        _lines({"id": "a", "prediction": 3}, {"id": "b", "prediction": "x"}),
        GOOD_REFS,
        r"'prediction' must be a string or a list of strings",
        name="bad-prediction-type",
    ),
    bad(
        GOOD_PREDS,
        _lines({"id": "a", "reference": "x", "subset": "video"}, {"id": "b", "reference": "x", "subset": "Consistent"}),
        r"refs.jsonl:1 \(id 'a'\): Unknown CA-MER subset 'video'",
        name="unknown-subset",
    ),
    bad(
        GOOD_PREDS,
        _lines({"id": "a", "reference": "sad", "subset": "consistent"}, {"id": "b", "reference": "happy"}),
        r"some records have a 'subset', others not \(e.g. id 'b'\)",
        name="mixed-subsets",
    ),
    bad(
        GOOD_PREDS,
        _lines({"id": "a", "reference": ""}, {"id": "b", "reference": []}),
        r"No sample has a non-empty reference",
        name="all-references-empty",
    ),
    bad(
        GOOD_PREDS,
        _lines({"id": "a", "label": "sad"}, {"id": "b", "label": "fear"}),
        r"refs.jsonl:2 \(id 'b'\): label 'fear' is not in the label set",
        *RECOGNITION,
        name="label-outside-set",
    ),
    bad(
        GOOD_PREDS,
        GOOD_REFS,
        r"refs.jsonl:1 \(id 'a'\): recognition scoring needs a string field 'label'",
        *RECOGNITION,
        name="no-label",
    ),
    bad(
        _lines({"id": "a", "prediction": ["sad"]}, {"id": "b", "prediction": "happy"}),
        LABEL_REFS,
        r"Prediction for id 'a' must be generated text for recognition scoring",
        *RECOGNITION,
        name="word-list-for-recognition",
    ),
    bad(GOOD_PREDS, LABEL_REFS, r"Labels must be non-empty", *RECOGNITION, "--labels", "a,,b", name="labels"),
]


@pytest.mark.parametrize("preds, refs, extra, message", BAD_INPUTS)
def test_bad_inputs_give_clear_errors(tmp_path, capsys, preds, refs, extra, message):
    (tmp_path / "preds.jsonl").write_text(preds, encoding="utf-8")
    (tmp_path / "refs.jsonl").write_text(refs, encoding="utf-8")
    argv = ["--predictions", str(tmp_path / "preds.jsonl"), "--references", str(tmp_path / "refs.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main([*argv, "--out_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing is written for a bad input


def test_missing_files_and_bad_grouping_file(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(GOOD_REFS, encoding="utf-8")
    out = ["--out_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--predictions", str(tmp_path / "nope.jsonl"), "--references", str(refs), *out])
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    grouping = tmp_path / "g.json"
    grouping.write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--predictions", str(refs), "--references", str(refs), *out, "--grouping", str(grouping)])
    assert "must hold a non-empty JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--predictions", str(refs), "--references", str(refs), *out, "--grouping", "missing.csv"])
    assert "No such file or directory: 'missing.csv'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_entry_point(tmp_path, monkeypatch, capsys):
    # Runs the file as __main__ (what `python recipes/merr_evaluate.py ...` does) without paying for a new interpreter.
    preds = write_jsonl(tmp_path / "p.jsonl", REASONING_PREDS)
    refs = write_jsonl(tmp_path / "r.jsonl", REASONING_REFS)
    argv = [str(SCRIPT), "--predictions", str(preds), "--references", str(refs), "--out_dir", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 0
    assert "| p | 0.00 | 0.00 | 0.00 | 100.00 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "scores.json").read_text(encoding="utf-8"))["gap"]["accuracy"] == 1.0
