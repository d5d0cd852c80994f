"""recipes/merr_finetune.py: the built-in default end to end, config files and overrides, stage 2 from stage 1,
gradients, the schedules, validation, the loss curve, resume, bad arguments, and the DeepSpeed launches (one process;
two ranks under ZeRO-3 over gloo, resumed)."""

from __future__ import annotations

import json
import math
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import free_port

from peft_mose import Modality
from mosear_recipes import evaluate_cli, finetune
from mosear_recipes.arguments import TINY_CONFIG, ModelArguments, check_args, parse_finetune_args
from mosear_recipes.emotion_llama.features import FeatureSpec
from mosear_recipes.emotion_llama.model import load_tokenizer
from mosear_recipes.emotion_llama.prompt import PromptEncoder
from mosear_recipes.merr.collator import MERRCollator
from mosear_recipes.merr.synthetic import SUBSETS
from mosear_recipes.modeling import build_model, load_trained_weights, read_reference_outputs
from mosear_recipes.run import load_trained
from mosear_recipes.run_config import LOSS_CURVE, REFERENCE_FILE, RunConfig
from mosear_recipes.trainer import MoSETrainer, warmup_cosine_lr

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "merr_finetune.py"
RECORDER = ROOT / "tests" / "record_batches.py"  # the script, recording which samples each rank trains on
# A few steps: 2 epochs x 4 iterations, batch 4 (tiny default), checkpoints every 3 steps.
SHORT = ["--iters_per_epoch", "4", "--num_train_epochs", "2", "--warmup_steps", "2", "--logging_steps", "1",
         "--save_strategy", "steps", "--save_steps", "3", "--disable_tqdm", "true"]  # fmt: skip
STEPS = 8


def on_tiny(tiny, *extra: str) -> list[str]:
    """The tiny config on the session's tiny setup (written once) instead of a fresh one per run."""
    setup = ["--tiny_setup", "false", "--model_name_or_path", str(tiny.model_dir), "--data_root", str(tiny.data.root)]
    return [str(TINY_CONFIG), *setup, *extra]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The built-in default (no config file, no model) with a short schedule: ``(output_dir, evaluation result)``."""
    out = tmp_path_factory.mktemp("default_run")
    return out, finetune.main(["--output_dir", str(out), *SHORT])


@pytest.fixture(scope="module")
def stage2_run(default_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage fine started from the default run (stage coarse) with ``--init_from``, as the paper's stage 2."""
    first, _ = default_run
    out = tmp_path_factory.mktemp("stage2")
    argv = [str(TINY_CONFIG), "--tiny_setup", "false", "--model_name_or_path", str(first / "tiny" / "model"),
            "--data_root", str(first / "tiny" / "data"), "--stage", "fine", "--learning_rate", "1e-3",
            "--init_from", str(first), "--output_dir", str(out), *SHORT, "--eval_annotation", "none"]  # fmt: skip
    finetune.main(argv)
    return out


def test_default_run_writes_adapter_projectors_config_curve_and_table(default_run):
    out, result = default_run
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MOSE" and adapter_config["r"] == 8
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".mose_" in key for key in adapter)
    projectors = load_file(str(out / "projectors.safetensors"))
    assert sorted(projectors) == sorted(f"{p}.{w}" for p in ("eva_patch", "eva_cls", "face", "video", "audio")
                                        for w in ("weight", "bias"))  # fmt: skip

    config = RunConfig.read(out)
    assert config.config_file == str(TINY_CONFIG)
    stage = config.stage
    assert (stage.name, stage.learning_rate, stage.tasks) == ("coarse", 3e-3, ("emotion", "reason"))
    assert config.arguments["training"]["weight_decay"] == 0.05 and config.arguments["schedule"]["iters_per_epoch"] == 4
    assert config.arguments["data"]["val_size"] == 30 and config.environment["torch"] == torch.__version__
    assert Path(config.model_name_or_path) == out / "tiny" / "model"
    assert (out / LOSS_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert list(result["scores"]) == [*SUBSETS, "overall"]
    assert [result["scores"][s]["num_samples"] for s in (*SUBSETS, "overall")] == [20, 20, 20, 60]
    assert all(0 <= result["scores"][s]["accuracy"] <= 1 for s in result["scores"])
    saved = json.loads((out / "eval" / "scores.json").read_text())
    assert saved["scores"] == result["scores"]
    table = (out / "eval" / "scores.md").read_text()
    assert "| Video-Aligned Acc. |" in table and table.count("\n") == 3
    rows = [json.loads(line) for line in (out / "eval" / "per_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and all(isinstance(r["prediction"], str) for r in rows)


def test_validation_split_is_evaluated_every_epoch(default_run):
    out, _ = default_run
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    evaluated = [(e["epoch"], e["eval_loss"]) for e in history if "eval_loss" in e]
    # epoch 1's evaluation; epoch 2's runs at the end of the epoch, after step 8's checkpoint was saved
    assert [epoch for epoch, _ in evaluated] == [1.0] and all(math.isfinite(loss) for _, loss in evaluated)
    assert [e["step"] for e in history if "loss" in e] == list(range(1, STEPS + 1))


def test_checkpoints_hold_only_what_trains(default_run):
    out, _ = default_run
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [c.name for c in checkpoints] == ["checkpoint-6", "checkpoint-8"]  # every 3 steps and the last; 2 kept
    files = {p.name for p in checkpoints[-1].iterdir()}
    assert {"adapter", "projectors.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}


def test_reload_reproduces_the_trained_model_bit_identically(default_run):
    out, _ = default_run
    trained = load_trained(out)
    batch, logits = read_reference_outputs(out / REFERENCE_FILE)
    assert logits.shape[:2] == batch["input_ids"].shape
    with torch.no_grad():
        assert torch.equal(trained.model(**batch).logits, logits)
    checkpoint = load_trained(out, weights_dir=out / "checkpoint-6")  # a checkpoint loads too, and differs
    with torch.no_grad():
        assert not torch.allclose(checkpoint.model(**batch).logits, logits)


def test_stage2_starts_from_stage1_and_reloads(default_run, stage2_run):
    first, _ = default_run
    config = RunConfig.read(stage2_run)
    assert (config.stage.name, config.stage.tasks, config.init_from) == ("fine", ("emotion", "reason_v2"), str(first))
    batch, logits = read_reference_outputs(stage2_run / REFERENCE_FILE)
    with torch.no_grad():
        assert torch.equal(load_trained(stage2_run).model(**batch).logits, logits)
        assert not torch.allclose(load_trained(first).model(**batch).logits, logits)
    assert json.loads((stage2_run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["global_step"] == STEPS


def test_schedule_and_weight_decay_groups(default_run):
    out, _ = default_run
    checkpoint = out / "checkpoint-6"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    logged = [e["learning_rate"] for e in history if "learning_rate" in e]
    expected = [warmup_cosine_lr(step, 3e-3, 1e-6, 2, 1e-4, 4, 2) for step in range(6)]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert expected[:3] == pytest.approx([1e-6, 1e-6 + (3e-3 - 1e-6) / 2, 3e-3])  # warm-up from 1e-6
    groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    trained = load_trained(out)
    shapes = [p.shape for n, p in trained.model.named_parameters() if ".mose_" in n or n.startswith("projectors.")]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in groups] == [sum(len(s) >= 2 for s in shapes), sum(len(s) < 2 for s in shapes)]


def test_trainer_schedule_learning_rate_and_step_evaluation(tiny, tmp_path):
    """``--lr_schedule trainer`` hands the schedule to Trainer (``--lr_scheduler_type``), ``--learning_rate`` is the
    peak, and ``--eval_strategy steps`` evaluates the ``--val_size`` split every ``--eval_steps``."""
    argv = on_tiny(tiny, "--output_dir", str(tmp_path), "--iters_per_epoch", "4", "--num_train_epochs", "1",
                   "--lr_schedule", "trainer", "--lr_scheduler_type", "constant", "--learning_rate", "2e-3",
                   "--warmup_steps", "0", "--logging_steps", "1", "--val_size", "0.1", "--eval_strategy", "steps",
                   "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "4", "--eval_annotation", "none",
                   "--disable_tqdm", "true")  # fmt: skip
    finetune.main(argv)
    assert RunConfig.read(tmp_path).stage.learning_rate == 2e-3
    history = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["learning_rate"] for e in history if "learning_rate" in e] == [2e-3] * 4
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert (tmp_path / LOSS_CURVE).is_file()


def test_config_file_then_command_line_overrides(tmp_path):
    config = parse_finetune_args([str(TINY_CONFIG), "--r", "4", "--output_dir", str(tmp_path)])
    assert config.config_file == TINY_CONFIG and config.model.r == 4 and config.training.learning_rate == 3e-3
    assert parse_finetune_args(["--output_dir", str(tmp_path)]).config_file == TINY_CONFIG  # the bare default
    (tmp_path / "run.json").write_text(json.dumps({"tiny_setup": True, "r": 2, "num_train_epochs": 1}))
    config = parse_finetune_args([str(tmp_path / "run.json"), "--num_train_epochs", "2"])  # HF's args.json convention
    assert (config.model.r, config.training.num_train_epochs, config.config_file) == (2, 2, tmp_path / "run.json")
    paper = parse_finetune_args([str(ROOT / "recipes" / "configs" / "merr_stage2.yaml"), "--model_name_or_path", "m",
                                 "--data_root", "d", "--deepspeed", "", "--bf16", "false"])  # fmt: skip
    assert (paper.data.stage, paper.training.learning_rate, paper.model.r) == ("fine", 1e-5, 64)
    (tmp_path / "bad.yaml").write_text("rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown options \['rank'\]"):
        parse_finetune_args([str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--model_name', 'x'\]"):
        parse_finetune_args(["--model_name", "x"])  # no abbreviations: --model_name is not --model_name_or_path


def test_help_lists_the_recipe_options_first_with_their_defaults(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    groups = [text.index(f"\n{name}:") for name in ("model", "data", "schedule", "Trainer (TrainingArguments)")]
    assert groups == sorted(groups)
    assert "--r R " in text and "(default: 8)" in text  # the tiny config's values are the defaults shown


def test_warmup_cosine_lr_follows_emotion_llama():
    """Linear warm-up within epoch 0, then one cosine value per epoch (LAVIS's linear_warmup_cosine_lr)."""

    def lr(step: int) -> float:
        return warmup_cosine_lr(step, 2e-5, 1e-6, 1000, 1e-6, 1000, 30)

    assert lr(0) == 1e-6 and lr(500) == pytest.approx((1e-6 + 2e-5) / 2) and lr(999) < 2e-5
    assert lr(1000) == pytest.approx(1e-6 + 19e-6 * 0.5 * (1 + math.cos(math.pi / 30)))
    assert lr(1000) == lr(1999) and lr(15000) == pytest.approx(1e-6 + 19e-6 / 2)
    assert lr(29999) > 1e-6 and all(lr(e * 1000) > lr((e + 1) * 1000) for e in range(1, 29))
    assert warmup_cosine_lr(7, 2e-5, 1e-6, 5, 1e-6, 100, 3) == 2e-5  # warm-up over, rest of epoch 0


def test_projector_and_adapter_parameters_get_gradients(tiny):  # noqa: F811
    spec = FeatureSpec.from_dir(tiny.data.root)
    tokenizer = load_tokenizer(tiny.model_dir)
    model_args = ModelArguments(model_name_or_path=str(tiny.model_dir), r=4, lora_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(model_args, tiny.model_dir, spec, tokenizer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mose_" in n or n.startswith("projectors.") for n in trainable)
    assert {n.split(".")[1] for n in trainable if n.startswith("projectors.")} == {
        "eva_patch", "eva_cls", "face", "video", "audio"
    }  # fmt: skip
    assert {n.split(".mose_")[1].split(".")[0] for n in trainable if ".mose_" in n} >= {"A", "B", "gate", "router"}
    dataset = finetune.open_dataset(tiny.data.coarse_txt, tiny.data.root, ("emotion", "reason"), skip_missing=False)
    collate = MERRCollator(PromptEncoder(tokenizer, spec.n_patch_tokens))
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for step in range(3):  # B starts at zero and the router's output layer too: A and f get gradients from step 2
        optimizer.zero_grad()
        model(**collate([dataset[(i, ("emotion", "reason")[i % 2], 0)] for i in range(step, step + 2)])).loss.backward()
        if step < 2:
            optimizer.step()
    no_grad = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad


def test_audio_repeat_reaches_training_and_reloading(tiny, tmp_path):
    argv = on_tiny(tiny, "--stage", "fine", "--iters_per_epoch", "2", "--num_train_epochs", "1", "--warmup_steps",
                   "1", "--save_strategy", "no", "--eval_annotation", "none", "--eval_strategy", "no", "--val_size",
                   "0", "--audio_repeat", "5", "--output_dir", str(tmp_path))  # fmt: skip
    finetune.main(argv)
    batch, logits = read_reference_outputs(tmp_path / REFERENCE_FILE)
    assert ((batch["modality_ids"] == Modality.AUDIO).sum(dim=1) == 5).all()
    assert ((batch["modality_ids"] == Modality.VISUAL).sum(dim=1) == 259).all()
    trained = load_trained(tmp_path)
    assert trained.encoder.audio_repeat == 5 and trained.run_config.audio_repeat == 5
    with torch.no_grad():
        assert torch.equal(trained.model(**batch).logits, logits)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr_scheduler_type", "cosine"], "add --lr_schedule trainer"),
        (["--model_name_or_path", "llama", "--tiny_setup", "false"], "--data_root together"),
        (["--model_name_or_path", "llama", "--data_root", "merr"], "--tiny_setup writes its own"),
        (["--projector_checkpoint", "a.pth", "--init_from", "run"], "not both"),
        (["--iters_per_epoch", "10", "--warmup_steps", "11"], "first epoch"),
        (["--iters_per_epoch", "0"], "--iters_per_epoch must be >= 1"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--audio_repeat", "0"], "--audio_repeat must be >= 1"),
        (["--stage", "both"], "--stage must be one of"),
        (["--val_size", "0", "--eval_strategy", "steps"], "give --val_size"),
        (["--val_size", "2.5"], "--val_size must be a fraction"),
        (["--remove_unused_columns", "true"], "must stay false"),
        (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0.1 is not supported"),
        (["--load_best_model_at_end", "true", "--eval_strategy", "epoch", "--save_strategy", "epoch", "--val_size",
          "0.2"], "--load_best_model_at_end is not supported"),
        (["--max_steps", "100000"], "--max_steps 100000 goes past the emotion_llama schedule's"),
    ],
)
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        check_args(parse_finetune_args([str(TINY_CONFIG), "--output_dir", "unused", *argv]))


def test_bad_tasks_validation_sizes_and_resume_paths_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="known tasks"):
        finetune.main(on_tiny(tiny, "--tasks", "emotion,sing", "--output_dir", str(tmp_path)))
    with pytest.raises(ValueError, match="validation and training both need at least one"):
        finetune.main(on_tiny(tiny, "--val_size", "5000", "--output_dir", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        load_trained_weights(None, tmp_path)
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "run_config.json").write_text(json.dumps({"stages": []}))
        RunConfig.read(tmp_path)


def test_resume_ends_in_the_state_of_the_uninterrupted_run(default_run, tmp_path, monkeypatch):
    """Interrupted after 3 steps (``--max_steps 3``), resumed from checkpoint-3: the final model equals the
    uninterrupted default run's, and the resumed run trains only the remaining steps."""
    uninterrupted, _ = default_run
    common = ["--output_dir", str(tmp_path), *SHORT, "--eval_annotation", "none"]
    finetune.main([*common, "--max_steps", "3"])
    steps = []
    training_step = MoSETrainer.training_step

    def counted_training_step(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(MoSETrainer, "training_step", counted_training_step)
    finetune.main([*common, "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")])
    assert steps == list(range(3, STEPS))
    for path in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        resumed, reference = load_file(str(tmp_path / path)), load_file(str(uninterrupted / path))
        assert resumed.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=f"{path}: {key}")


# --- DeepSpeed launches (subprocesses on CPU) ---


def run_deepspeed(
    launcher_args: list[str], script_args: list[str], extensions_dir: str, script: Path = SCRIPT, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``script`` under the ``deepspeed`` launcher on CPU with its own port (``check``: it must succeed);
    afterwards remove the shared-memory all-reduce buffers the run left in ``/dev/shm`` (they carry the port in their
    name)."""
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions_dir}
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [deepspeed, *launcher_args, "--master_port", str(port), str(script), *script_args]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _assert_reload_matches(out: Path, atol: float) -> None:
    trained = load_trained(out)
    batch, logits = read_reference_outputs(out / REFERENCE_FILE)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(**batch).logits, logits, rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "zero2.json"])
def test_deepspeed_launcher_one_process(tmp_path, extensions_dir, config):
    """``deepspeed recipes/merr_finetune.py``: the default in one CPU process, as is and under the shipped ZeRO-2."""
    with_config = ["--deepspeed", str(ROOT / "recipes" / "configs" / config)] if config else []
    run_deepspeed([], ["--output_dir", str(tmp_path), *SHORT, *with_config], extensions_dir)
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]["overall"]["num_samples"] == 60
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert (checkpoint / f"global_step{STEPS}").is_dir() == bool(config)  # DeepSpeed's engine state
    _assert_reload_matches(tmp_path, atol=1e-5)  # the subprocess ran with one thread, this one may use more
    if config:  # DeepSpeed unpickles its engine state (weights_only=False): the manifest refuses a planted file first
        planted = checkpoint / f"global_step{STEPS}" / "mp_rank_00_model_states.pt"
        planted.write_bytes(pickle.dumps(_Planted(tmp_path / "unpickled")))
        resume = ["--output_dir", str(tmp_path), *SHORT, *with_config, "--resume_from_checkpoint", str(checkpoint)]
        done = run_deepspeed([], resume, extensions_dir, check=False)
        assert done.returncode != 0 and "Refusing to resume" in done.stderr and f"{planted} changed" in done.stderr
        assert not (tmp_path / "unpickled").exists()


class _Planted:
    """Creates ``marker`` when unpickled: what a file planted in a checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _recorded_batches(out: Path, world: int) -> dict[tuple[str, int], list[tuple[str, list[str]]]]:
    """``{(stage, step): [(task, names) of rank 0, of rank 1, ...]}`` from ``tests/record_batches.py``'s files."""
    steps: dict[tuple[str, int], list[tuple[str, list[str]]]] = {}
    for rank in range(world):
        for stage, step, task, names in json.loads((out / f"batches_rank{rank}.json").read_text()):
            steps.setdefault((stage, step), []).append((task, names))
    return steps


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks_shard_save_and_resume(tmp_path, extensions_dir):
    """Two ranks over gloo under ZeRO-3, every parameter partitioned: the ranks train on different batches, the
    gathered save has the real shapes and reloads to the trained model's outputs, and a run resumed from DeepSpeed's
    checkpoint inside epoch 1 trains on the same batches as the uninterrupted run and ends with its weights."""
    config = json.loads((ROOT / "recipes" / "configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # else the tiny model is not partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    script_args = ["--deepspeed", str(tmp_path / "zero3.json"), *SHORT]
    run_deepspeed(["--num_accelerators", "2"], [*script_args, "--output_dir", str(out)], extensions_dir, RECORDER)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["arguments"]["training"]["deepspeed"] == str(tmp_path / "zero3.json")
    assert run_config["world_size"] == 2
    batches = _recorded_batches(out, world=2)
    assert sorted(batches) == [("run", step) for step in range(STEPS)]
    for (_, step), ranks in batches.items():
        assert ranks[0] != ranks[1], f"both ranks trained on the same batch at step {step}"
    for epoch in range(2):  # each epoch: 4 steps x 2 ranks = the sampler's 8 batches, each once
        names = [tuple(n) for step in range(4 * epoch, 4 * epoch + 4) for _, n in batches[("run", step)]]
        assert len(set(names)) == len(names)

    reference = load_trained(out).model  # shapes of a model built from the base and the adapter config
    expected = {k: v.shape for k, v in get_peft_model_state_dict(reference.llm).items()}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in adapter.items()} == expected
    assert all(v.numel() > 0 for v in adapter.values())
    projectors = load_file(str(out / "projectors.safetensors"))
    expected = {k: v.shape for k, v in reference.projectors.state_dict().items()}
    assert {k: v.shape for k, v in projectors.items()} == expected
    assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if k.endswith("mose_B"))  # trained, not the init
    _assert_reload_matches(out, atol=1e-5)

    resumed = tmp_path / "resumed"
    # the run's own outputs only: a checkpoint with a file left out would be refused on resume
    outputs = shutil.ignore_patterns("adapter", "*.safetensors", "batches_rank*", "eval")
    shutil.copytree(out, resumed, ignore=lambda folder, names: outputs(folder, names) if Path(folder) == out else set())
    checkpoint = resumed / "checkpoint-6"  # step 6 of 8: epoch 1, after 2 of its 4 steps
    assert (checkpoint / "global_step6").is_dir()  # DeepSpeed's engine state, which the resumed run loads
    resume_args = [*script_args, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)]
    run_deepspeed(["--num_accelerators", "2"], [*resume_args, "--eval_annotation", "none"], extensions_dir, RECORDER)
    resumed_batches = _recorded_batches(resumed, world=2)
    assert resumed_batches == {("resumed", step): batches[("run", step)] for step in (6, 7)}
    for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        got, want = load_file(str(resumed / name)), load_file(str(out / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_evaluate_runs_the_trained_model_with_and_without_attention_reallocation(default_run, tmp_path):

    out, trained_result = default_run
    eval_dir = tmp_path / "eval"
    assert evaluate_cli.main(["--scoring", "recognition", "--run_dir", str(out), "--out_dir", str(eval_dir),
                          "--strategies", "none,ar,pai", "--tau", "0", "--max_new_tokens", "3"]) == 0
    table = (eval_dir / "scores.md").read_text()
    assert all(name in table for name in ("| MoSE |", "| MoSE + AR |", "| MoSE + PAI |"))
    assert (eval_dir / "scores.png").stat().st_size > 0
    plain = json.loads((eval_dir / "none" / "scores.json").read_text())
    assert plain["scores"] == trained_result["scores"]  # the same model and prompts as the training run's evaluation
    ids = {json.loads(line)["id"] for line in (eval_dir / "predictions_ar.jsonl").read_text().splitlines()}
    assert ids == {json.loads(line)["id"] for line in (eval_dir / "predictions_none.jsonl").read_text().splitlines()}


def test_evaluate_generates_and_scores_reasoning_with_a_trained_run(default_run, tmp_path):

    out, _ = default_run
    eval_dir = tmp_path / "eval"
    assert evaluate_cli.main(["--scoring", "reasoning", "--run_dir", str(out), "--out_dir", str(eval_dir),
                              "--name", "MoSEAR",
                          "--strategies", "none,ar", "--tau", "0", "--max_new_tokens", "8"]) == 0  # fmt: skip
    summary = json.loads((eval_dir / "scores.json").read_text())
    assert [row["name"] for row in summary] == ["MoSEAR", "MoSEAR + AR"]
    for row in summary:  # set-level scores per CA-MER subset, on the 60 test samples of the tiny default
        assert row["scoring"] == "reasoning" and list(row["scores"]) == [*SUBSETS, "overall"]
        assert [row["scores"][s]["num_samples"] for s in (*SUBSETS, "overall")] == [20, 20, 20, 60]
        assert set(row["scores"]["overall"]) >= {"accuracy", "recall", "average"}
    references = [json.loads(line) for line in (eval_dir / "references.jsonl").read_text().splitlines()]
    assert all(r["reference"].startswith("In the video the person looks") for r in references)  # fine captions
    for strategy in ("none", "ar"):
        lines = (eval_dir / f"predictions_{strategy}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in references]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "none,foo"], "Unknown strategies"),
        (["--projector_checkpoint", "x.pth"], "--projector_checkpoint go with --model_name_or_path"),
    ],
)
def test_evaluate_model_mode_rejects_bad_options(default_run, tmp_path, capsys, argv, message):

    out, _ = default_run
    base = ["--scoring", "recognition", "--run_dir", str(out), "--out_dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit):
        evaluate_cli.main(base + argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_evaluate_gated_ar_reports_the_trade_off_and_leaves_ungated_answers_alone(default_run, tmp_path):
    out, _ = default_run
    eval_dir = tmp_path / "eval"
    assert evaluate_cli.main(["--scoring", "recognition", "--run_dir", str(out), "--out_dir", str(eval_dir),
                              "--strategies", "none,ar,ar+gate", "--tau", "0", "--gate_threshold", "0.001",
                              "--max_new_tokens", "3"]) == 0  # fmt: skip
    read = lambda name: [json.loads(line) for line in (eval_dir / name).read_text().splitlines()]  # noqa: E731
    plain, gated = read("predictions_none.jsonl"), read("predictions_ar+gate.jsonl")
    assert all("gated" in r for r in gated) and all("gated" not in r for r in plain)
    assert 0 < sum(r["gated"] for r in gated) < len(gated)  # both kinds occur, so both checks below bite
    for before, after in zip(plain, gated):  # a sample the gate leaves alone is answered exactly as without AR
        assert after["gated"] or after["prediction"] == before["prediction"], after["id"]
    subsets = {json.loads(line)["id"]: json.loads(line)["subset"]
               for line in (eval_dir / "references.jsonl").read_text().splitlines()}  # fmt: skip
    summary = {row["strategy"]: row for row in json.loads((eval_dir / "scores.json").read_text())}
    report = summary["ar+gate"]["trade_off"]
    for subset in SUBSETS:
        members = [r for r in gated if subsets[r["id"]] == subset]
        assert report["gated_fraction"][subset] == pytest.approx(sum(r["gated"] for r in members) / len(members))
        changed = sum(a["prediction"] != b["prediction"] for a, b in zip(gated, plain) if subsets[a["id"]] == subset)
        assert report["changed_vs_none"][subset] == changed
    assert set(report["detector"]) == {"precision", "recall"} and "gated_fraction" not in summary["ar"]["trade_off"]
    assert "| MoSE + AR (gated) |" in (eval_dir / "scores.md").read_text()
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--scoring", "recognition", "--run_dir", str(out), "--out_dir", str(tmp_path / "bad"),
                           "--strategies", "ar+gate", "--gate_threshold", "2"])  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_data_seed_seeds_the_batch_sampler(tiny, tmp_path, monkeypatch):
    seeds = []
    sampler = finetune.SingleTaskBatchSampler

    def recording(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return sampler(*args, **kwargs)

    monkeypatch.setattr(finetune, "SingleTaskBatchSampler", recording)
    quick = ["--max_steps", "1", "--val_size", "0", "--eval_strategy", "no", "--save_strategy", "no",
             "--eval_annotation", "none"]  # fmt: skip
    finetune.main(on_tiny(tiny, "--output_dir", str(tmp_path / "a"), *quick, "--seed", "3"))
    finetune.main(on_tiny(tiny, "--output_dir", str(tmp_path / "b"), *quick, "--seed", "3", "--data_seed", "7"))
    assert seeds == [3, 7]
