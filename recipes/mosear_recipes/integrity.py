"""Checkpoint integrity for ``recipes/merr_finetune.py``: a manifest in every checkpoint, verified before resuming.

Trainer writes a checkpoint file by file and nothing marks it complete or unchanged: a run killed while saving leaves
a partial one, a damaged one resumes into a different model, and DeepSpeed unpickles whatever lies in its
``global_step*/`` files. :class:`CheckpointManifests` therefore writes ``manifest.json`` (every file with its size and
SHA-256) into each checkpoint once Trainer has finished it, as the last file and atomically, and only then rotates
old checkpoints; :func:`resolve_resume` refuses a checkpoint whose files differ from its manifest in any way before
anything of it is loaded. What this does and cannot guarantee: docs/recipes.md, "Checkpoint integrity".
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .manifests import MANIFEST, changed_files, folder_files, read_listed, write_manifest

logger = logging.getLogger(__name__)

REFUSED_SUFFIX = ".refused"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged, or that could not be saved."""


def checkpoint_problems(directory: Path) -> list[str]:
    """What is wrong with a checkpoint compared with its manifest (nothing: intact). Reads every file."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return [f"{directory} is not a folder"]
    if not manifest.is_file():
        return [
            f"{manifest} is missing: the checkpoint was never finished (the run stopped while saving it) or was not "
            "written by merr_finetune.py"
        ]
    try:
        listed = read_listed(manifest)
    except ValueError as err:
        return [str(err)]
    present = folder_files(directory)
    added = [f"{present[n]} was added after the checkpoint was written" for n in sorted(set(present) - set(listed))]
    return changed_files(directory, listed, listed) + added


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, by step."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")  # not checkpoint-N.refused-K, set aside for good
    found = [(int(m[1]), p) for p in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and (m := pattern.fullmatch(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


def newest_intact(run_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint of ``run_dir`` without problems (other than ``exclude``)."""
    for checkpoint in reversed(checkpoints(run_dir)):
        if checkpoint.resolve() != (exclude.resolve() if exclude else None) and not checkpoint_problems(checkpoint):
            return checkpoint
    return None


def _resume_hint(run_dir: Path, exclude: Path | None = None) -> str:
    newest = newest_intact(run_dir, exclude)
    if newest is None:
        return "This run has no intact checkpoint to resume from."
    return (
        f"The newest intact checkpoint is {newest}: resume with --resume_from_checkpoint {newest} (or with no path, "
        "which picks it)."
    )


def resolve_resume(value: str | None, run_dir: Path) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names, verified before anything of it is loaded: no value (or
    ``True``) picks the newest intact checkpoint of ``run_dir``; a checkpoint with problems raises
    :class:`CheckpointError` naming them and the newest intact one."""
    if value is None:
        return None
    if value.lower() == "true":
        newest = newest_intact(run_dir)
        if newest is None:
            raise CheckpointError(f"--resume_from_checkpoint: no intact checkpoint in {run_dir}.")
        for skipped in _newer(run_dir, newest):
            logger.warning("Not resuming from %s: %s.", skipped, "; ".join(checkpoint_problems(skipped)))
        return str(newest)
    problems = checkpoint_problems(Path(value))
    if problems:
        raise CheckpointError(
            f"Refusing to resume from {value}, nothing of it was loaded: {'; '.join(problems)}. "
            f"{_resume_hint(run_dir, exclude=Path(value))}"
        )
    return value


def _newer(run_dir: Path, checkpoint: Path) -> list[Path]:
    step = int(checkpoint.name.split("-")[-1])
    return [c for c in checkpoints(run_dir) if int(c.name.split("-")[-1]) > step]


def set_aside_damaged(run_dir: Path, resume: str) -> list[Path]:
    """Rename the checkpoints newer than ``resume`` that differ from their manifest to ``checkpoint-N.refused[-k]``
    (kept for inspection, never resumed nor rotated), with a warning: the resumed run saves those steps again and
    would otherwise write into them and list their foreign files in its manifest. Returns the new paths."""
    moved = []
    for damaged in (c for c in _newer(run_dir, Path(resume)) if checkpoint_problems(c)):
        target, k = damaged.with_name(damaged.name + REFUSED_SUFFIX), 1
        while target.exists():
            k += 1
            target = damaged.with_name(f"{damaged.name}{REFUSED_SUFFIX}-{k}")
        damaged.rename(target)
        logger.warning("Resuming from %s: %s is damaged and was moved to %s.", resume, damaged, target)
        moved.append(target)
    return moved


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: ``OSError(ENOSPC)``, or torch's zip writer failing."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if isinstance(error, RuntimeError) and any(s in str(error) for s in ("basic_ios::clear", "file write failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_failure(checkpoint: Path, error: Exception) -> CheckpointError | None:
    """After ``error`` stopped training while ``checkpoint`` was due to be saved: if that save failed (the folder is
    incomplete, or the disk is full), remove what it left and return the error to raise; else ``None``."""
    left = checkpoint.is_dir() and bool(checkpoint_problems(checkpoint))
    if not (left or _disk_full(error)):
        return None
    if left:
        shutil.rmtree(checkpoint)
    reason = "no space left on device" if _disk_full(error) else f"{type(error).__name__}: {error}"
    nothing = "What it had written was removed; nothing" if left else "Nothing"
    return CheckpointError(
        f"Could not save checkpoint {checkpoint}: {reason}. {nothing} saved before was lost. "
        f"{_resume_hint(checkpoint.parent)}"
    )


class CheckpointManifests(TrainerCallback):
    """Writes the manifest of every checkpoint once Trainer has written all of it (``on_save``, after every process
    finished its files), then deletes checkpoints beyond ``save_total_limit`` (unfinished ones first, then the
    oldest), never the one just written. Trainer's
    own rotation must be off (``save_total_limit=None`` in its arguments): it runs inside the save, before
    ``on_save``, so a crash between the two would leave the newest checkpoint unverifiable and the intact one gone."""

    def __init__(self, save_total_limit: int | None) -> None:
        self.save_total_limit = save_total_limit

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other processes' files (their RNG state, their DeepSpeed shards)
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        try:
            write_manifest(checkpoint, state.global_step)
        except OSError as error:
            raise save_failure(checkpoint, error) or error
        if self.save_total_limit is not None and self.save_total_limit > 0:
            older = [c for c in checkpoints(checkpoint.parent) if c != checkpoint]
            older.sort(key=lambda c: (c / MANIFEST).is_file())  # unfinished ones (no manifest) first, then by step
            for stale in older[: max(len(older) + 1 - self.save_total_limit, 0)]:
                shutil.rmtree(stale)
