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

The configuration's fields that change results (``peft_mose.checksum.RESULT_FIELDS``) are recorded in the same
metadata. ``PeftModel.save_pretrained`` writes each adapter's weights first (``safe_save_file``) and its
``adapter_config.json`` after them (``peft_config.save_pretrained(output_dir)``), and the weight save does not see the
configuration; so :func:`record_saved_config`, which ``MoSEConfig.save_pretrained`` calls once the JSON is written,
adds them to the weights just written in that folder. The loader compares them with the folder's
``adapter_config.json`` before PEFT loads the weights. ``tests/test_compat.py`` fails if PEFT changes that order.

``PeftModel.from_pretrained`` reads the adapter type with the classmethod ``PeftConfig._get_peft_type`` and indexes
``PEFT_TYPE_TO_CONFIG_MAPPING`` with it: a local ``adapter_config.json`` that is not JSON, has no ``peft_type`` or an
unknown one fails there with a bare ``JSONDecodeError`` or ``KeyError``, and a missing one with a hub lookup. The
classmethod is wrapped to refuse these first with a message naming the file (:func:`adapter_config_problem`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft import peft_model
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from ..checksum import record_config, verify_config, verify_file, with_checksum

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
                if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
                    verify_config(weights, os.path.join(folder, CONFIG_NAME))
            return load(model_id, *args, **kwargs)

        setattr(load_verified, _MARK, True)
        peft_model.load_peft_weights = load_verified
    get_type = inspect.getattr_static(PeftConfig, "_get_peft_type").__func__
    if not _is_wrapped(get_type):

        @functools.wraps(get_type)
        def get_type_checked(cls: type, model_id: str, **kwargs: Any) -> Any:
            folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else model_id
            problem = adapter_config_problem(folder) if os.path.isdir(folder) else None
            if problem is not None:
                raise ValueError(problem)
            return get_type(cls, model_id, **kwargs)

        setattr(get_type_checked, _MARK, True)
        PeftConfig._get_peft_type = classmethod(get_type_checked)


def adapter_config_problem(folder: str | os.PathLike) -> str | None:
    """What makes a local adapter folder's ``adapter_config.json`` unloadable (missing, not JSON, no or an unknown
    ``peft_type``), as a message naming the file; ``None`` when PEFT can read it."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return f"{path} does not exist: {folder} holds no saved adapter."
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path} is not valid JSON ({err}): it is not the configuration of a saved PEFT adapter."
    if not isinstance(config, dict) or "peft_type" not in config:
        return f"{path} has no 'peft_type': it is not the configuration of a saved PEFT adapter."
    if config["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        return f"{path}: unknown peft_type {config['peft_type']!r} (known: {known}; MOSE needs `import peft_mose`)."
    return None


def record_saved_config(save_directory: str | os.PathLike) -> None:
    """After ``adapter_config.json`` is written to ``save_directory``: record its result fields in the MoSE weights
    that ``PeftModel.save_pretrained`` wrote there just before (nothing when there are none)."""
    weights = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(weights):
        record_config(weights, os.path.join(save_directory, CONFIG_NAME))


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` (a tuner) that belong to ``adapter_name``, keyed as PEFT's loader keys them."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
