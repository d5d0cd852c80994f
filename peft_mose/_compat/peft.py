"""PEFT internals: the adapter checksum's save and load globals, and the tuner's state-dict key helpers. Checked on
peft 0.21.2.

The helpers ``_get_tuner_state_dict_key_prefixes`` and ``_filter_state_dict_by_key_prefixes`` (peft.tuners.tuners_utils)
select a model's tensors of one adapter as ``_remap_adapter_state_dict_for_load`` keys them (:func:`adapter_tensors`).

``PeftModel.save_pretrained`` writes each adapter with the module global ``peft.peft_model.safe_save_file(state_dict,
path, metadata={"format": "pt"})``, and ``PeftModel.load_adapter`` (which ``from_pretrained`` calls) reads it with
the module global ``peft.peft_model.load_peft_weights(model_id, device=..., key_mapping=..., **hub_kwargs)``. Neither
has a hook for metadata, and the tuner's ``_remap_adapter_state_dict_for_load`` sees tensors, not the file. So both
globals are wrapped, once: a state dict with MoSE tensors is saved with its checksum added to the metadata, and a
local adapter folder's ``adapter_model.safetensors`` is verified before PEFT loads it. Other adapters are saved
unchanged; files without a checksum load unchanged; adapters fetched from the Hub are not verified.
``tests/test_compat.py`` fails when either global moves or changes its call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft import peft_model
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from ..checksum import verify_file, with_checksum

_MARK = "_peft_mose_checksum"


def _is_wrapped(fn: Callable) -> bool:
    return getattr(fn, _MARK, False)


def install(prefix: str) -> None:
    """Wrap PEFT's adapter save and load (idempotent); ``prefix`` (``"mose_"``) marks the tensors of a MoSE adapter."""
    save, load = peft_model.safe_save_file, peft_model.load_peft_weights
    if not _is_wrapped(save):

        @functools.wraps(save)
        def save_with_checksum(
            tensors: Mapping[str, torch.Tensor], filename: str, metadata: Mapping[str, str] | None = None
        ) -> None:
            if any(f".{prefix}" in name for name in tensors):
                metadata = with_checksum(tensors, metadata)
            return save(tensors, filename, metadata=metadata)

        setattr(save_with_checksum, _MARK, True)
        peft_model.safe_save_file = save_with_checksum
    if not _is_wrapped(load):

        @functools.wraps(load)
        def load_verified(model_id: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else model_id
            weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
            if os.path.isfile(weights):
                verify_file(weights)
            return load(model_id, *args, **kwargs)

        setattr(load_verified, _MARK, True)
        peft_model.load_peft_weights = load_verified


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` (a tuner) that belong to ``adapter_name``, keyed as PEFT's loader keys them."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
