"""MERR data: readers on files in the real formats, bad inputs, tasks, dataset, sampler, collator, synthetic data."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from recipe_helpers import coarse_dataset

from peft_mose import Modality
from peft_mose.layout import IGNORE_INDEX
from mosear_recipes.emotion_llama.features import FeatureSpec
from mosear_recipes.emotion_llama.model import load_tokenizer
from mosear_recipes.emotion_llama.prompt import PromptEncoder
from mosear_recipes.merr.collator import MERRCollator
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.readers import SampleError, read_annotations, read_captions, read_subtitles
from mosear_recipes.merr.references import read_subsets
from mosear_recipes.merr.sampler import SingleTaskBatchSampler
from mosear_recipes.merr.synthetic import LABELS, read_synthetic_subsets, write_synthetic_merr
from mosear_recipes.merr.tasks import EMOTION_INSTRUCTIONS, REASON_INSTRUCTIONS, normalize_answer, parse_tasks


@pytest.fixture
def small(tmp_path):
    """Six synthetic samples (five in the coarse training file) that a test may damage."""
    return write_synthetic_merr(tmp_path, num_samples=6, seed=1)


# --- readers -------------------------------------------------------------------------------------------------------


def test_read_annotations_accepts_three_or_four_fields_and_blank_lines(tmp_path):
    path = tmp_path / "ann.txt"
    path.write_text("sample_1 40 happy\n\nsample_2 12 sad -0.5\n")
    rows = read_annotations(path)
    assert [(r.name, r.label, r.line) for r in rows] == [("sample_1", "happy", 1), ("sample_2", "sad", 3)]
    path.write_text("\ufeffsample_1 40 happy\n", encoding="utf-8")  # as Windows editors save it
    assert [r.name for r in read_annotations(path)] == ["sample_1"]


def test_empty_annotation_file_names_the_file(small):
    small.coarse_txt.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"Annotation file {small.coarse_txt} is empty"):
        coarse_dataset(small)


def test_malformed_annotation_row_names_file_and_line(tmp_path):
    path = tmp_path / "ann.txt"
    path.write_text("sample_1 40 happy\nsample_2 sad\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: expected 'name nframes label"):
        read_annotations(path)


def test_read_captions_and_missing_field(tmp_path, small):
    fine = read_captions(small.fine_json, "smp_reason_caption")
    assert fine["sample_00000000"].startswith("In the video the person looks")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"sample_9": {"reason_caption": "x"}, "sample_8": {"caption": " ... "}}))
    bad = read_captions(path, "caption")  # each entry's problem is the sample's, raised where it is used
    assert str(bad["sample_9"]) == f"Sample 'sample_9': missing caption: no text field 'caption' ({path})"
    assert str(bad["sample_8"]) == f"Sample 'sample_8': empty caption: 'caption' is ' ... ' ({path})"


def test_a_sample_with_an_empty_caption_is_refused_or_skipped_alone(small):
    captions = json.loads(small.fine_json.read_text())
    captions["sample_00000001"]["smp_reason_caption"] = "  "
    captions["not_annotated"] = None  # an entry no annotated sample uses troubles nobody
    small.fine_json.write_text(json.dumps(captions))
    build = dict(tasks="reason_v2", fine_json=small.fine_json)
    with pytest.raises(SampleError, match=r"Sample 'sample_00000001': empty caption"):
        MERRDataset(small.coarse_txt, small.subtitles, **build)
    dataset = MERRDataset(small.coarse_txt, small.subtitles, skip_missing=True, **build)
    assert [err.sample for err in dataset.skipped] == ["sample_00000001"] and len(dataset.records) == 4


@pytest.mark.parametrize("content, problem", [
    (b"", "unreadable feature file"),
    ("npz", "unreadable feature file: not a .npy array"),
    ("float64", "non-finite feature values: values beyond float32's range"),
])
def test_corrupt_and_overflowing_feature_files_name_sample_and_file(small, content, problem):
    path = small.root / "mae_340_UTT" / "sample_00000002.npy"
    if content == "npz":
        with path.open("wb") as handle:
            np.savez(handle, x=np.zeros(16, np.float32))
    elif content == "float64":
        np.save(path, np.full(16, 1e300))
    else:
        path.write_bytes(content)
    with pytest.raises(SampleError, match=rf"'sample_00000002': {re.escape(problem)}.*\({path}\)"):
        coarse_dataset(small)


def test_a_subtitle_with_an_unquoted_comma_is_refused(tmp_path):
    path = tmp_path / "subtitles.csv"
    path.write_text("name,sentence\nsample_1,hello, world\n")
    with pytest.raises(ValueError, match=r"line 2: more values than the header has fields \(\[' world'\]\)"):
        read_subtitles(path)


def test_read_subtitles_columns(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text('name,sentence_en\nsample_1,"Hello, there"\nsample_2,\n')
    assert read_subtitles(path) == {"sample_1": "Hello, there", "sample_2": ""}
    path.write_text("name,text\nsample_1,hi\n")
    expected = r"needs the columns 'name' and 'sentence or sentence_en'; it has \['name', 'text'\]"
    with pytest.raises(ValueError, match=expected):
        read_subtitles(path)


# --- bad inputs through the dataset ---------------------------------------------------------------------------------


def _set_label(path, name, label):
    lines = path.read_text().splitlines()
    path.write_text("".join((f"{name} 10 {label}" if line.startswith(name) else line) + "\n" for line in lines))


def test_unknown_label_names_sample_and_file(small):
    _set_label(small.coarse_txt, "sample_00000001", "joy")
    with pytest.raises(
        SampleError, match=rf"Sample 'sample_00000001': unknown label: 'joy' on line 2.*\({small.coarse_txt}\)"
    ):
        coarse_dataset(small)


def test_missing_feature_file_names_sample_and_file(small):
    path = small.root / "HL-UTT" / "sample_00000002.npy"
    path.unlink()
    with pytest.raises(SampleError, match=rf"Sample 'sample_00000002': missing feature file: no such file \({path}\)"):
        coarse_dataset(small)


@pytest.mark.parametrize(
    "folder, shape, expected",
    [("maeV_399_UTT", (2, 16), r"\(16,\) or \(1, 16\)"), ("EVA_448", (1024, 8), r"\(1025, 8\)")],
)
def test_wrong_feature_shape_names_sample_and_file(small, folder, shape, expected):
    path = small.root / folder / "sample_00000003.npy"
    np.save(path, np.zeros(shape, dtype=np.float32))
    got = re.escape(str(shape))
    message = rf"'sample_00000003': wrong feature shape: got {got}.*expected {expected}.*{path}"
    with pytest.raises(SampleError, match=message):
        coarse_dataset(small)


def test_missing_subtitle_names_sample_and_file(small):
    small.subtitles.write_text("name,sentence\nsample_00000000,hi\n")
    with pytest.raises(SampleError, match=rf"Sample 'sample_00000001': missing subtitle.*\({small.subtitles}\)"):
        coarse_dataset(small)


def test_missing_caption_names_sample_and_file(small):
    small.fine_json.write_text(json.dumps({}))
    message = rf"Sample 'sample_00000000': missing caption: no entry for task 'reason_v2' \({small.fine_json}\)"
    with pytest.raises(SampleError, match=message):
        MERRDataset(small.coarse_txt, small.subtitles, tasks="reason_v2", fine_json=small.fine_json)


def test_task_without_its_caption_file_is_refused(small):
    with pytest.raises(ValueError, match=r"Task 'reason' needs the coarse-grained caption JSON \(coarse_json\)"):
        MERRDataset(small.coarse_txt, small.subtitles, tasks="emotion,reason")


def test_skip_missing_skips_and_counts_each_problem(small):
    (small.root / "mae_340_UTT" / "sample_00000000.npy").unlink()
    np.save(small.root / "HL-UTT" / "sample_00000001.npy", np.zeros(3, dtype=np.float32))
    _set_label(small.coarse_txt, "sample_00000002", "joy")
    dataset = coarse_dataset(small, skip_missing=True)
    assert [r.name for r in dataset.records] == ["sample_00000003", "sample_00000004"]
    assert sorted(err.sample for err in dataset.skipped) == ["sample_00000000", "sample_00000001", "sample_00000002"]
    report = dataset.skip_report()
    assert report.startswith(f"skipped 3 of 5 samples in {small.coarse_txt}: ")
    assert "1 missing feature file" in report and "1 wrong feature shape" in report and "1 unknown label" in report


def test_skip_missing_with_nothing_left_is_an_error(small):
    small.coarse_txt.write_text("sample_00000000 3 joy\n")
    with pytest.raises(ValueError, match=r"No usable samples in .*skipped 1 of 1 samples.*1 unknown label"):
        coarse_dataset(small, skip_missing=True)


# --- tasks ----------------------------------------------------------------------------------------------------------


def test_normalize_answer_matches_emotion_llama():
    assert normalize_answer('He said: "NO!" (twice)*  ~ok;#') == "he said no twice ok"
    assert normalize_answer("Happy") == "happy"
    assert normalize_answer(" ".join(["w"] * 250)) == " ".join(["w"] * 200)


def test_parse_tasks():
    assert parse_tasks("emotion, reason_v2,emotion") == ("emotion", "reason_v2")
    with pytest.raises(ValueError, match=r"Unknown or no tasks \['infer'\]; known tasks: emotion, reason, reason_v2"):
        parse_tasks(["emotion", "infer"])


# --- dataset items ---------------------------------------------------------------------------------------------------


def test_dataset_item_shapes_grouping_and_answers(tiny):
    dataset = coarse_dataset(tiny.data)
    spec = dataset.spec
    assert spec == FeatureSpec.tiny() and len(dataset) == 48
    item = dataset[(3, "reason", 7)]
    raw = np.load(tiny.data.root / "EVA_448" / f"{item.name}.npy").astype(np.float32)
    assert item.eva_patch.shape == (256, 32) and item.eva_cls.shape == (8,)
    assert torch.equal(item.eva_patch[1], torch.from_numpy(raw[5:9].reshape(-1)))  # patches 4..7 (row 0 is CLS)
    assert torch.equal(item.eva_cls, torch.from_numpy(raw[0]))
    assert item.face.shape == item.video.shape == item.audio.shape == (16,)
    assert item.instruction == REASON_INSTRUCTIONS[7 % 5]
    assert item.answer == normalize_answer(json.loads(tiny.data.coarse_json.read_text())[item.name]["caption"])
    emotion = dataset[(3, "emotion", 7)]
    assert emotion.answer == emotion.label and emotion.instruction == EMOTION_INSTRUCTIONS[0]
    with pytest.raises(ValueError, match=r"Task 'reason_v2' was not loaded"):
        dataset.keys("reason_v2")


def test_utterance_features_may_be_row_vectors(small):
    path = small.root / "mae_340_UTT" / "sample_00000000.npy"
    np.save(path, np.load(path)[None])
    assert coarse_dataset(small)[(0, "emotion", 0)].face.shape == (16,)


# --- sampler --------------------------------------------------------------------------------------------------------


def test_sampler_one_task_per_batch_deterministic_per_epoch(tiny):
    dataset = coarse_dataset(tiny.data)
    sampler = SingleTaskBatchSampler(dataset, batch_size=4, num_batches=40, seed=3)
    first = list(sampler)
    second = list(sampler)
    assert len(first) == len(sampler) == 40 and first != second
    for batch in first:
        assert len(batch) == 4 and len({task for _, task, _ in batch}) == 1
    tasks = Counter(batch[0][1] for batch in first)
    assert set(tasks) == {"emotion", "reason"} and min(tasks.values()) >= 10
    sampler.set_epoch(0)
    assert list(sampler) == first
    reason = [i for batch in first if batch[0][1] == "reason" for i, _, _ in batch]
    assert sorted(reason[:48]) == list(range(48))  # each task walks through the dataset in shuffled passes


def test_each_tasks_passes_go_on_across_epochs_so_every_sample_is_trained(tiny):
    dataset = coarse_dataset(tiny.data)
    sampler = SingleTaskBatchSampler(dataset, batch_size=4, seed=1)  # one epoch: about half the dataset per task
    seen = {"emotion": [], "reason": []}
    epochs = [list(sampler) for _ in range(4)]
    for batches in epochs:
        for batch in batches:
            seen[batch[0][1]] += [index for index, _, _ in batch]
    for indices in seen.values():  # each task's draws are whole shuffled passes, one after the other
        whole = len(indices) // len(dataset) * len(dataset)
        assert whole >= len(dataset)
        for start in range(0, whole, len(dataset)):
            assert sorted(indices[start:start + len(dataset)]) == list(range(len(dataset)))
    sampler.set_epoch(2)
    assert list(sampler) == epochs[2]  # an epoch is found again from the seed alone (resume, other processes)


def test_sampler_task_weights_and_validation(tiny):
    dataset = coarse_dataset(tiny.data)
    only_emotion = SingleTaskBatchSampler(dataset, 2, task_weights=[1, 0], num_batches=10)
    assert {key[1] for batch in only_emotion for key in batch} == {"emotion"}
    assert len(SingleTaskBatchSampler(dataset, 5)) == 10
    with pytest.raises(ValueError, match="task_weights must be 2 non-negative numbers"):
        SingleTaskBatchSampler(dataset, 2, task_weights=[1])
    with pytest.raises(ValueError, match=r"Tasks \['reason_v2'\] were not loaded"):
        SingleTaskBatchSampler(dataset, 2, tasks=["reason_v2"])


# --- collator -------------------------------------------------------------------------------------------------------


def test_collator_labels_padding_and_modalities(tiny):
    dataset = coarse_dataset(tiny.data)
    tokenizer = load_tokenizer(tiny.model_dir)
    collate = MERRCollator(PromptEncoder(tokenizer, n_patch_tokens=256))
    samples = [dataset[(0, "reason", 0)], dataset[(1, "emotion", 0)]]
    batch = collate(samples)
    ids, mask, labels, mods = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["modality_ids"]
    assert batch["names"] == [s.name for s in samples] and batch["tasks"] == ["reason", "emotion"]
    assert batch["eva_patch"].shape == (2, 256, 32) and batch["audio"].shape == (2, 16)
    for row in range(2):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert (labels[row, length:] == IGNORE_INDEX).all() and (ids[row, length:] == tokenizer.pad_token_id).all()
        answer = mods[row] == Modality.ANSWER
        assert torch.equal(labels[row] != IGNORE_INDEX, answer)
        assert torch.equal(labels[row, answer], ids[row, answer])
        assert labels[row, length - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[row, answer][:-1]) == samples[row].answer
        assert ids[row, 0] == tokenizer.bos_token_id
        head = len(tokenizer("[INST] <video>", add_special_tokens=False)["input_ids"])
        middle = len(tokenizer("</video> <feature>", add_special_tokens=False)["input_ids"])
        visual = 1 + head
        assert (mods[row, visual : visual + 256] == Modality.VISUAL).all()
        feats = visual + 256 + middle
        assert mods[row, feats : feats + 4].tolist() == [Modality.VISUAL] * 2 + [Modality.AUDIO, Modality.VISUAL]
        others = torch.ones_like(answer)
        others[visual : visual + 256] = False
        others[feats : feats + 4] = False
        assert (mods[row, others & ~answer] == Modality.TEXT).all()


def test_collator_prompt_only_and_audio_repeat(tiny):
    dataset = coarse_dataset(tiny.data)
    tokenizer = load_tokenizer(tiny.model_dir)
    sample = dataset[(2, "emotion", 0)]
    full = MERRCollator(PromptEncoder(tokenizer))([sample])
    prompt = MERRCollator(PromptEncoder(tokenizer, audio_repeat=5), with_answer=False)([sample])
    assert "labels" not in prompt and not (prompt["modality_ids"] == Modality.ANSWER).any()
    assert int((prompt["modality_ids"] == Modality.AUDIO).sum()) == 5
    n_answer = int((full["modality_ids"] == Modality.ANSWER).sum())
    assert prompt["input_ids"].shape[1] == full["input_ids"].shape[1] - n_answer + 4


def test_collator_rejects_wrong_patch_count(tiny):
    dataset = coarse_dataset(tiny.data)
    collate = MERRCollator(PromptEncoder(load_tokenizer(tiny.model_dir), n_patch_tokens=128))
    with pytest.raises(ValueError, match=r"Sample 'sample_00000000' has 256 EVA patch tokens; .* expects 128"):
        collate([dataset[(0, "emotion", 0)]])


# --- synthetic dataset ----------------------------------------------------------------------------------------------


def test_synthetic_subsets_and_labels_recoverable_from_features(tiny):
    rows = read_synthetic_subsets(tiny.data.subsets)
    assert len(rows) == 60 and Counter(r.split for r in rows) == {"train": 48, "test": 12}
    assert Counter(r.subset for r in rows) == {"video_aligned": 20, "audio_aligned": 20, "consistent": 20}
    for r in rows:
        agree = {"video_aligned": r.visual_label, "audio_aligned": r.audio_label, "consistent": r.visual_label}
        assert r.label == agree[r.subset]
        assert (r.visual_label == r.audio_label) == (r.subset == "consistent")
    root = tiny.data.root
    folders = {"EVA_448": "visual_label", "mae_340_UTT": "visual_label", "maeV_399_UTT": "visual_label"}
    for folder, which in {**folders, "HL-UTT": "audio_label"}.items():
        feats = np.stack([np.load(root / folder / f"{r.name}.npy").astype(np.float64).reshape(-1) for r in rows])
        truth = np.array([LABELS.index(getattr(r, which)) for r in rows])
        means = np.stack([feats[truth == k].mean(0) for k in range(len(LABELS))])
        predicted = np.argmin(((feats[:, None] - means[None]) ** 2).sum(-1), axis=1)
        assert (predicted == truth).all(), folder


def test_synthetic_files_read_as_real_merr(tiny):
    data = tiny.data
    fine = MERRDataset(data.fine_txt, data.subtitles, tasks="emotion,reason_v2", fine_json=data.fine_json)
    test = MERRDataset(data.test_txt, data.subtitles, tasks="emotion")
    assert len(fine) == 24 and len(test) == 12
    assert fine[(0, "reason_v2", 0)].answer.endswith(fine.records[0].label)
    assert json.loads((data.root / "feature_spec.json").read_text())["eva_dim"] == 8


def test_a_subsets_file_listing_a_sample_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "subsets.csv"
    path.write_text("name,subset\ns1,consistent\ns2,audio_aligned\ns1,video_aligned\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"subsets.csv:4: sample 's1' is listed again \(first on line 2\)"):
        read_subsets(path)
