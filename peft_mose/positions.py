"""The positions of one forward of the transformers model inside a call: modality, padding, cached length.

:func:`forward_positions` reads them off the call's ``modality_ids`` (as its :class:`CallKind` says to read them),
the prompt of the KV cache the forward continues, and the forward's own shape and 2-D attention mask.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .memos import Memos
from .modality import Modality


class CallKind(enum.Enum):
    """What the ``modality_ids`` of a call describe."""

    FORWARD = "forward"
    """One forward: every position it attends to, cached ones included."""
    GENERATE = "generate"
    """One whole ``generate``: its prompt. Later positions are generated (``Modality.ANSWER``), the batch may be a
    multiple of the ids' (beams, ``num_return_sequences``), and forwards without a cache may cover generated tokens."""
    PROMPT = "prompt"
    """One forward of a plain model under attention reallocation: its prompt, which a forward without a cache is
    exactly and a forward with a cache continues."""


@dataclass(eq=False)
class ForwardPositions:
    """The positions of one forward of the transformers model inside a call.

    ``modality_ids`` and ``valid`` cover every position the forward attends to (cached ones included):
    ``[batch, past_length + new_length]``; :meth:`new` slices out the positions it computes.
    """

    modality_ids: Tensor
    valid: Tensor
    past_length: int
    new_length: int
    uniform: Modality | None = None
    """The modality of every new position when the call's structure says so (a decode step past the prompt:
    ``ANSWER``), so that no layer reads the ids to find out."""
    memos: Memos = field(default_factory=Memos, repr=False)

    @property
    def prefill(self) -> bool:
        return self.past_length == 0

    @property
    def batch_size(self) -> int:
        return self.modality_ids.shape[0]

    def new(self, tensor: Tensor) -> Tensor:
        """The positions computed by this forward (``[:, past_length:]``) of a ``[batch, total]`` tensor."""
        return tensor[:, self.past_length :]


def forward_positions(
    ids: Tensor | None, kind: CallKind, cached_prompt: Tensor | None, batch: int, past: int, new: int,
    attention_mask: Any, device: torch.device, prompt_mask: Tensor | None = None,
) -> ForwardPositions:
    """The positions of a forward of ``batch`` rows, ``past`` cached and ``new`` computed positions, in a call whose
    ids are ``ids`` of ``kind``; ``cached_prompt``: the ids of the prompt that filled the cache it continues;
    ``prompt_mask``: a generate call's 2-D mask of its prompt, read where the forward's own mask is not 2-D."""
    full, uniform = _full_ids(ids, kind, cached_prompt, batch, past, new, device)
    valid = _valid_positions(attention_mask, prompt_mask, batch, past + new, device)
    return ForwardPositions(full, valid, past, new, uniform)


def _full_ids(
    ids: Tensor | None, kind: CallKind, cached_prompt: Tensor | None, batch: int, past: int, new: int,
    device: torch.device,
) -> tuple[Tensor, Modality | None]:
    """Modality ids of every position of a forward (``[batch, past + new]``), checked against its shape, and the
    modality of all new positions where it follows from the shape alone (new positions past the prompt)."""
    total = past + new
    source = "`modality_ids`"
    if ids is None and cached_prompt is not None:
        ids, kind, source = cached_prompt, CallKind.PROMPT, "the prompt that filled the cache"
    if ids is None:
        return torch.full((batch, total), int(Modality.TEXT), dtype=torch.long, device=device), Modality.TEXT
    ids = ids.to(device=device, dtype=torch.long)
    length = ids.shape[1]
    if ids.shape[0] != batch:
        # only generate expands a prompt's rows (beams, num_return_sequences); a forward that starts a sequence is
        # exactly the prompt
        if kind is CallKind.FORWARD or (kind is CallKind.PROMPT and past == 0) or batch % ids.shape[0]:
            raise ValueError(
                f"{source} has batch size {ids.shape[0]} but the model was called with batch size {batch}."
            )
        ids = ids.repeat_interleave(batch // ids.shape[0], dim=0)
    if length == total:
        return ids, None
    if kind is CallKind.FORWARD:
        raise ValueError(
            f"`modality_ids` has length {length} but the call covers {total} positions ({past} cached + {new} "
            "new); pass one id per position, cached ones included."
        )
    if total < length or (past == 0 and kind is not CallKind.GENERATE):
        raise ValueError(
            f"{source} describes a prompt of {length} tokens but the model was called on {total} positions "
            f"({past} cached + {new} new); pass the ids of this prompt."
        )
    answer = torch.full((batch, total - length), int(Modality.ANSWER), dtype=torch.long, device=device)
    return torch.cat([ids, answer], dim=1), (Modality.ANSWER if past >= length else None)


def _valid_positions(mask: Any, prompt_mask: Tensor | None, batch: int, total: int, device: torch.device) -> Tensor:
    """Real (non-padding) positions from a 2-D attention mask; else from the generate call's prompt mask (its rows
    expanded as generate expands them, every position after the prompt real); else all of them."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (batch, total):
        return mask.to(device=device) != 0
    if prompt_mask is not None and prompt_mask.shape[1] <= total and batch % prompt_mask.shape[0] == 0:
        prompt = prompt_mask.to(device=device).repeat_interleave(batch // prompt_mask.shape[0], dim=0) != 0
        return torch.cat([prompt, prompt.new_ones(batch, total - prompt.shape[1])], dim=1)
    return torch.ones(batch, total, dtype=torch.bool, device=device)
