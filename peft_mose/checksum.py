"""A checksum of the tensors in a safetensors file, kept in the file's own metadata.

safetensors checks the header, not the data: flipped bits inside a tensor load silently (NaN or wrong outputs).
``save_pretrained`` of a MoSE adapter therefore stores the SHA-256 of its tensors (names, dtypes, shapes and bytes,
in name order) under :data:`METADATA_KEY`, and loading verifies it when present (``peft_mose/_compat/peft.py``).
Files without it (older saves, other tools) load as before. The recipes use the same for their projector files.

The tensors do not hold everything that makes an adapter's results: ``adapter_config.json`` beside them does (``eps``,
``lora_alpha``, the modality routing...). The values of :data:`RESULT_FIELDS` are therefore recorded under
:data:`CONFIG_KEY` in the same metadata when the adapter is saved, and an ``adapter_config.json`` edited since is
refused when the adapter loads, naming the field (the other fields, e.g. ``inference_mode``, stay editable).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

METADATA_KEY = "peft_mose.sha256"
CONFIG_KEY = "peft_mose.config"
# adapter_config.json fields that change what a saved MoSE adapter computes.
RESULT_FIELDS = (
    "peft_type", "r", "lora_alpha", "n_experts", "eps", "router_hidden_size", "expert_kind", "router",
    "visual_modalities", "nonvisual_modalities", "answer_modality", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "bias",
)  # fmt: skip


class ChecksumError(ValueError):
    """A safetensors file whose tensors do not match the checksum saved with them, or that cannot be read."""


def tensors_sha256(names: Iterable[str], tensor: Callable[[str], torch.Tensor]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of each tensor, in name order (the file layout does not matter);
    ``tensor(name)`` is called once per name, so a file can be read one tensor at a time."""
    digest = hashlib.sha256()
    for name in sorted(names):
        data = tensor(name).detach().cpu().contiguous()
        digest.update(json.dumps([name, str(data.dtype), list(data.shape)]).encode())
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def with_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` plus the checksum of ``tensors``: what to pass to ``safetensors.torch.save_file``."""
    return {**(metadata or {}), METADATA_KEY: tensors_sha256(tensors, tensors.__getitem__)}


def verify_file(path: str | Path) -> bool:
    """Check the tensors of a safetensors file against the checksum in its metadata. Returns whether it had one;
    a mismatch or an unreadable file raises :class:`ChecksumError` naming the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(METADATA_KEY)
            if expected is None:
                return False
            actual = tensors_sha256(handle.keys(), handle.get_tensor)
    except SafetensorError as err:
        raise ChecksumError(f"{path} is not a readable safetensors file: {err}") from None
    if actual != expected:
        raise ChecksumError(
            f"{path}: the tensors do not match the checksum saved with them (sha256 {expected[:16]}..., now "
            f"{actual[:16]}...): the file was damaged or changed after it was written. Restore it or save it again."
        )
    return True


def result_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`RESULT_FIELDS` of an adapter configuration (``to_dict()`` or the JSON), lists and sets as sorted
    lists (PEFT writes a set in any order); a float equal to an int as that int (``16.0`` is ``16``)."""

    def normal(value: Any) -> Any:
        if isinstance(value, (list, tuple, set, frozenset)):
            return sorted((normal(v) for v in value), key=repr)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return getattr(value, "value", value)  # an enum (peft_type) as its string

    return {name: normal(config.get(name)) for name in RESULT_FIELDS}


def config_differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, value before, value now)`` for each :data:`RESULT_FIELDS` entry on which two configurations differ."""
    old, new = result_fields(before), result_fields(now)
    return [(name, old[name], new[name]) for name in RESULT_FIELDS if old[name] != new[name]]


def record_config(weights: str | Path, config_file: str | Path) -> bool:
    """Add the :data:`RESULT_FIELDS` of ``config_file`` to the metadata of ``weights`` (a MoSE adapter file, i.e.
    one with a checksum; others are left alone), rewriting it through a temporary file. Returns whether it did."""
    weights, config_file = Path(weights), Path(config_file)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if METADATA_KEY not in metadata:
            return False
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata[CONFIG_KEY] = json.dumps(result_fields(json.loads(config_file.read_text(encoding="utf-8"))))
    partial = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, weights)
    return True


def verify_config(weights: str | Path, config_file: str | Path) -> None:
    """Refuse an ``adapter_config.json`` whose :data:`RESULT_FIELDS` differ from those recorded in ``weights`` when
    the adapter was saved (:class:`ChecksumError` naming the field, both values and both files); files without a
    record pass."""
    with safe_open(str(weights), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(CONFIG_KEY)
    if recorded is None:
        return
    try:
        current = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChecksumError(f"{config_file} cannot be read: {err}") from None
    differences = config_differences(json.loads(recorded), current)
    if differences:
        listed = "; ".join(f"{name} is {now!r}, saved as {saved!r}" for name, saved, now in differences)
        raise ChecksumError(
            f"{config_file} was changed after the adapter was saved: {listed} (recorded in {weights}). These fields "
            "change the adapter's results: restore the saved values, or train an adapter with the new ones."
        )
