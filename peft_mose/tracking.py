"""Per-call token state: which modality every position of the current forward has.

`generate()` rejects unknown keyword arguments, so ``modality_ids`` cannot ride along to the layers. A
:class:`ModalityTracker` holds the ids of the surrounding call (a *session*) and, from a forward pre-hook on the
transformers model, turns them into a :class:`TokenState` for each forward: absolute positions from the KV cache,
positions past the prompt marked as generated (``Modality.ANSWER``), the batch expanded for beams, padding from the
2-D attention mask. MoSE layers and the attention reallocation both read ``tracker.state``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .modality import Modality, validate_modality_ids

_ATTR = "_mose_modality_tracker"


@dataclass
class TokenState:
    """Modality layout of one forward call of the wrapped model.

    ``modality_ids``, ``valid`` and ``response_rows`` cover every position the call attends to (cached ones
    included): ``[batch, past_length + new_length]``. ``new`` slices give the positions the call computes.
    """

    modality_ids: torch.Tensor
    valid: torch.Tensor
    response_rows: torch.Tensor
    past_length: int
    new_length: int
    prompt_length: int
    compute_router: bool
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.modality_ids.shape[0]

    def new(self, tensor: torch.Tensor) -> torch.Tensor:
        """The positions computed by this call (``[:, past_length:]``) of a ``[batch, total]`` tensor."""
        return tensor[:, self.past_length :]


class _Session:
    def __init__(self, modality_ids: torch.Tensor | None, generate: bool):
        self.modality_ids = modality_ids
        self.generate = generate
        self.calls = 0
        self.prompt_length = 0


class ModalityTracker:
    """Carries ``modality_ids`` from a top-level call into every forward of a transformers model.

    Attach once per model (:meth:`attach` is idempotent and reference counted). A forward called with a
    ``modality_ids`` keyword has it taken out by the pre-hook and used for that call; ``generate`` cannot take the
    keyword, so a :meth:`session` around it supplies the prompt's ids to every forward inside. Otherwise every token
    is text. :attr:`state` stays readable after the call (gradient-checkpoint recomputation
    runs in backward) and is replaced by the next forward, so nothing leaks from one call into the next.
    """

    def __init__(self) -> None:
        self._sessions: list[_Session] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._users = 0
        self.state: TokenState | None = None

    @classmethod
    def attach(cls, model: nn.Module) -> "ModalityTracker":
        """Return the tracker of ``model``, installing one (and its forward pre-hook) if there is none."""
        tracker = getattr(model, _ATTR, None)
        if tracker is None:
            tracker = cls()
            tracker._handle = model.register_forward_pre_hook(tracker._pre_hook, with_kwargs=True)
            object.__setattr__(model, _ATTR, tracker)
        tracker._users += 1
        return tracker

    @staticmethod
    def of(model: nn.Module) -> "ModalityTracker | None":
        """The tracker attached to ``model``, or ``None``."""
        return getattr(model, _ATTR, None)

    def detach(self, model: nn.Module) -> None:
        """Drop one user; the last one removes the hook and the attribute from ``model``."""
        self._users -= 1
        if self._users > 0:
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)
        self.state = None

    @contextlib.contextmanager
    def session(self, modality_ids: torch.Tensor | None, generate: bool = False) -> Iterator[None]:
        """Use ``modality_ids`` (``[batch, prompt_len]``) for the forwards inside the block.

        ``None`` inherits the ids of an enclosing session (or means all text). In a ``generate`` session the ids
        describe the prompt; later positions are generated tokens and the batch may be expanded for beams.
        """
        if modality_ids is not None:
            validate_modality_ids(modality_ids)
        elif self._sessions:
            modality_ids = self._sessions[-1].modality_ids
        self._sessions.append(_Session(modality_ids, generate))
        try:
            yield
        finally:
            self._sessions.pop()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        modality_ids = kwargs.pop("modality_ids", None)
        if modality_ids is None:
            self.state = self._build_state(args, kwargs, self._sessions[-1] if self._sessions else _Session(None, False))
            return None
        validate_modality_ids(modality_ids)
        self.state = self._build_state(args, kwargs, _Session(modality_ids, generate=False))
        return args, kwargs

    def _build_state(self, args: tuple, kwargs: dict, session: _Session) -> TokenState:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        if inputs is None:
            raise ValueError("MoSE could not find `input_ids` or `inputs_embeds` in the model call.")
        batch, new = inputs.shape[0], inputs.shape[1]
        device = inputs.device
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        total = past + new

        first_call = session.calls == 0
        session.calls += 1
        ids = session.modality_ids
        if ids is None:
            ids = torch.full((batch, total if first_call or not session.generate else session.prompt_length),
                             int(Modality.TEXT), dtype=torch.long, device=device)
        ids = ids.to(device=device, dtype=torch.long)
        if first_call:
            session.prompt_length = ids.shape[1]
        prompt = session.prompt_length if session.generate else ids.shape[1]
        if ids.shape[0] != batch:
            if not (session.generate and batch % ids.shape[0] == 0):
                raise ValueError(
                    f"`modality_ids` has batch size {ids.shape[0]} but the model was called with batch size {batch}."
                )
            ids = ids.repeat_interleave(batch // ids.shape[0], dim=0)
        if prompt == total:
            full = ids
        elif session.generate and not first_call and total > prompt:
            tail = torch.full((batch, total - prompt), int(Modality.ANSWER), dtype=torch.long, device=device)
            full = torch.cat([ids, tail], dim=1)
        elif session.generate:
            raise ValueError(f"`modality_ids` has length {prompt} but the prompt passed to generate has {total} tokens.")
        else:
            raise ValueError(
                f"`modality_ids` has length {prompt} but the call covers {total} positions "
                f"({past} cached + {new} new); pass one id per position, cached ones included."
            )

        valid = _valid_positions(kwargs.get("attention_mask"), batch, total, device)
        reuse = past > 0 or (session.generate and not first_call)
        return TokenState(
            modality_ids=full,
            valid=valid,
            response_rows=_response_rows(full, valid),
            past_length=past,
            new_length=new,
            prompt_length=prompt,
            compute_router=not reuse,
        )


def _valid_positions(mask: Any, batch: int, total: int, device: torch.device) -> torch.Tensor:
    """Real (non-padding) positions from a 2-D attention mask; other masks carry no padding we can read."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (batch, total):
        return mask.to(device=device) != 0
    return torch.ones(batch, total, dtype=torch.bool, device=device)


def _response_rows(modality_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows whose next token is part of the response: each sample's last real prompt position and every answer one."""
    answer = modality_ids == int(Modality.ANSWER)
    prompt = valid & ~answer
    positions = torch.arange(modality_ids.shape[1], device=modality_ids.device).expand_as(modality_ids)
    last_prompt = torch.where(prompt, positions, -1).amax(dim=1, keepdim=True)
    return (positions == last_prompt) | (answer & valid)
