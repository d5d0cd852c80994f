"""Token modalities and the validation of per-token modality tensors.

Every MoSE layer and the attention reallocation read the same ``modality_ids``: an integer tensor
``[batch, seq]`` holding one :class:`Modality` value per token.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch


class Modality(enum.IntEnum):
    """Modality of one token.

    ``ANSWER`` marks the response: teacher-forced answer tokens in training and every generated token. The experts
    treat answer tokens as text; the MoSE router and the attention reallocation never pool over them, so that
    training and generation see the same routing weight (it only depends on the prompt).
    """

    TEXT = 0
    VISUAL = 1
    AUDIO = 2
    ANSWER = 3


_NAMES = {m.name.lower(): m for m in Modality}


def parse_modality(value: Modality | int | str) -> Modality:
    """Turn ``"visual"``, ``1`` or ``Modality.VISUAL`` into ``Modality.VISUAL``; raise ``ValueError`` otherwise."""
    if isinstance(value, Modality):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _NAMES:
            return _NAMES[key]
        raise ValueError(f"Unknown modality name {value!r}; expected one of {sorted(_NAMES)}.")
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Modality(value)
        except ValueError:
            pass
    raise ValueError(f"Unknown modality {value!r}; expected one of {[f'{m.name}={m.value}' for m in Modality]}.")


def parse_modalities(values: Iterable[Modality | int | str], field: str) -> list[str]:
    """Normalise a collection of modalities to a sorted, duplicate-free list of lowercase names (JSON friendly)."""
    if isinstance(values, (str, int)):
        values = [values]
    try:
        parsed = {parse_modality(v) for v in values}
    except ValueError as err:
        raise ValueError(f"`{field}`: {err}") from None
    return [m.name.lower() for m in sorted(parsed)]


def validate_modality_ids(modality_ids: torch.Tensor, batch: int | None = None, length: int | None = None) -> None:
    """Raise ``ValueError`` naming the problem if ``modality_ids`` is not an integer ``[batch, length]`` tensor of
    known :class:`Modality` values."""
    if not isinstance(modality_ids, torch.Tensor):
        raise ValueError(f"`modality_ids` must be a torch.Tensor, got {type(modality_ids).__name__}.")
    if modality_ids.dtype.is_floating_point or modality_ids.dtype.is_complex or modality_ids.dtype == torch.bool:
        raise ValueError(f"`modality_ids` must be an integer tensor of Modality values, got dtype {modality_ids.dtype}.")
    if modality_ids.dim() != 2:
        raise ValueError(f"`modality_ids` must have shape [batch, seq_len], got {tuple(modality_ids.shape)}.")
    check_modality_shape(modality_ids, batch, length)
    if modality_ids.device.type == "meta":
        raise ValueError("`modality_ids` is on the meta device; pass a tensor with data.")
    if modality_ids.numel():
        lo, hi = int(modality_ids.min()), int(modality_ids.max())
        known = [m.value for m in Modality]
        if lo < min(known) or hi > max(known):
            bad = lo if lo < min(known) else hi
            raise ValueError(
                f"`modality_ids` contains unknown modality id {bad}; known ids: "
                + ", ".join(f"{m.name}={m.value}" for m in Modality)
                + "."
            )


def check_modality_shape(modality_ids: torch.Tensor, batch: int | None, length: int | None) -> None:
    """``ValueError`` unless the ``[batch, seq_len]`` ids have the inputs' ``batch`` and ``length`` (``None``: any)."""
    if batch is not None and modality_ids.shape[0] != batch:
        raise ValueError(
            f"`modality_ids` has batch size {modality_ids.shape[0]} but the inputs have batch size {batch}."
        )
    if length is not None and modality_ids.shape[1] != length:
        raise ValueError(
            f"`modality_ids` has length {modality_ids.shape[1]} but the inputs have sequence length {length}."
        )


def modality_ids_from_segments(
    segments: Iterable[tuple[Modality | int | str, int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Build a 1-D ``modality_ids`` row from ``(modality, length)`` segments, e.g.
    ``[("text", 5), ("visual", 259), ("audio", 1), ("text", 40)]``."""
    parts = []
    for modality, length in segments:
        if int(length) < 0:
            raise ValueError(f"Segment length must be >= 0, got {length} for modality {modality!r}.")
        parts.append(torch.full((int(length),), int(parse_modality(modality)), dtype=torch.long, device=device))
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(parts)
