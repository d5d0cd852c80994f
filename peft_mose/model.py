"""`MoSEModel`: the PEFT tuner that puts modality-specific experts on a transformers model (paper section 5.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ._compat.peft import adapter_tensors
from .config import MoSEConfig
from .context import ContextScope, start_generate
from .layer import MERGE_ERROR, MoSELayer, MoSELinear, RoutingMemo
from .modality_tokens import model_tokens
from .positions import CallKind
from .targets import check_targets, default_targets


class MoSEModel(BaseTuner):
    """Creates MoSE experts on the targeted layers of a pretrained transformers model.

    Use through PEFT: ``get_peft_model(model, MoSEConfig(...))``. The model call and ``generate`` take
    ``modality_ids`` (``[batch, seq]`` of :class:`peft_mose.Modality`), the one way in for them: each call opens a
    :class:`~peft_mose.context.ModalityContext` that every MoSE layer (and attention reallocation) reads, and closes
    it on return. Without them every token is text. Works on any ``nn.Module``; ``task_type=None`` gives a plain
    ``PeftModel``.
    """

    prefix: str = "mose_"
    tuner_layer_cls = MoSELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: MoSEConfig, model_config: dict) -> MoSEConfig:
        return peft_config  # the targets are resolved in _prepare_model, which sees the model (targets.py)

    def _prepare_model(self, peft_config: MoSEConfig, model: nn.Module) -> None:
        """Resolve the default targets to the language model's layers (full names, after ``layers_to_transform`` and
        ``exclude_modules``); refuse targets outside it."""
        def matches(key: str) -> bool:
            return bool(self._check_target_module_exists(peft_config, key))

        default = default_targets(model, peft_config.target_modules)
        if default is not None:
            peft_config.target_modules, layers = default
            peft_config.target_modules = {name for name in layers if matches(name)}
        check_targets(model, matches, peft_config.target_modules)

    def _pre_injection_hook(self, model: nn.Module, config: MoSEConfig, adapter_name: str) -> None:
        if not hasattr(self, "scope"):
            self.scope = ContextScope()
            self.modality_tokens = model_tokens(model)

    def _create_and_replace(
        self,
        peft_config: MoSEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, MoSELayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = MoSELinear(target, adapter_name, peft_config, scope=self.scope, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Open the call's modality context: every ``PeftModel`` forward and ``generate`` enters here first (a
        ``generate`` then declares the call one, in :meth:`generate`)."""
        with self.scope.call(self.model, kwargs.get("modality_ids"), CallKind.FORWARD, tokens=self.modality_tokens):
            yield

    def forward(self, *args: Any, modality_ids: torch.Tensor | None = None, **kwargs: Any):
        """The wrapped model's forward. ``modality_ids`` ``[batch, positions]`` cover every position the call
        attends to, cached ones included; with a cache returned by an earlier call they may be left out."""
        with self.scope.call(self.model, modality_ids, CallKind.FORWARD, tokens=self.modality_tokens):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, modality_ids: torch.Tensor | None = None, **kwargs: Any):
        """``generate`` with ``modality_ids`` of the prompt (``[batch, prompt_len]``); generated tokens are answer
        tokens, and the router weight of the prompt (computed at prefill) is used at every step."""
        with self.scope.call(self.model, modality_ids, CallKind.GENERATE, tokens=self.modality_tokens) as context:
            start_generate(context, self.model, args, kwargs)
            return self.model.generate(*args, **kwargs)

    def routing_stats(self, adapter_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The last call's routing per MoSE layer: ``{layer: {"lambda": [batch], "expert_weights": [batch, 3, N]}}``.

        ``lambda`` is the prompt's router weight (Eq. 3); ``expert_weights[b, e]`` is expert ``e``'s (visual,
        non-visual, omni) mean softmax gate over the tokens it processed in sample ``b`` in the call's last forward
        (for ``generate``, the last decode step). MoAE (``expert_kind="moae"``) has one expert and no ``lambda``
        (``None``)."""
        name = adapter_name or self.active_adapters[0]
        routing = self.scope.last_call.find(RoutingMemo) or RoutingMemo()
        return {
            layer: {"lambda": routing.router_weights.get((layer, adapter)), "expert_weights": means}
            for (layer, adapter), means in routing.expert_weights.items()
            if adapter == name
        }

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MoSEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and refuse files that do not fit it (missing, extra or misshaped
        MoSE tensors) with an error that names the tensor."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            k: v for k, v in adapter_tensors(model, adapter_name).items()
            if ".mose_" in k and not k.endswith(".mose_dropout")
        }
        loaded = {k: v for k, v in remapped.items() if ".mose_" in k}
        hint = f"(adapter config: r={config.r}, n_experts={config.n_experts}, router_hidden_size={config.router_hidden_size})"
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise ValueError(
                f"The MoSE adapter file lacks {len(missing)} tensor(s) the model expects, e.g. '{missing[0]}'. Was it "
                f"saved from the same base model and config? {hint}"
            )
        unexpected = sorted(set(loaded) - set(expected))
        if unexpected:
            raise ValueError(
                f"The MoSE adapter file has {len(unexpected)} tensor(s) with no place in this model, e.g. "
                f"'{unexpected[0]}'. It was saved for a different base model or target modules. {hint}"
            )
        for key, tensor in loaded.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"The MoSE adapter file's tensor '{key}' has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(expected[key].shape)}: the file does not fit this base model or config {hint}."
                )
        return remapped


def mose_tuner(model: nn.Module) -> MoSEModel | None:
    """The MoSE tuner of ``model`` (a PEFT model whose tuner is MoSE, or the tuner itself), else ``None``."""
    tuner = model if isinstance(model, MoSEModel) else getattr(model, "base_model", None)
    return tuner if isinstance(tuner, MoSEModel) else None


def is_mose_model(model: nn.Module) -> bool:
    """Whether ``model`` is a MoSE model, whose forward and ``generate`` take ``modality_ids``."""
    return mose_tuner(model) is not None
