"""Training and loading never lose a good state nor go on with a bad one (issue #12): non-finite features, losses,
gradients and weights; checkpoint manifests (a run killed while saving, damaged checkpoints, rotation, a full disk);
clear errors for bad files; duplicates and fallback answers counted or refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from recipe_helpers import coarse_dataset, run_args
from mosear_recipes import scoring
from mosear_recipes import finetune
from mosear_recipes.run import check_adapter_dir, load_trained
from mosear_recipes.emotion_llama.model import EmotionLlama
from mosear_recipes.guards import NonFiniteError, NonFiniteGuard
from mosear_recipes.integrity import (
    MANIFEST,
    CheckpointError,
    CheckpointManifests,
    checkpoints,
    newest_intact,
    resolve_resume,
    save_failure,
    write_manifest,
)
from mosear_recipes.merr.readers import SampleError, read_annotations, read_captions, read_subtitles
from mosear_recipes.merr.synthetic import write_synthetic_merr

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "kill_while_saving.py"
def checkpoint(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


@pytest.fixture(scope="module")
def killed_and_resumed(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """A run SIGKILLed while saving checkpoint-4 (a copy of its folder as the kill left it), then resumed with
    ``--resume_from_checkpoint`` and no path: ``(as killed, resumed)``."""
    out = tmp_path_factory.mktemp("killed") / "run"
    env = {**os.environ, "KILL_AT_CHECKPOINT": "4", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(KILLER), *run_args(tiny, out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    as_killed = out.parent / "as_killed"
    shutil.copytree(out, as_killed)
    finetune.main([*run_args(tiny, out), "--resume_from_checkpoint"])
    return as_killed, out


def test_a_run_killed_while_saving_resumes_from_the_newest_intact_checkpoint(killed_and_resumed, tiny):
    as_killed, resumed = killed_and_resumed
    assert (checkpoint(as_killed, 4) / "projectors.safetensors").is_file()  # written before the kill
    assert not (checkpoint(as_killed, 4) / MANIFEST).exists() and (checkpoint(as_killed, 2) / MANIFEST).is_file()
    with pytest.raises(CheckpointError, match=r"checkpoint-4/manifest.json is missing: the checkpoint was never finis"
                       r".*The newest intact checkpoint is .*checkpoint-2"):  # fmt: skip
        resolve_resume(str(checkpoint(as_killed, 4)), as_killed)
    assert resolve_resume("True", as_killed) == str(checkpoint(as_killed, 2))
    # The resumed run picked checkpoint-2, moved what the kill left of checkpoint-4 aside, and saved checkpoint-4
    # again, whole, with its manifest.
    assert [p.name for p in sorted(resumed.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4",
                                                                      "checkpoint-4.refused"]  # fmt: skip
    assert not (resumed / "checkpoint-4.refused" / MANIFEST).exists()
    assert resolve_resume(str(checkpoint(resumed, 4)), resumed) == str(checkpoint(resumed, 4))
    assert json.loads((checkpoint(resumed, 4) / "trainer_state.json").read_text())["global_step"] == 4


def _nan_adapter(path: Path) -> None:
    file = path / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(file)).items()}, str(file))


DAMAGES = {
    "optimizer.pt": lambda c: (c / "optimizer.pt").unlink(),
    "scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
    "rng_state.pth": lambda c: (c / "rng_state.pth").unlink(),
    "adapter_model.safetensors": _nan_adapter,
    "trainer_state.json": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "planted.pt": lambda c: torch.save({"x": 1}, c / "planted.pt"),
}


@pytest.mark.parametrize("damaged", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(killed_and_resumed, tiny, tmp_path, damaged):
    run = tmp_path / "run"
    shutil.copytree(killed_and_resumed[1], run)
    DAMAGES[damaged](checkpoint(run, 4))
    with pytest.raises(CheckpointError, match=rf"Refusing to resume from .*checkpoint-4.*{damaged}.*"
                       r"The newest intact checkpoint is .*checkpoint-2"):  # fmt: skip
        finetune.main([*run_args(tiny, run), "--resume_from_checkpoint", str(checkpoint(run, 4))])
    assert resolve_resume("True", run) == str(checkpoint(run, 2))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [  # nothing deleted
        "checkpoint-2", "checkpoint-4", "checkpoint-4.refused"]  # fmt: skip


def test_a_nan_feature_value_is_refused_when_the_dataset_is_built(tmp_path):
    data = write_synthetic_merr(tmp_path, num_samples=6, seed=1)
    path = data.root / "HL-UTT" / "sample_00000003.npy"
    values = np.load(path)
    values[5] = np.nan
    np.save(path, values)
    with pytest.raises(SampleError, match=rf"'sample_00000003': non-finite feature values: 1 NaN or infinite values, "
                       rf"the first at \(5,\) \({path}\)"):  # fmt: skip
        coarse_dataset(data)
    dataset = coarse_dataset(data, skip_missing=True)
    assert len(dataset.skipped) == 1 and "1 non-finite feature values" in dataset.skip_report()
    face = data.root / "mae_340_UTT" / f"{dataset.records[0].name}.npy"  # changed after the check: refused on read
    np.save(face, np.full_like(np.load(face), np.inf))
    with pytest.raises(SampleError, match="non-finite feature values"):
        dataset[(0, "emotion", 0)]


def test_a_nan_loss_stops_training_before_it_is_saved(tiny, tmp_path, monkeypatch):
    """Trainer logs a NaN loss as the running mean; the guard stops at the step itself, before backward, so the
    checkpoint before it stays the newest and intact."""
    forward, calls = EmotionLlama.forward, []

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the loss of step 2, which would be saved
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(EmotionLlama, "forward", poisoned)
    with pytest.raises(NonFiniteError, match=r"Non-finite training loss \(nan\) at step 2 .*batch sample_\d+"):
        finetune.main(run_args(tiny, tmp_path, "--save_steps", "1"))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    assert resolve_resume("True", tmp_path) == str(checkpoint(tmp_path, 1))
    assert not (tmp_path / "adapter").exists()  # no final model either


def _guard_call(hook: str, model: nn.Module, step: int) -> None:
    args = TrainingArguments(output_dir="stage", use_cpu=True, report_to=[])
    getattr(NonFiniteGuard(), hook)(args, TrainerState(global_step=step), TrainerControl(), model=model)


def test_a_nan_gradient_or_weight_stops_training():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    _guard_call("on_pre_optimizer_step", model, step=4)  # finite: nothing happens
    _guard_call("on_step_end", model, step=4)
    model[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"gradient of '1.weight' at step 5, before the optimizer step"):
        _guard_call("on_pre_optimizer_step", model, step=4)
    with torch.no_grad():
        model[0].bias[1] = float("nan")  # as DeepSpeed would leave it: stepped inside backward, gradients unseen
    with pytest.raises(NonFiniteError, match=r"weight '0.bias' after step 4, before it could be saved"):
        _guard_call("on_step_end", model, step=4)


def test_a_full_disk_while_saving_names_the_checkpoint_and_loses_nothing(tiny, tmp_path, monkeypatch):
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"Could not save checkpoint .*checkpoint-2: no space left on device\. "
                       r"What it had written was removed; nothing saved before was lost\. The newest intact "
                       r"checkpoint is .*checkpoint-1"):  # fmt: skip
        finetune.main(run_args(tiny, tmp_path, "--save_steps", "1"))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    assert resolve_resume("True", tmp_path) == str(checkpoint(tmp_path, 1))


def test_rotation_follows_the_manifest_and_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"x")
    write_manifest(tmp_path / "checkpoint-1", 1)  # intact; checkpoint-2 unfinished; checkpoint-3 just saved
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    CheckpointManifests(save_total_limit=2).on_save(args, TrainerState(global_step=3), TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / MANIFEST).is_file() and newest_intact(tmp_path) == tmp_path / "checkpoint-3"
    CheckpointManifests(save_total_limit=1).on_save(args, TrainerState(global_step=3), TrainerControl())
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_torch_write_failures_count_as_a_full_disk(tmp_path):
    partial = tmp_path / "checkpoint-3"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"PK")
    error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: basic_ios::clear")
    assert "no space left on device" in str(save_failure(partial, error)) and not partial.exists()
    assert save_failure(tmp_path / "checkpoint-9", ValueError("not a save")) is None


@pytest.mark.parametrize(
    "config, message",
    [
        ("{", r"adapter_config.json: invalid JSON: Expecting property name"),
        ('{"r": 8}', r"adapter_config.json has no 'peft_type'"),
        ('{"peft_type": "FOO"}', r"adapter_config.json: unknown peft_type 'FOO' \(known: .*LORA.*MOSE"),
        ('{"peft_type": "MOSE", "peft_type": "LORA"}', r"adapter_config.json: duplicate key 'peft_type'"),
    ],
)
def test_a_bad_adapter_config_names_the_file(killed_and_resumed, tmp_path, config, message):
    run = tmp_path / "run"
    shutil.copytree(killed_and_resumed[1], run, ignore=shutil.ignore_patterns("checkpoint-*"))
    (run / "adapter" / "adapter_config.json").write_text(config)
    with pytest.raises(ValueError, match=message):
        load_trained(run)
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json does not exist"):
        check_adapter_dir(tmp_path)


def test_latin1_bytes_name_the_file_and_line(tmp_path):
    annotation = tmp_path / "ann.txt"
    annotation.write_bytes(b"sample_1 40 happy\nsample_2 12 caf\xe9\n")
    with pytest.raises(ValueError, match=rf"{annotation}, line 2, column 16: byte 0xe9 is not valid utf-8"):
        read_annotations(annotation)
    predictions = tmp_path / "preds.jsonl"
    predictions.write_bytes(b'{"id": "a", "prediction": "happy"}\n{"id": "b", "prediction": "s\xe9d"}\n')
    with pytest.raises(ValueError, match=rf"{predictions}, line 2, column 29: byte 0xe9"):
        scoring.load_predictions(predictions)


def test_labels_of_the_wrong_length_are_refused_with_both_shapes():
    model = EmotionLlama(nn.Identity(), nn.Identity(), pad_token_id=0)  # refused before either is called
    ids = torch.zeros(2, 5, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "modality_ids": ids, "labels": ids[:, :4]}
    batch.update({k: torch.zeros(2, 1) for k in ("eva_patch", "eva_cls", "face", "video", "audio")})
    with pytest.raises(ValueError, match=r"labels have shape \(2, 4\), input_ids \(2, 5\)"):
        model.build_inputs(batch)


def test_a_missing_caption_file_is_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"Caption file {tmp_path}/MERR_coarse_grained.json does not exist"):
        finetune.open_dataset(tiny.data.coarse_txt, tmp_path, ("emotion", "reason"), skip_missing=False)


def test_duplicates_are_refused(tmp_path):
    annotation = tmp_path / "ann.txt"
    annotation.write_text("sample_1 40 happy\nsample_2 12 sad\nsample_1 40 angry\n")
    with pytest.raises(ValueError, match=r"line 3: sample 'sample_1' is listed again \(label 'angry'; first on line "
                       r"1, label 'happy'\)"):  # fmt: skip
        read_annotations(annotation)
    subtitles = tmp_path / "sub.csv"
    subtitles.write_text("name,sentence\nsample_1,hi\nsample_1,hi\n")
    assert read_subtitles(subtitles) == {"sample_1": "hi"}  # an identical repeated row is harmless
    subtitles.write_text("name,sentence\nsample_1,hi\nsample_2,yo\nsample_1,bye\n")
    with pytest.raises(ValueError, match=r"line 4: 'sample_1' has a second, different subtitle \(first on line 2\)"):
        read_subtitles(subtitles)
    captions = tmp_path / "captions.json"
    captions.write_text('{"sample_1": {"caption": "a"}, "sample_1": {"caption": "b"}}')
    with pytest.raises(ValueError, match=rf"{captions}: duplicate key 'sample_1'"):
        read_captions(captions, "caption")


def test_answers_that_fall_back_to_neutral_are_counted_and_reported(caplog):
    references = [scoring.Reference(i, label=label) for i, label in (("a", "happy"), ("b", "sad"), ("c", "neutral"))]
    predictions = {"a": "happy", "b": "I cannot tell", "c": "it is neutral"}
    result, rows = scoring.score(predictions, references, scoring.ScoringConfig("recognition"))
    assert result["fallback"] == {"label": "neutral", "count": 1}  # "neutral" said outright is no fallback
    assert [row["fallback"] for row in rows] == [False, True, False]
    scoring.warn_skipped(rows, "recognition")
    assert "1 of 3 answers name no label and are scored as 'neutral': 'b'" in caplog.text


def test_checkpoints_set_aside_are_never_listed(tmp_path):
    for name in ("checkpoint-10", "checkpoint-3", "checkpoint-3.refused", "checkpoint-3.refused-2", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
