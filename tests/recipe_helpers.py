"""Helpers of the recipe tests (their `tiny` fixture lives in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from mosear_recipes.arguments import TINY_CONFIG
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.synthetic import SyntheticMERR


def coarse_dataset(data: SyntheticMERR, **kwargs) -> MERRDataset:
    """The coarse-grained training set with the emotion and reason tasks."""
    return MERRDataset(
        data.coarse_txt, data.subtitles, tasks=("emotion", "reason"), coarse_json=data.coarse_json, **kwargs
    )


# 4 steps of batch 2, a checkpoint every 2 steps (2 kept): checkpoint-2, -4.
SHORT = ["--per_device_train_batch_size", "2", "--iters_per_epoch", "2", "--num_train_epochs",
         "2", "--warmup_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
         "--eval_annotation", "none", "--disable_tqdm", "true"]  # fmt: skip


def run_args(tiny, out: Path, *extra: str) -> list[str]:
    """The command line of a short run of the tiny config on the session's tiny setup."""
    setup = ["--tiny_setup", "false", "--model_name_or_path", str(tiny.model_dir), "--data_root", str(tiny.data.root)]
    return [str(TINY_CONFIG), "--output_dir", str(out), *setup, *SHORT, *extra]


def retrained(path: Path) -> None:
    """Replace a safetensors file by one with the same tensors, shapes and metadata but other values: the same file
    of another run of the same configuration."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) + 0.01 for k in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)
