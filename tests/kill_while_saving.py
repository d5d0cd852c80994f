"""Run ``recipes/merr_finetune.py`` and SIGKILL this process while it saves ``checkpoint-<KILL_AT_CHECKPOINT>``: after
the adapter and projectors, before the optimizer, scheduler and RNG state, as a crash or the OOM killer would."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mosear_recipes import finetune, trainer

KILL_AT = f"checkpoint-{os.environ['KILL_AT_CHECKPOINT']}"
save_projectors = trainer.save_projectors


def save_then_die(projectors, path):
    saved = save_projectors(projectors, path)
    if Path(path).parent.name == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return saved


trainer.save_projectors = save_then_die
finetune.main()
