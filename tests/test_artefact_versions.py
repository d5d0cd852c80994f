"""The artefacts of the recipes record the environment they were produced in (peft_mose/_versions.py)."""

from __future__ import annotations

import json

import torch

from peft_mose._versions import environment
from mosear_recipes import finetune
from mosear_recipes.arguments import TINY_CONFIG
from mosear_recipes.run_config import RunConfig
from test_evaluate_cli import REASONING_PREDS, REASONING_REFS, run

# The training recipe's smallest run on the shared tiny setup: one step of one stage, a 1-token evaluation.
ONE_STEP = ["--iters_per_epoch", "1", "--num_train_epochs", "1", "--warmup_steps", "0",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--eval_max_new_tokens", "1",
            "--disable_tqdm", "true", "--report_to", "none", "--val_size", "0", "--eval_strategy", "no"]  # fmt: skip


def assert_environment(recorded: dict) -> None:
    """``recorded`` is this process's environment: the installed torch and the checkout's commit."""
    assert recorded == environment() and recorded["torch"] == torch.__version__


def test_scores_json_records_the_environment(tmp_path):
    assert_environment(run(tmp_path, REASONING_PREDS, REASONING_REFS)["environment"])


def test_run_config_and_evaluation_record_the_environment(tiny, tmp_path):
    args = [str(TINY_CONFIG), "--tiny_setup", "false", "--model_name_or_path", str(tiny.model_dir), "--data_root",
            str(tiny.data.root), "--output_dir",
            str(tmp_path), *ONE_STEP]  # fmt: skip
    finetune.main(args)
    assert_environment(RunConfig.read(tmp_path).environment)
    assert_environment(json.loads((tmp_path / "eval" / "scores.json").read_text())["environment"])
