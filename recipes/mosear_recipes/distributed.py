"""Process-group helpers for the recipes: accelerate's state under DeepSpeed on CPU-only machines, ZeRO-3 gathering,
and the rank of a process outside ``Trainer``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import AcceleratorConfig


def needs_cpu_deepspeed_state(args: TrainingArguments) -> bool:
    """Whether DeepSpeed is asked for (``--deepspeed``, or ``accelerate launch`` with a DeepSpeed config, which sets
    ``ACCELERATE_USE_DEEPSPEED``) in a launched process (``LOCAL_RANK`` set) on a machine without any accelerator:
    there accelerate (1.15) leaves its backend unset and counts every rank as process 0 of 1."""
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return deepspeed and launched and not args.use_cpu and not torch.accelerator.is_available()


def share_cpu_deepspeed_state(args: TrainingArguments) -> None:
    """Before ``TrainingArguments`` set up their devices: initialise accelerate's shared state for DeepSpeed over gloo
    and make ``args`` reuse it (``use_configured_state``), so that on CPU-only machines ranks, world size, data
    sharding and the saving process are right. Does nothing unless :func:`needs_cpu_deepspeed_state`."""
    if not needs_cpu_deepspeed_state(args):
        return
    config = args.accelerator_config
    if config is None or isinstance(config, dict):
        config = AcceleratorConfig(**(config or {}))
    elif isinstance(config, str):
        config = AcceleratorConfig.from_json_file(config)
    config.use_configured_state = True
    args.accelerator_config = config
    # As TrainingArguments do on their own path: each new set of arguments (one per stage) starts a fresh state, so
    # that the stage's Trainer can create its Accelerator with the DeepSpeed plugin. Private API, checked on accelerate
    # 1.15.0 (tests/test_compat.py fails if it disappears or changes signature).
    AcceleratorState._reset_state(reset_partial_state=True)
    # accelerate takes the DeepSpeed branch of its set-up from this variable, as transformers sets it for a moment.
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=args.ddp_timeout))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of the ``torch.distributed`` group, ``(0, 1)`` without one: for code that also runs
    outside ``Trainer`` (evaluation scripts)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def end_process_group() -> None:
    """Destroy the ``torch.distributed`` group of a finished run, if there is one, so that its communication threads
    are joined before the interpreter exits: left to interpreter shutdown, a rank can abort ("terminate called
    without an active exception") after a run that succeeded, and the launcher then reports it failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Under ZeRO-3, gather ``params`` on every process for the duration of the block; otherwise do nothing."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
