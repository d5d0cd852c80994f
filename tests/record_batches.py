"""Run ``recipes/merr_finetune.py`` and record which samples every training step of this process saw, for the
launcher tests: ``<output_dir>/batches_rank<R>.json`` holds ``[[run folder name, global step, task, [names]], ...]``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mosear_recipes import finetune
from mosear_recipes.arguments import parse_finetune_args
from mosear_recipes.trainer import MoSETrainer

seen: list[list[object]] = []
training_step = MoSETrainer.training_step


def recording_step(self, model, inputs, *args, **kwargs):
    seen.append([Path(self.args.output_dir).name, self.state.global_step, inputs["tasks"][0], list(inputs["names"])])
    return training_step(self, model, inputs, *args, **kwargs)


MoSETrainer.training_step = recording_step
config = parse_finetune_args()  # (parsing has no side effects) for the output folder
finetune.main()  # the script's entry point, which ends the run's process group
assert not torch.distributed.is_initialized(), "the script left its process group to interpreter shutdown"
(Path(config.training.output_dir) / f"batches_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
