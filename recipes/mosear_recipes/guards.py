"""Training that stops on a bad state instead of saving it: non-finite losses, gradients or weights, failed saves.

Trainer replaces a NaN loss in its logs by the running mean (``logging_nan_inf_filter``), so a run whose weights all
turned NaN still "succeeds" and its checkpoints rotate the good ones out. :class:`NonFiniteGuard` (a callback, with
the loss checked by ``MoSETrainer.compute_loss``) checks the values itself and raises :class:`NonFiniteError` (a
non-zero exit) before anything of the bad step is saved; :func:`train` names a checkpoint whose save failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .integrity import save_failure

HINT = (
    "Check the batch's feature files, or lower the learning rate or set --max_grad_norm, then resume from the newest "
    "intact checkpoint (--resume_from_checkpoint with no path)."
)


class NonFiniteError(RuntimeError):
    """Training met a NaN or infinite loss, gradient or weight; nothing of that step was saved."""


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any process (every process must call), so that all of them stop together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, ``None`` if all are finite (one device sync)."""
    if not tensors:
        return None
    device = next(iter(tensors.values())).device
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in tensors.values()])
    if bool(finite.all()):
        return None
    return list(tensors)[int((~finite).nonzero()[0])]


class NonFiniteGuard(TrainerCallback):
    """Stops training on non-finite gradients (before the optimizer step, where Trainer's model holds them) and on
    non-finite trainable weights (after the step, before any save: DeepSpeed keeps its gradients to itself and steps
    inside backward). :meth:`check_loss` is called by ``MoSETrainer.compute_loss`` on every loss."""

    def check_loss(self, loss: torch.Tensor, inputs: Mapping[str, Any], args: TrainingArguments, step: int) -> None:
        """Raise on a non-finite loss, before its backward pass."""
        if any_process(not bool(torch.isfinite(loss.detach()).all()), args.device):
            names = inputs.get("names")
            batch = f", batch {', '.join(map(str, names))}" if names else ""
            raise NonFiniteError(
                f"Non-finite training loss ({loss.detach().float().flatten()[0].item()}) at step {step} in "
                f"{args.output_dir}{batch} (possibly on another process): training stopped before the update; nothing "
                f"of this step was saved. {HINT}"
            )

    def _check(self, tensors: Mapping[str, torch.Tensor], what: str, when: str, args: TrainingArguments) -> None:
        name = first_non_finite(tensors)
        if any_process(name is not None, args.device):
            where = repr(name) if name is not None else "(on another process)"
            raise NonFiniteError(
                f"Non-finite {what} {where} {when} in {args.output_dir}: training stopped; nothing of this step was "
                f"saved. {HINT}"
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module, **kwargs
    ) -> None:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        self._check(grads, "gradient of", f"at step {state.global_step + 1}, before the optimizer step", args)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module, **kwargs
    ) -> None:
        # Under ZeRO-3 a parameter is empty outside a gather; each process checks its own partition (ds_tensor).
        weights = {n: getattr(p, "ds_tensor", p) for n, p in model.named_parameters() if p.requires_grad}
        self._check(weights, "weight", f"after step {state.global_step}, before it could be saved", args)


def train(trainer: Trainer, resume_from_checkpoint: str | None) -> None:
    """``trainer.train(resume_from_checkpoint=...)``; an error while a checkpoint was being saved (a full disk)
    becomes a :class:`~mosear_recipes.integrity.CheckpointError` naming it, after removing what it left (see
    :func:`~mosear_recipes.integrity.save_failure`)."""
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except NonFiniteError:
        raise
    except Exception as error:
        if trainer.control.should_save and trainer.args.should_save:
            checkpoint = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
            failure = save_failure(checkpoint, error)
            if failure is not None:
                raise failure from error
        raise
