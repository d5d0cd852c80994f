"""Claiming a run's output folder: never write over another run. A folder that holds a run (finished, in progress or
interrupted) is refused unless the run resumes it (with the same configuration) or replaces it; a lock file (holder
pid and host) keeps out a concurrent run; ``--init_from`` may not share the folder. docs/recipes.md, "Outputs"."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .integrity import checkpoints, set_aside_damaged
from .manifests import MODEL_MANIFEST
from .run_config import ADAPTER_DIR, EVAL_DIR, LOSS_CURVE, PROJECTORS_FILE, REFERENCE_FILE, RUN_CONFIG, RunConfig

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUN_FILES = (RUN_CONFIG, ADAPTER_DIR, PROJECTORS_FILE, REFERENCE_FILE, MODEL_MANIFEST, LOSS_CURVE, EVAL_DIR)
# The arguments a resumed run must share with the run it resumes, by group: those that change what it trains (paths,
# --max_steps, the end-of-run evaluation and the logging options may differ: a moved run folder resumes).
RESUME_ARGUMENTS = {
    "model": ("merge_checkpoint_lora", "quantization", "r", "n_experts", "eps", "lora_alpha", "lora_dropout",
              "router_hidden_size", "expert_kind", "router", "target_modules"),
    "data": ("tiny_setup", "stage", "tasks", "annotation", "skip_missing", "audio_repeat", "val_size",
             "val_annotation", "labels"),
    "schedule": ("lr_schedule", "warmup_start_lr", "min_lr", "iters_per_epoch"),
    "training": ("learning_rate", "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "optim", "lr_scheduler_type", "lr_scheduler_kwargs", "bf16", "fp16",
                 "save_strategy", "save_steps"),
}  # fmt: skip


class OutputDirError(ValueError):
    """An output folder this run may not write to, with what to do instead."""


def check_init_from(output_dir: Path, init_from: str | None) -> None:
    """Refuse an output folder equal to, inside or containing the ``--init_from`` run: saving and checkpoint rotation
    would overwrite or delete what the run starts from."""
    if not init_from:
        return
    source = Path(init_from).resolve()
    if output_dir == source or source in output_dir.parents or output_dir in source.parents:
        raise OutputDirError(
            f"--output_dir {output_dir} and --init_from {source} overlap (equal, or one inside the other): this run "
            "would overwrite what it starts from. Give the new run a folder of its own."
        )


def run_contents(output_dir: Path) -> list[str]:
    """What of a run (its files, its checkpoints) ``output_dir`` holds; empty for a new or empty folder."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    return found + [c.name for c in checkpoints(output_dir)] if output_dir.is_dir() else []


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless this run resumes it (``--resume_from_checkpoint``) or replaces it
    (``--overwrite_output_dir``)."""
    if resume and overwrite:
        raise OutputDirError(
            "Give --resume_from_checkpoint (continue the run) or --overwrite_output_dir (delete it), not both."
        )
    held = run_contents(output_dir)
    if held and not resume and not overwrite:
        raise OutputDirError(
            f"--output_dir {output_dir} already holds a run ({', '.join(held[:6])}{', ...' if len(held) > 6 else ''})"
            ": nothing was written. Give another --output_dir, continue that run with --resume_from_checkpoint "
            "(same configuration), or replace it with --overwrite_output_dir true (its files and checkpoints are "
            "deleted)."
        )


def clear_previous_run(output_dir: Path) -> None:
    """``--overwrite_output_dir``: delete the previous run's files and checkpoints, saying so, so that no later resume
    or reload can pick them up."""
    held = run_contents(output_dir)
    if not held:
        return
    logger.warning("--overwrite_output_dir: deleting the previous run in %s: %s.", output_dir, ", ".join(held))
    for name in held:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class WritesItself(Protocol):
    """A recipe's run configuration (:class:`RunConfig`, the omni recipe's ``OmniRunConfig``)."""

    def write(self, directory: str | Path) -> Path: ...


def start_run(output_dir: Path, run_config: WritesItself, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Once the folder is claimed and the inputs checked, on the main process: remove the run being replaced
    (``--overwrite_output_dir``), set aside the damaged checkpoints newer than the one resumed, write ``run_config``."""
    if not is_main:
        return
    if overwrite:
        clear_previous_run(output_dir)
    if resume:
        set_aside_damaged(output_dir, resume)
    run_config.write(output_dir)


def check_resume_agrees(
    stored: RunConfig, new: RunConfig, path: Path, compared: tuple[str, ...] = ("base_model", "feature_spec"),
    resume_arguments: dict[str, tuple[str, ...]] = RESUME_ARGUMENTS,
) -> None:  # fmt: skip
    """Refuse resuming a run whose recorded configuration (``path``) differs from this one's, naming the first
    differences with both values: the fields ``compared`` and the arguments ``resume_arguments`` (by group;
    merr_finetune.py's by default; the omni recipe passes its own run configuration and arguments)."""
    differences = [(name, getattr(stored, name), getattr(new, name)) for name in compared
                   if getattr(stored, name) != getattr(new, name)]  # fmt: skip
    for group, keys in resume_arguments.items():
        for key in keys:
            before, now = stored.arguments.get(group, {}).get(key), new.arguments.get(group, {}).get(key)
            if before != now:
                differences.append((f"--{key}", before, now))
    if differences:
        listed = "; ".join(f"{name}: {before!r} in the run, {now!r} now" for name, before, now in differences[:5])
        raise OutputDirError(
            f"Refusing to resume the run in {path.parent}: this run's configuration differs from {path}: {listed}. "
            "Resume with the same options, or start a new run in another --output_dir."
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The lock's ``{"pid", "host"}``, or ``None`` when it cannot be read."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _take(lock: Path, me: dict) -> bool:
    """Create the lock file holding ``me``; ``False`` when it exists."""
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(me, handle)
    return True


@contextmanager
def output_lock(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``output_dir/run.lock`` (pid and host) for the block, removed on exit. Another live holder stops this run
    naming it; a holder that died on this host (a crash) is taken over with a warning; one on another host is refused
    (this host cannot tell whether it still runs)."""
    if not enabled:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while not _take(lock, me):
        holder = _holder(lock)
        if holder is None:
            raise OutputDirError(f"{lock} exists but cannot be read: if no run uses {output_dir}, delete it.")
        if holder.get("host") != me["host"]:
            raise OutputDirError(
                f"{output_dir} is in use by process {holder['pid']} on host {holder.get('host')!r} ({lock}). If that "
                "run has stopped, delete the lock file; else give another --output_dir."
            )
        if _alive(holder["pid"]):
            raise OutputDirError(
                f"{output_dir} is in use by a run still in progress (process {holder['pid']} on this host, {lock}): "
                "wait for it, or give another --output_dir."
            )
        logger.warning("%s was left by process %d, which is gone (a crash?): taking it over.", lock, holder["pid"])
        lock.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _holder(lock) == me:
            lock.unlink()


@contextmanager
def claimed_run_folder(args: TrainingArguments, init_from: str | None = None) -> Iterator[Path]:
    """``args.output_dir``, resolved and claimed by this run for the block: an overlap with ``init_from`` refused,
    the lock held (by the process that saves) and a run already there refused unless resumed or replaced on
    purpose (``--resume_from_checkpoint``, ``--overwrite_output_dir``)."""
    output_dir = Path(args.output_dir).resolve()
    check_init_from(output_dir, init_from)
    with output_lock(output_dir, args.should_save):
        check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        yield output_dir
