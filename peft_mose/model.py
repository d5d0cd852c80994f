"""`MoSEModel`: the PEFT tuner that puts modality-specific experts on a transformers model (paper section 5.1)."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import MoSEConfig
from .layer import MERGE_ERROR, MoSELayer, MoSELinear
from .modality import validate_modality_ids
from .tracking import ModalityTracker


class MoSEModel(BaseTuner):
    """Creates MoSE experts on the targeted layers of a pretrained transformers model.

    Use through PEFT: ``get_peft_model(model, MoSEConfig(...))``. The model call and ``generate`` take
    ``modality_ids`` (``[batch, seq]`` of :class:`peft_mose.Modality`), which reach every MoSE layer through a
    :class:`~peft_mose.tracking.ModalityTracker` (its pre-hook takes the keyword out of the model call); without them
    every prompt token is text.
    """

    prefix: str = "mose_"
    tuner_layer_cls = MoSELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: MoSEConfig, adapter_name: str) -> None:
        self.tracker = ModalityTracker.attach(model)

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
        new_module = MoSELinear(target, adapter_name, peft_config, tracker=self.tracker, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def generate(self, *args: Any, modality_ids: torch.Tensor | None = None, **kwargs: Any):
        """``generate`` with ``modality_ids`` of the prompt (``[batch, prompt_len]``); generated tokens are answer
        tokens and the router weight of the prompt is reused at every step."""
        if modality_ids is not None:
            batch, length = _input_shape(args, kwargs)
            validate_modality_ids(modality_ids, batch=batch, length=length)
        with self.tracker.session(modality_ids, generate=True):
            return self.model.generate(*args, **kwargs)

    def routing_stats(self, adapter_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The last forward's routing per MoSE layer: ``{layer: {"lambda": [batch], "expert_weights": [batch, 3, N]}}``.

        ``expert_weights[b, e]`` is expert ``e``'s (visual, non-visual, omni) mean softmax gate over the tokens it
        processed in sample ``b``. During ``generate`` the last forward is the last decode step (lambda is the
        prompt's)."""
        name = adapter_name or self.active_adapters[0]
        return {
            module.layer_name: dict(module.routing_record[name])
            for module in self.model.modules()
            if isinstance(module, MoSELayer) and name in module.routing_record
        }

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        self.tracker.detach(model)
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MoSEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and refuse files that do not fit it (missing, extra or misshaped
        MoSE tensors) with an error that names the tensor."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = {
            k: v for k, v in _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes).items()
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


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None and args:
        inputs = args[0]
    if not isinstance(inputs, torch.Tensor):
        raise ValueError("`modality_ids` was given but neither `input_ids` nor `inputs_embeds` was.")
    return inputs.shape[0], inputs.shape[1]
