"""Run ``recipes/merr_finetune.py`` and record which samples every training step of this process saw, for the
launcher tests: ``<output_dir>/batches_rank<R>.json`` holds ``[[stage, global step, task, [names]], ...]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import merr_finetune as finetune  # noqa: E402
from recipes.distributed import process_rank  # noqa: E402

seen: list[list[object]] = []
training_step = finetune.MoSETrainer.training_step


def recording_step(self, model, inputs, *args, **kwargs):
    stage = Path(self.args.output_dir).name
    seen.append([stage, self.state.global_step, inputs["tasks"][0], list(inputs["names"])])
    return training_step(self, model, inputs, *args, **kwargs)


finetune.MoSETrainer.training_step = recording_step
args = finetune.parse_args()[2]
finetune.main()
rank = process_rank()[0]
(Path(args.output_dir) / f"batches_rank{rank}.json").write_text(json.dumps(seen))
