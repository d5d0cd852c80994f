"""recipes/omni_finetune.py and omni_infer.py end to end on the tiny default: training writes a verified adapter,
checkpoints with manifests and a loss curve; a run resumes; inference answers under every strategy about clips this
test writes with PyAV (with and without an audio track); bad media are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from mosear_recipes.integrity import checkpoint_problems, checkpoints
from mosear_recipes.omni.data import ClipDataset
from mosear_recipes.omni.evaluate import main as evaluate_main
from mosear_recipes.omni.evaluation import answer
from mosear_recipes.omni.finetune import main as finetune_main
from mosear_recipes.omni.inputs import collate
from mosear_recipes.omni.infer import main as infer_main
from mosear_recipes.omni.model import load_run
from media_clips import moving_frames, tone, write_mp4
from recipe_helpers import retrained

from peft_mose import Modality

FAST = ["--num_train_epochs", "2", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("omni") / "run"
    result = finetune_main(["--output_dir", str(out), *FAST])
    return out, result


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    frames = moving_frames(16)
    return {"both": write_mp4(root / "both.mp4", frames, tone(2.0)), "silent": write_mp4(root / "silent.mp4", frames)}


def test_training_writes_a_verified_adapter_checkpoints_and_a_loss_curve(run):
    out, result = run
    assert (out / "loss.png").stat().st_size > 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "MOSE"
    saved = checkpoints(out)
    assert [c.name for c in saved] == ["checkpoint-3", "checkpoint-6"]
    assert all(checkpoint_problems(c) == [] for c in saved)
    config = json.loads((out / "run_config.json").read_text())
    assert config["format"] == "omni-1" and "no torchvision" in config["input_path"]
    assert set(result["scores"]) == {"video_aligned", "audio_aligned", "consistent", "overall"}
    assert result["num_samples"] == 9
    assert (out / "eval" / "scores.json").is_file()
    model, encoder, _ = load_run(out)
    assert sum("mose" in n for n, _ in model.named_parameters()) > 0


def test_resume_continues_from_the_newest_intact_checkpoint(run, tmp_path):
    import shutil

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-6")  # as if the run had stopped after its first epoch
    finetune_main(["--output_dir", str(copy), *FAST, "--resume_from_checkpoint"])
    state = json.loads((copy / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 7))  # steps 1-3 from checkpoint-3's state, 4-6 trained now
    assert checkpoint_problems(copy / "checkpoint-6") == []


def test_a_run_holding_another_runs_adapter_is_refused(run, tmp_path):
    import shutil

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    retrained(copy / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"does not hold the model its run wrote.*adapter_model.safetensors changed"):
        load_run(copy)


def test_a_finished_run_is_refused_without_resume_or_overwrite(run):
    out, _ = run
    with pytest.raises(ValueError, match="already holds a run"):
        finetune_main(["--output_dir", str(out), *FAST])


@pytest.mark.parametrize("strategy", ["none", "ar", "pai", "gated"])
def test_infer_answers_under_each_strategy(run, clips, strategy, capsys):
    out, _ = run
    argv = ["--run_dir", str(out), "--video", str(clips["both"]), "--strategy", strategy, "--tau", "0.5",
            "--max_new_tokens", "3", "--gate_labels", "happy,sad,angry", "--verbose"]  # fmt: skip
    text = infer_main(argv)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f"{strategy}: {text}"  # the tiny random model may answer only special tokens
    assert "32 visual tokens, 51 audio tokens (interleaved)" in printed
    assert printed.count("λ model.language_model.layers.") == 4


def test_infer_on_a_clip_without_audio(run, clips, capsys):
    out, _ = run
    infer_main(["--run_dir", str(out), "--video", str(clips["silent"]), "--max_new_tokens", "2", "--verbose"])
    assert "32 visual tokens, 0 audio tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        infer_main(["--run_dir", str(out), "--video", str(clips["silent"]), "--audio", str(clips["silent"])])
    assert "no audio stream" in capsys.readouterr().err


def test_infer_on_audio_alone(run, tmp_path, capsys):
    out, _ = run
    wav = tmp_path / "tone.wav"
    soundfile.write(wav, tone(2.0), 16000)
    text = infer_main(["--run_dir", str(out), "--audio", str(wav), "--max_new_tokens", "2", "--verbose"])
    printed = capsys.readouterr().out
    # 2 s at 25 audio tokens per second (the .mp4 clips have 51: AAC pads its last frame)
    assert "0 visual tokens, 50 audio tokens (separate)" in printed and printed.splitlines()[-1] == f"none: {text}"


def test_bad_media_are_refused_before_anything_is_written(run, clips, tmp_path):
    out, _ = run
    model = out / "tiny" / "model"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clips["both"].read_bytes()[:1500])
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    cases = {
        "missing.mp4": ("missing.mp4", None, "no such file"),
        "broken.mp4": ("broken.mp4", None, "not a readable media container"),
        "silent.mp4": (str(clips["silent"]), None, "no audio stream, and no 'audio' file"),
        "empty.wav": (str(clips["silent"]), "empty.wav", "zero-length audio"),
    }
    for name, (video, audio, problem) in cases.items():
        manifest = tmp_path / "m.jsonl"
        record = {"id": "c1", "video": video, "target": "happy", **({"audio": audio} if audio else {})}
        manifest.write_text(json.dumps(record) + "\n")
        target = tmp_path / f"run_{name}"
        with pytest.raises(ValueError, match=problem) as error:
            finetune_main(["--model_name_or_path", str(model), "--train_manifest", str(manifest),
                           "--output_dir", str(target)])  # fmt: skip
        assert "m.jsonl:1 (id 'c1')" in str(error.value)
        assert not target.exists()


def test_clips_that_cannot_share_a_batch_and_bad_evaluation_labels_are_refused_before_training(run, clips, tmp_path):
    model = run[0] / "tiny" / "model"
    rows = [{"id": "c1", "video": str(clips["both"]), "target": "happy"},
            {"id": "c2", "video": str(clips["silent"]), "target": "sad"}]  # fmt: skip
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = tmp_path / "run"
    common = ["--model_name_or_path", str(model), "--train_manifest", str(manifest), "--output_dir", str(target),
              "--audio", "optional"]  # fmt: skip
    mixed = r"train.jsonl: clips whose audio is interleaved .* \(e\.g\. 'c2'\) cannot share"
    with pytest.raises(ValueError, match=mixed):
        finetune_main([*common, "--per_device_train_batch_size", "2"])
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"id": "e1", "video": str(clips["both"]), "label": "fear"}) + "\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:1 \(id 'e1'\): label 'fear' is not in the label set"):
        finetune_main([*common, "--eval_manifest", str(evaluation)])
    assert not target.exists()


def test_evaluate_scores_a_manifest_under_each_strategy(run, tmp_path, capsys):
    out, _ = run
    manifest = out / "tiny" / "data" / "train.jsonl"
    rows = evaluate_main(["--run_dir", str(out), "--manifest", str(manifest), "--out_dir", str(tmp_path / "eval"),
                          "--strategies", "none,ar,ar+gate", "--tau", "0.5", "--labels", "happy,sad,angry,neutral",
                          "--max_new_tokens", "3"])  # fmt: skip
    assert [name for name, _ in rows] == ["MoSE", "MoSE + AR", "MoSE + AR (gated)"]
    summary = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert [entry["strategy"] for entry in summary] == ["none", "ar", "ar+gate"]
    assert all(set(entry["scores"]) == {"video_aligned", "audio_aligned", "consistent", "overall"} for entry in summary)
    assert summary[0]["reallocation"] is None and summary[1]["reallocation"]["tau"] == 0.5
    assert (tmp_path / "eval" / "ar" / "per_sample.jsonl").is_file() and (tmp_path / "eval" / "scores.png").is_file()
    assert "MoSE + AR" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate_main(["--run_dir", str(out), "--manifest", str(tmp_path / "none.jsonl"), "--out_dir", str(tmp_path)])
    assert "none.jsonl" in capsys.readouterr().err


def test_teacher_forcing_and_generation_route_with_the_same_lambda(run):
    """The target is ANSWER in the batch's modality ids, so the router pools over the prompt alone in training as at
    generation (without it the target's tokens would count as text)."""
    out, _ = run
    model, encoder, config = load_run(out)
    dataset = ClipDataset(out / "tiny" / "data" / "train.jsonl", encoder, config.media)
    clip = dataset[1]
    batch = collate([clip], encoder.tokenizer.pad_token_id)
    assert (batch["modality_ids"][0, clip.prompt_length:] == int(Modality.ANSWER)).all()
    assert (batch["labels"][0, : clip.prompt_length] == -100).all()
    with torch.no_grad():
        model(**batch)
        trained = {k: v["lambda"] for k, v in model.base_model.routing_stats().items()}
        answer(model, encoder, clip, max_new_tokens=1)
        generated = {k: v["lambda"] for k, v in model.base_model.routing_stats().items()}
    assert trained.keys() == generated.keys() and len(trained) == 4
    for layer in trained:
        torch.testing.assert_close(trained[layer], generated[layer])


def test_a_missing_model_folder_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"--model_name_or_path /nonexistent/omni: no such folder"):
        finetune_main(["--model_name_or_path", "/nonexistent/omni", "--train_manifest", str(tmp_path / "m.csv"),
                       "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_infer_reads_clips_as_a_run_without_audio_was_trained(tmp_path_factory, clips, capsys):
    out = tmp_path_factory.mktemp("omni_no_audio") / "run"
    finetune_main(["--output_dir", str(out), "--audio", "none", "--num_train_epochs", "1", "--max_steps", "1"])
    capsys.readouterr()
    infer_main(["--run_dir", str(out), "--video", str(clips["both"]), "--max_new_tokens", "2", "--verbose"])
    assert "32 visual tokens, 0 audio tokens" in capsys.readouterr().out  # the clip's audio track is left out
    with pytest.raises(SystemExit) as exit_:
        infer_main(["--run_dir", str(out), "--video", str(clips["both"]), "--audio", str(clips["both"])])
    assert exit_.value.code == 2 and "was trained with --audio none" in capsys.readouterr().err


def test_infer_refuses_an_audio_file_with_no_audio(run, clips, capsys):
    with pytest.raises(SystemExit) as exit_:
        infer_main(["--run_dir", str(run[0]), "--video", str(clips["both"]), "--audio", str(clips["both"]),
                    "--no_audio"])  # fmt: skip
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
