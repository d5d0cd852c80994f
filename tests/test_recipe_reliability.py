"""Issue #27: a run never writes over another run, everything a run is loaded from is compared with what it records,
config files and inputs that would run silently wrong or crash are refused naming the file, key, line or sample."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_helpers import run_args
from mosear_recipes import evaluate_cli, finetune
from mosear_recipes.arguments import read_config_file
from mosear_recipes.emotion_llama.model import load_tokenizer
from mosear_recipes.emotion_llama.prompt import PromptEncoder
from mosear_recipes.integrity import MANIFEST
from mosear_recipes.merr.collator import MERRCollator
from mosear_recipes.run import adapter_mismatch, load_trained
from mosear_recipes.run_config import target_modules_option
from mosear_recipes.run_folder import LOCK_FILE, OutputDirError
from recipe_helpers import coarse_dataset, retrained

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished short run (checkpoint-2 and -4, final adapter, projectors, run_config)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    finetune.main(run_args(tiny, out))
    return out


@pytest.fixture
def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# --- data loss (cases 1-3) ---


def test_a_second_run_into_a_finished_run_is_refused_and_changes_nothing(tiny, copy_of):
    before = snapshot(copy_of)
    with pytest.raises(OutputDirError, match=r"already holds a run \(run_config.json, adapter.*--overwrite_output_dir"):
        finetune.main(run_args(tiny, copy_of, "--learning_rate", "1e-3"))
    assert snapshot(copy_of) == before


def test_a_run_in_progress_holds_a_lock_that_stops_a_second_run(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(OutputDirError, match=rf"in use by a run still in progress \(process {holder.pid}"):
            finetune.main(run_args(tiny, out))
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": "elsewhere"}))
        with pytest.raises(OutputDirError, match=rf"in use by process {holder.pid} on host 'elsewhere'"):
            finetune.main(run_args(tiny, out))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the refused runs was written


def test_a_stale_lock_of_a_crashed_run_is_taken_over_and_the_lock_cleared_on_exit(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    finetune.main(run_args(tiny, out, "--max_steps", "1", "--save_strategy", "no"))
    assert f"left by process {dead.pid}, which is gone" in caplog.text
    assert (out / "adapter").is_dir() and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_dir_overlapping_init_from_is_refused_before_anything_is_written(tiny, copy_of, where):
    output = {"same": copy_of, "inside": copy_of / "stage2", "containing": copy_of.parent}[where]
    before = snapshot(copy_of)
    with pytest.raises(OutputDirError, match="overlap"):
        finetune.main(run_args(tiny, output, "--stage", "fine", "--init_from", str(copy_of)))
    assert snapshot(copy_of) == before


def test_overwrite_replaces_the_run_and_its_checkpoints_so_a_resume_cannot_pick_them_up(tiny, copy_of, caplog):
    old = (copy_of / "checkpoint-4" / "projectors.safetensors").read_bytes()
    finetune.main(run_args(tiny, copy_of, "--overwrite_output_dir", "true", "--max_steps", "1", "--save_strategy", "no"))
    assert "--overwrite_output_dir: deleting the previous run" in caplog.text
    assert not list(copy_of.glob("checkpoint-*"))
    assert json.loads((copy_of / "run_config.json").read_text())["arguments"]["training"]["overwrite_output_dir"]
    with pytest.raises(ValueError, match="no intact checkpoint"):
        finetune.main(run_args(tiny, copy_of, "--resume_from_checkpoint", "--max_steps", "1", "--save_strategy", "no"))
    assert old  # the old run's checkpoint existed before


def test_resume_with_another_configuration_is_refused_naming_the_option(tiny, copy_of):
    with pytest.raises(OutputDirError, match=r"--learning_rate: 0.003 in the run, 0.001 now"):
        finetune.main(run_args(tiny, copy_of, "--learning_rate", "1e-3", "--resume_from_checkpoint"))
    with pytest.raises(OutputDirError, match=r"--quantization: 'none' in the run, '8bit' now"):
        finetune.main(run_args(tiny, copy_of, "--quantization", "8bit", "--resume_from_checkpoint"))


# --- silently wrong (cases 5, 6, 10) ---


def test_resume_sets_a_damaged_newer_checkpoint_aside_saying_why(tiny, copy_of, caplog):
    (copy_of / "checkpoint-4" / "planted.txt").write_text("not of this run")
    finetune.main(run_args(tiny, copy_of, "--resume_from_checkpoint"))
    assert "Not resuming from" in caplog.text and "planted.txt was added" in caplog.text
    assert (copy_of / "checkpoint-4.refused" / "planted.txt").is_file()
    manifest = json.loads((copy_of / "checkpoint-4" / MANIFEST).read_text())
    assert "planted.txt" not in manifest["files"]


def test_a_run_folder_with_an_adapter_of_other_options_is_refused(copy_of):
    config = json.loads((copy_of / "run_config.json").read_text())
    config["arguments"]["model"]["lora_alpha"] = 32
    (copy_of / "run_config.json").write_text(json.dumps(config))
    (copy_of / "model_manifest.json").unlink()  # with it, the edited run_config.json is refused before (test below)
    with pytest.raises(ValueError, match=r"lora_alpha: 32 in the run's options, 16 in .*adapter"):
        load_trained(copy_of)


def test_targets_left_to_mose_are_not_compared_with_what_they_resolved_to(tmp_path):
    resolved = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "MOSE", "r": 8, "target_modules": resolved}))
    for targets in ("all-linear", "ALL-LINEAR", None, ""):
        assert adapter_mismatch({"r": 8, "target_modules": targets}, tmp_path) == []
    assert adapter_mismatch({"r": 8, "target_modules": "q_proj"}, tmp_path) == [
        f"target_modules: ['q_proj'] in the run's options, {sorted(resolved)!r} in {tmp_path}"]
    assert target_modules_option(" all-linear ") == "all-linear" and target_modules_option("q_proj, v_proj") == [
        "q_proj", "v_proj"]


def test_init_from_a_run_with_other_mose_options_is_refused(tiny, finished, tmp_path):
    with pytest.raises(ValueError, match=r"--init_from .* other MoSE options than this run's: lora_alpha: 32"):
        finetune.main(run_args(tiny, tmp_path / "s2", "--init_from", str(finished), "--lora_alpha", "32"))


@pytest.mark.parametrize("part", ["projectors.safetensors", "adapter/adapter_model.safetensors", "run_config.json"])
def test_a_run_folder_holding_a_part_of_another_run_is_refused_naming_it(copy_of, tmp_path, tiny, part):
    if part == "run_config.json":
        config = json.loads((copy_of / part).read_text())
        config["arguments"]["training"]["seed"] += 1  # another run of the same options
        (copy_of / part).write_text(json.dumps(config))
    else:
        retrained(copy_of / part)
    message = rf"{copy_of} does not hold the model its run wrote.*{copy_of / part} changed"
    with pytest.raises(ValueError, match=message):
        load_trained(copy_of)
    with pytest.raises(ValueError, match=message):
        finetune.main(run_args(tiny, tmp_path / "s2", "--init_from", str(copy_of)))
    assert not (tmp_path / "s2" / "run_config.json").exists()


def test_a_checkpoint_with_replaced_weights_is_refused_and_an_edited_inference_mode_is_not(copy_of):
    config_file = copy_of / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["inference_mode"] = not config["inference_mode"]
    config_file.write_text(json.dumps(config))
    load_trained(copy_of)  # harmless field: loads
    retrained(copy_of / "checkpoint-4" / "projectors.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-4 does not hold the model.*projectors.safetensors changed"):
        load_trained(copy_of, weights_dir=copy_of / "checkpoint-4")


def test_a_run_without_its_model_manifest_loads_with_a_warning(copy_of, caplog):
    (copy_of / "model_manifest.json").unlink()
    load_trained(copy_of)
    assert "has no model_manifest.json or manifest.json: its files cannot be checked" in caplog.text


def test_another_base_model_is_refused_by_the_loaders(tiny, finished, tmp_path, caplog):
    other = tmp_path / "model"
    shutil.copytree(tiny.model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # same shapes, another model
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was trained on base model 'model'.*config_sha256 differ"):
        load_trained(finished, model_name_or_path=other)
    with pytest.raises(ValueError, match="--init_from .* was trained on base model"):
        finetune.main([*run_args(tiny, tmp_path / "s2", "--init_from", str(finished)), "--model_name_or_path",
                       str(other)])  # fmt: skip
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny.model_dir, renamed)
    load_trained(finished, model_name_or_path=renamed)  # the same model elsewhere: warned about
    assert "the same config under another name" in caplog.text


# --- config files (cases 8, 11, 12) ---


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("dup.yaml", "r: 4\nseed: 1\nr: 8\n", r"dup.yaml, line 3: duplicate key 'r' \(first given at line 1\)"),
        ("dup.json", '{"r": 4,\n "seed": 1,\n "r": 8}', r"dup.json: duplicate key 'r' \(line 3\)"),
        ("float.yaml", "iters_per_epoch: 2.5\n", r"float.yaml: iters_per_epoch: 2.5 is not a valid value \(.*invalid int"),
        ("list.yaml", "target_modules: [q_proj, v_proj]\n", r"list.yaml: target_modules: \['q_proj', 'v_proj'\] is not"),
        ("bool.yaml", "skip_missing: 3\n", r"bool.yaml: skip_missing: 3 is not a valid value"),
        ("null.yaml", "r: null\n", r"null.yaml: r: null is not a value of --r"),
        ("bad.json", "{oops", r"bad.json: invalid JSON"),
        ("bad.yaml", b"r: 4\nname: caf\xe9\n", r"bad.yaml, line 2, column 10: byte 0xe9 is not valid utf-8"),
    ],
)
def test_config_file_mistakes_are_refused_naming_file_key_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


def test_resume_from_checkpoint_true_in_yaml_resumes_the_newest(tiny, copy_of, tmp_path):
    config = tmp_path / "resume.yaml"
    config.write_text("resume_from_checkpoint: true\n")
    assert read_config_file(config) == {"resume_from_checkpoint": "true"}


def test_the_script_stops_with_a_message_and_exit_2_not_a_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("iters_per_epoch: 2.5\n")
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "merr_finetune.py"), str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"merr_finetune.py: error: Config file {config}: iters_per_epoch: 2.5" in done.stderr


# --- evaluation, collation, plots (cases 9, 13, 15) ---


@pytest.mark.parametrize("option", [["--strategies", "none,ar"], ["--tau", "0.5"], ["--batch_size", "2"]])
def test_scoring_mode_refuses_model_running_options_with_exit_2(tmp_path, capsys, option):
    predictions, references = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    predictions.write_text('{"id": "a", "prediction": "happy"}\n')
    references.write_text('{"id": "a", "label": "happy"}\n')
    with pytest.raises(SystemExit) as done:
        evaluate_cli.main(["--predictions", str(predictions), "--references", str(references), "--scoring",
                           "recognition", "--out_dir", str(tmp_path / "out"), *option])  # fmt: skip
    assert done.value.code == 2
    assert f"{option[0]} only apply to the model-running mode" in capsys.readouterr().err


def test_labels_of_another_length_than_the_input_name_the_sample(tiny, monkeypatch):
    dataset = coarse_dataset(tiny.data)
    encoder = PromptEncoder(load_tokenizer(tiny.model_dir), dataset.spec.n_patch_tokens)
    encode = encoder.encode

    def short_labels(*args, **kwargs):
        row = encode(*args, **kwargs)
        return type(row)(row.input_ids, row.labels[:-1], row.modality_ids)

    monkeypatch.setattr(encoder, "encode", short_labels)
    sample = dataset[(0, "emotion", 0)]
    with pytest.raises(ValueError, match=rf"Sample '{sample.name}' \(task emotion\): its labels have"):
        MERRCollator(encoder)([sample])


def test_plot_command_with_ragged_rows_names_the_file_without_a_traceback(tmp_path, llama):
    model_dir, batch = tmp_path / "model", tmp_path / "batch.json"
    llama.save_pretrained(model_dir)
    batch.write_text(json.dumps({"input_ids": [[3, 4, 5], [3, 4]], "modality_ids": [[0, 1, 0], [0, 1]]}))
    done = subprocess.run([sys.executable, "-m", "peft_mose.attention.plot", str(model_dir), str(batch), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{batch}: the rows of `input_ids` have different lengths [3, 2]" in done.stderr
