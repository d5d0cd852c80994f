"""A checksum of the tensors in a safetensors file, kept in the file's own metadata.

safetensors checks the header, not the data: flipped bits inside a tensor load silently (NaN or wrong outputs).
``save_pretrained`` of a MoSE adapter therefore stores the SHA-256 of its tensors (names, dtypes, shapes and bytes,
in name order) under :data:`METADATA_KEY`, and loading verifies it when present (``peft_mose/_compat/peft.py``).
Files without it (older saves, other tools) load as before. The recipes use the same for their projector files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

METADATA_KEY = "peft_mose.sha256"


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
