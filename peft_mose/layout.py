"""Token layouts of multimodal LLM batches, built from per-sample modality segments.

Convention: ``TEXT`` and ``ANSWER`` positions hold token ids; ``VISUAL`` and ``AUDIO`` positions are embedding slots
whose vectors come from outside the LLM (projected encoder features) and are inserted with
:func:`insert_embeddings`. Labels are the token ids of the ``ANSWER`` positions and ``IGNORE_INDEX`` elsewhere.
Padding positions have ``attention_mask == 0`` and modality ``TEXT``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .modality import Modality, modality_ids_from_segments, parse_modality, validate_modality_ids

IGNORE_INDEX = -100
PADDING_SIDES = ("right", "left")

TOKEN_MODALITIES = (Modality.TEXT, Modality.ANSWER)
SLOT_MODALITIES = (Modality.VISUAL, Modality.AUDIO)

Segment = tuple[Modality | int | str, Sequence[int] | int]
"""``(modality, token_ids)`` for TEXT/ANSWER segments, ``(modality, n_slots)`` for VISUAL/AUDIO segments."""


@dataclass(frozen=True)
class SegmentRow:
    """One sample's sequence: ``input_ids`` (slots hold a placeholder id), ``labels`` and ``modality_ids``, all 1-D."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    modality_ids: torch.Tensor


def encode_segments(segments: Iterable[Segment], placeholder_id: int) -> SegmentRow:
    """Build one sample's row from its segments in order; ``placeholder_id`` fills the embedding slots."""
    ids: list[int] = []
    labels: list[int] = []
    layout: list[tuple[Modality, int]] = []
    for modality, content in segments:
        modality = parse_modality(modality)
        if modality in TOKEN_MODALITIES:
            if isinstance(content, int):
                raise ValueError(f"A {modality.name} segment needs token ids, got a slot count {content}.")
            tokens = [int(t) for t in content]
            ids.extend(tokens)
            labels.extend(tokens if modality == Modality.ANSWER else [IGNORE_INDEX] * len(tokens))
            layout.append((modality, len(tokens)))
        else:
            if not isinstance(content, int) or content < 0:
                raise ValueError(f"A {modality.name} segment needs a slot count >= 0, got {content!r}.")
            ids.extend([placeholder_id] * content)
            labels.extend([IGNORE_INDEX] * content)
            layout.append((modality, content))
    return SegmentRow(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        modality_ids=modality_ids_from_segments(layout),
    )


def pad_rows(rows: Sequence[torch.Tensor], pad_value: int | float, padding_side: str = "right") -> torch.Tensor:
    """Stack tensors of different lengths along a new batch dimension, padding dimension 0 on the given side."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    if not rows:
        raise ValueError("Cannot pad an empty list of rows.")
    length = max(row.shape[0] for row in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), pad_value)
    for i, row in enumerate(rows):
        if padding_side == "right":
            out[i, : row.shape[0]] = row
        else:
            out[i, length - row.shape[0] :] = row
    return out


def collate_rows(
    rows: Sequence[SegmentRow], pad_token_id: int, padding_side: str = "right", with_labels: bool = True
) -> dict[str, torch.Tensor]:
    """Pad rows into a batch: ``input_ids``, ``attention_mask``, ``modality_ids`` and (optionally) ``labels``."""
    return _pad_batch(
        [r.input_ids for r in rows],
        [r.modality_ids for r in rows],
        [r.labels for r in rows] if with_labels else None,
        pad_token_id,
        padding_side,
    )


def prompt_only(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    modality_ids: torch.Tensor,
    pad_token_id: int,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Drop the answer tokens and the padding of a batch and re-pad it: the prompts to generate from.

    Returns ``input_ids``, ``attention_mask`` and ``modality_ids``; an already prompt-only batch is only re-padded.
    """
    validate_modality_ids(modality_ids, batch=input_ids.shape[0], length=input_ids.shape[1])
    keep = attention_mask.bool() & (modality_ids != Modality.ANSWER)
    return _pad_batch(
        [ids[k] for ids, k in zip(input_ids, keep)],
        [mods[k] for mods, k in zip(modality_ids, keep)],
        None,
        pad_token_id,
        padding_side,
    )


def _pad_batch(
    ids: Sequence[torch.Tensor],
    modalities: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | None,
    pad_token_id: int,
    padding_side: str,
) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad_rows(ids, pad_token_id, padding_side),
        "attention_mask": pad_rows([torch.ones_like(r) for r in ids], 0, padding_side),
        "modality_ids": pad_rows(modalities, int(Modality.TEXT), padding_side),
    }
    if labels is not None:
        batch["labels"] = pad_rows(labels, IGNORE_INDEX, padding_side)
    return batch


def embedding_slots(modality_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the positions whose embeddings come from outside the LLM (VISUAL and AUDIO)."""
    slot_ids = torch.tensor([int(m) for m in SLOT_MODALITIES], device=modality_ids.device)
    return torch.isin(modality_ids, slot_ids)


def insert_embeddings(
    token_embeds: torch.Tensor, modality_ids: torch.Tensor, slot_embeds: torch.Tensor
) -> torch.Tensor:
    """Return ``token_embeds`` [B, L, H] with each sample's ``slot_embeds`` [B, M, H], in order, placed at its M
    VISUAL/AUDIO positions. Differentiable with respect to ``slot_embeds``."""
    batch, length, hidden = token_embeds.shape
    validate_modality_ids(modality_ids, batch=batch, length=length)
    if slot_embeds.dim() != 3 or slot_embeds.shape[0] != batch or slot_embeds.shape[2] != hidden:
        raise ValueError(
            f"slot_embeds must have shape [{batch}, n_slots, {hidden}], got {tuple(slot_embeds.shape)}."
        )
    slots = embedding_slots(modality_ids)
    counts = slots.sum(dim=1)
    if bool((counts != slot_embeds.shape[1]).any()):
        raise ValueError(
            f"Each sample needs {slot_embeds.shape[1]} VISUAL/AUDIO positions for its embeddings; "
            f"the modality ids have {counts.tolist()}."
        )
    return token_embeds.masked_scatter(slots.unsqueeze(-1), slot_embeds.to(token_embeds.dtype))
