"""Training that stops on a bad state instead of saving it: non-finite losses, gradients or weights, failed saves.

Trainer replaces a NaN loss in its logs by the running mean (``logging_nan_inf_filter``), so a run whose weights all
turned NaN still "succeeds" and its checkpoints rotate the good ones out. :class:`GuardedTrainer` checks the values
itself and raises :class:`NonFiniteError` (a non-zero exit) before anything of the bad step is saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mosear_recipes.integrity import CheckpointManifests, save_failure

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
    inside backward). :meth:`check_loss` is called by :class:`GuardedTrainer` on every loss."""

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


class GuardedTrainer(Trainer):
    """``Trainer`` that stops on non-finite values (:class:`NonFiniteGuard`), gives every checkpoint a manifest before
    it rotates old ones out (:class:`~mosear_recipes.integrity.CheckpointManifests`, which takes over
    ``save_total_limit``),
    and turns a failed checkpoint save (a full disk) into an error that names it, after removing what it left."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = NonFiniteGuard()
        self.add_callback(self.guard)
        self.add_callback(CheckpointManifests(self.args.save_total_limit))
        self.args.save_total_limit = None  # Trainer's rotation runs before the manifest exists

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Trainer's loss, checked before its backward pass when training."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.guard.check_loss(loss, inputs, self.args, self.state.global_step + 1)
        return result

    def train(self, *args: Any, **kwargs: Any):
        """Trainer's ``train``; an error while a checkpoint was being saved becomes a
        :class:`~mosear_recipes.integrity.CheckpointError` naming it (see
        :func:`~mosear_recipes.integrity.save_failure`)."""
        try:
            return super().train(*args, **kwargs)
        except NonFiniteError:
            raise
        except Exception as error:
            if self.control.should_save and self.args.should_save:
                checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                failure = save_failure(checkpoint, error)
                if failure is not None:
                    raise failure from error
            raise
