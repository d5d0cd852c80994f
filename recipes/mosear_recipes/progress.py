"""No silent non-training: a ``TrainerCallback`` that stops a run whose trainable parameters received no gradient or
did not change over its first optimizer steps, naming the cause when it is a known one (docs/quantization.md).

Standalone: imports only torch, accelerate and transformers.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

BNB_CPU_REPACK = (
    "bitsandbytes repacked the 4-bit weights of {count} layer(s) (e.g. '{name}') into its CPU inference layout "
    "(`weight.quant_state.packing_format_for_cpu`): a forward in eval mode with inputs that need no gradient (a "
    "validation or probe forward under torch.no_grad()) does this on CPUs with AVX512-BF16, and the repacked layers "
    "compute with `bitsandbytes::gemv_4bit`, which passes no gradient back. Set `support_avx512bf16_for_cpu = False` "
    "on every bitsandbytes Linear4bit before the first such forward (docs/quantization.md)."
)
NO_GRADIENT = (
    "No trainable parameter received a non-zero gradient in the first {steps} optimizer step(s) ({count} trainable "
    "tensors, e.g. '{name}'): training would update nothing. The loss does not reach them: adapters disabled or "
    "detached during the forward, the forward run under torch.no_grad(), or base layers whose kernels have no backward."
)
UNCHANGED = (
    "The trainable parameters received gradients but none changed in the first {steps} optimizer step(s) ({count} "
    "tensors, e.g. '{name}'): a learning rate of 0 (learning rate now {lr}), or parameters missing from the optimizer."
)


class TrainingProgressError(RuntimeError):
    """A run that would train nothing."""


class TrainingProgressCallback(TrainerCallback):
    """After the first ``steps`` optimizer steps of a training session (a resumed run's too), raise :class:`TrainingProgressError` if no trainable parameter got
    a non-zero gradient or none changed. Under DeepSpeed (gradients not on ``.grad``) only the change is checked."""

    def __init__(self, steps: int = 2) -> None:
        if steps < 1:
            raise ValueError(f"TrainingProgressCallback needs steps >= 1, got {steps}")
        self.steps = steps
        self._params: dict[str, torch.nn.Parameter] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._gradient = False
        self._checked = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs) -> None:
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise TrainingProgressError("The model has no trainable parameter (every requires_grad is False).")
        self._start = {name: _fingerprint(p) for name, p in self._params.items()}
        # ZeRO keeps gradients in its own buffers (--deepspeed, or DeepSpeed through `accelerate launch`): only the
        # change is checked
        self._gradient = bool(args.deepspeed) or PartialState().distributed_type == DistributedType.DEEPSPEED
        self._checked = False
        self._seen = 0  # optimizer steps of this training session (a resumed run is checked afresh)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs) -> None:
        if not self._gradient and self._seen < self.steps:
            self._gradient = any(p.grad is not None and bool(p.grad.any()) for p in self._params.values())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    optimizer=None, **kwargs) -> None:
        self._seen += 1
        if self._checked or self._seen < self.steps:
            return
        self._checked = True
        repacked = _bnb_cpu_repacked_layers(model)
        if repacked:
            raise TrainingProgressError(BNB_CPU_REPACK.format(count=len(repacked), name=repacked[0]))
        first = next(iter(self._params))
        if not self._gradient:
            raise TrainingProgressError(NO_GRADIENT.format(steps=self.steps, count=len(self._params), name=first))
        if all(torch.equal(_fingerprint(p), self._start[name]) for name, p in self._params.items()):
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
            raise TrainingProgressError(UNCHANGED.format(steps=self.steps, count=len(self._params), name=first, lr=lr))
        self._start = {}


def _fingerprint(param: torch.nn.Parameter) -> torch.Tensor:
    """Sum and sum of squares in float64 (of the local partition under ZeRO-3): equal only if nothing changed."""
    data = getattr(param, "ds_tensor", param).detach().double()
    return torch.stack([data.sum(), data.square().sum()]).cpu()


def _bnb_cpu_repacked_layers(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers whose weight is in the CPU inference layout (no backward), one per
    weight (an adapter's wrapper shows its base layer's weight too)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            names.setdefault(id(weight), name)
    return list(names.values())
