"""DFEW's seven labels (with ``disgust``, which MERR lacks) in the MERR format: read with ``--labels dfew``, scored
with all seven classes (UAR/WAR, the paper's Tables 4 and 12), trained and evaluated end to end; a label outside the
chosen set is refused naming its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_mose.metrics import LABEL_SETS, resolve_labels
from mosear_recipes import finetune
from mosear_recipes.arguments import TINY_CONFIG
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.readers import SampleError, read_annotations
from mosear_recipes.merr.references import merr_references
from mosear_recipes.merr.synthetic import write_synthetic_merr
from mosear_recipes.scoring import ScoringConfig, score

DFEW = LABEL_SETS["dfew"]


@pytest.fixture(scope="module")
def dfew(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MERR-layout folder whose ``dfew_train.txt`` / ``dfew_test.txt`` give the synthetic samples DFEW labels:
    every one of the seven in each file."""
    data = write_synthetic_merr(tmp_path_factory.mktemp("dfew"), num_samples=21, seed=5)
    names = [a.name for a in read_annotations(data.coarse_txt)] + [a.name for a in read_annotations(data.test_txt)]
    (data.subsets).unlink()  # no CA-MER subsets: DFEW has none
    rows = [f"{name} 16 {DFEW[i % len(DFEW)]}" for i, name in enumerate(names)]
    (data.root / "dfew_train.txt").write_text("\n".join(rows[:14]) + "\n")
    (data.root / "dfew_test.txt").write_text("\n".join(rows[14:]) + "\n")
    return data.root


def _dataset(root: Path, **kwargs) -> MERRDataset:
    return MERRDataset(root / "dfew_test.txt", root / "transcription_en_all.csv", tasks=("emotion",), **kwargs)


def test_dfew_labels_are_read_with_the_dfew_set_and_refused_with_merrs(dfew):
    dataset = _dataset(dfew, labels=resolve_labels("dfew"))
    assert sorted(r.label for r in dataset.records) == sorted(DFEW) and "disgust" in DFEW
    with pytest.raises(SampleError, match=rf"unknown label: 'disgust' on line 6; known labels: neutral, .*doubt "
                       rf"\({dfew / 'dfew_test.txt'}\)"):  # fmt: skip
        _dataset(dfew)  # MERR's nine by default


def test_dfew_is_scored_over_its_seven_classes(dfew):
    references = merr_references(_dataset(dfew, labels=resolve_labels("dfew")), "emotion")
    predictions = {r.id: r.label for r in references}
    wrong = next(r for r in references if r.label == "disgust")
    predictions[wrong.id] = "the person looks sad"  # disgust missed: its recall is 0, every other class's 1
    result, _ = score(predictions, references, ScoringConfig("recognition", resolve_labels("dfew")))
    overall = result["scores"]["overall"]
    assert list(overall["per_class_recall"]) == list(DFEW)
    assert overall["per_class_recall"]["disgust"] == 0.0 and overall["uar"] == pytest.approx(6 / 7)
    assert overall["war"] == pytest.approx(6 / 7) and overall["num_samples"] == 7


def test_a_dfew_run_trains_and_evaluates_on_the_seven_labels(dfew, tiny, tmp_path):
    out = tmp_path / "run"
    result = finetune.main([
        str(TINY_CONFIG), "--tiny_setup", "false", "--model_name_or_path", str(tiny.model_dir),
        "--data_root", str(dfew), "--annotation", "dfew_train.txt", "--eval_annotation", "dfew_test.txt",
        "--tasks", "emotion", "--labels", "dfew", "--eval_labels", "dfew", "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--iters_per_epoch", "2", "--num_train_epochs", "1",
        "--warmup_steps", "1", "--save_strategy", "no", "--val_size", "0", "--eval_strategy", "no",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    assert result["settings"]["labels"] == list(DFEW)
    assert result["scores"]["overall"]["num_samples"] == 7
    assert (out / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="--labels: Labels must be non-empty and distinct"):
        finetune.main([str(TINY_CONFIG), "--labels", "happy,happy", "--output_dir", str(tmp_path / "bad")])
