"""The modality context of one model call: which modality every position has, and what its readers memoise.

A :class:`ModalityContext` is opened for exactly one top-level call (a forward of a MoSE model, one whole
``generate``, or one forward of a plain model under attention reallocation) and closed after it, exceptions
included. Each forward of the transformers model inside the call gets a :class:`ForwardPositions`, derived from that
forward's own arguments: the past length from the KV cache it receives (an empty cache or none is a prefill), the
batch, the padding from its 2-D attention mask. The core knows no reader: MoSE layers and attention reallocation
keep what they compute once per call or per forward in typed :class:`Memos` of their own.

A KV cache is the one thing a caller carries from one call to the next, so the prompt's modality ids and the memos
that say so (:meth:`CallMemo.carried`, e.g. the router weights) are remembered with it (:class:`PromptRecord`, weakly
keyed by the cache object): a hand-written decode loop that passes the cache back continues the prompt that filled it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._compat.torch import in_backward
from ._compat.transformers import cached_length, call_cache, call_input, output_cache
from .memos import CallMemo, Memos
from .modality import check_modality_shape, validate_modality_ids
from .modality_tokens import ModalityTokens
from .positions import CallKind, ForwardPositions, forward_positions

AdapterKey = tuple[str, str]
"""``(layer name, adapter name)``: where a router weight or routing statistic belongs."""


@dataclass(frozen=True)
class PromptRecord:
    """What a cache's prompt left behind for the calls that continue it: the modality ids of every position it
    computed (``[batch, length]``; ``None``: all text) and its carried memos."""

    modality_ids: Tensor | None
    memos: dict[type, CallMemo]


@dataclass(eq=False)
class ModalityContext:
    """The facts of one call shared by every MoSE layer and the attention backend of one model.

    ``modality_ids`` is what the caller passed (``None``: every token is text), read as ``kind`` says.
    """

    kind: CallKind
    modality_ids: Tensor | None
    needs_grad: bool
    forward: ForwardPositions | None = None
    """The forward being computed (``None`` for a module that takes no token sequence and got no ids)."""
    past_length: int = 0
    """Positions already cached when the current forward started (0: a prefill)."""
    continued: PromptRecord | None = None
    """The record of the cache this call continues, if any."""
    memos: Memos = field(default_factory=Memos, repr=False)
    tokens: ModalityTokens | None = None
    """The model's placeholder tokens: with no ids given, the ids are read off the first forward's ``input_ids``."""
    left_out: Tensor | None = None
    """Positions of a hand-driven call that its forwards count as padding though the model sees them."""
    prompt_mask: Tensor | None = None
    """A ``generate`` call's 2-D ``attention_mask`` of its prompt (its padding), for forwards given a 4-D mask."""


CallStart = Callable[[ModalityContext, tuple, dict], None]
"""Run at the first forward of every model call on a scope, once its positions are known, with its arguments."""

_OPEN: ContextVar[tuple[tuple["ContextScope", ModalityContext], ...]] = ContextVar("peft_mose_contexts", default=())


class ContextScope:
    """Where the layers of one model find the context of the call being computed (a thread- and task-local
    binding, so two models, threads or replicas never see each other's calls).

    Two ways in: :meth:`call` for a model call, :meth:`layer_call` for forwards driven by hand. Between calls the
    scope holds only the weak cache records, the closed memos of the last call (:attr:`last_call`, statistics,
    never read by computation) and, for activation checkpointing, the last call that built an autograd graph, read
    only while autograd runs backward. While a call is open the scope also mirrors it in a plain attribute, which
    compiled code reads instead of the ``ContextVar`` (Dynamo cannot trace ``ContextVar.get``); so a compiled model
    runs one call at a time.
    """

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary[Any, PromptRecord] = weakref.WeakKeyDictionary()
        self._backward: ModalityContext | None = None
        self._call_starts: list[CallStart] = []
        self._compiled_view: ModalityContext | None = None
        self.last_call = Memos()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # copies and pickles of a model start with no calls behind them

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def current(self) -> ModalityContext | None:
        """The open context of this scope; during backward, the one of the call whose graph is being recomputed."""
        if torch.compiler.is_compiling():
            return self._compiled_view
        context = self.open_context()
        if context is not None:
            return context
        if self._backward is not None and in_backward():
            return self._backward
        return None

    def open_context(self) -> ModalityContext | None:
        """The innermost context open on this scope, if any."""
        for scope, context in reversed(_OPEN.get()):
            if scope is self:
                return context
        return None

    @contextlib.contextmanager
    def call(
        self, model: nn.Module, modality_ids: Tensor | None, kind: CallKind, starting: tuple[tuple, dict] | None = None,
        tokens: ModalityTokens | None = None,
    ) -> Iterator[ModalityContext]:
        """One call of ``model`` (the transformers model whose forwards it covers), with hooks on ``model`` for
        exactly that call. Inside an open call it joins that one (a ``generate`` entered by PEFT's forward hook turns
        it into a generate call). ``starting``: the call opens inside a forward pre-hook of ``model``, whose
        ``(args, kwargs)`` these are, so that forward is entered at once. ``tokens``: the model's placeholder tokens,
        which give the ids when the caller passes none (read off the call's first forward)."""
        context = self.open_context()
        if context is not None:
            if kind is CallKind.GENERATE:
                context.kind = kind
            yield context
            return
        if modality_ids is not None:
            validate_modality_ids(modality_ids)
        context = ModalityContext(kind, modality_ids, needs_grad=torch.is_grad_enabled(), tokens=tokens)
        with self._opened(context):
            pre = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True)
            post = model.register_forward_hook(self._post_forward, prepend=True)
            try:
                if starting is not None:
                    self._enter_forward(context, *starting)
                yield context
            finally:
                pre.remove()
                post.remove()

    @contextlib.contextmanager
    def layer_call(self, modality_ids: Tensor, left_out: Tensor | None = None) -> Iterator[ModalityContext]:
        """A call driven by hand over ``modality_ids`` (``[batch, seq]``, every position real): MoSE layers called
        directly (one prefill), or extra forwards of the model made while a call is open (the conflict gate's
        probes), each covering exactly these positions, which leave the open call as it was. ``left_out`` (bool
        ``[batch, seq]``): positions the forwards see but count as padding (the gate's masked modality)."""
        validate_modality_ids(modality_ids)
        ids = modality_ids.long()
        context = ModalityContext(
            CallKind.FORWARD, modality_ids, needs_grad=torch.is_grad_enabled(), left_out=left_out
        )
        context.forward = ForwardPositions(ids, torch.ones_like(ids, dtype=torch.bool), 0, ids.shape[1])
        with self._opened(context):
            yield context

    @contextlib.contextmanager
    def on_call_start(self, callback: CallStart) -> Iterator[None]:
        """Inside the block, ``callback(context, args, kwargs)`` runs at the first forward of every model call on
        this scope (its prefill, for ``generate``), once the forward's positions are known."""
        self._call_starts.append(callback)
        try:
            yield
        finally:
            self._call_starts.remove(callback)

    @contextlib.contextmanager
    def _opened(self, context: ModalityContext) -> Iterator[None]:
        token = self._set_open(_OPEN.get() + ((self, context),))
        try:
            yield
        finally:
            _OPEN.reset(token)
            self._compiled_view = self.open_context()
            self._close(context)

    def _set_open(self, entries: tuple[tuple[ContextScope, ModalityContext], ...]) -> Token:
        token = _OPEN.set(entries)
        self._compiled_view = self.open_context()
        return token

    def _close(self, context: ModalityContext) -> None:
        self.last_call = Memos(context.memos.derived(lambda memo: memo.closed()))
        if context.needs_grad and context.forward is not None:
            self._backward = context

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        context = self.open_context()
        if context is None:
            return None
        self._enter_forward(context, args, kwargs)
        if "modality_ids" not in kwargs:
            return None
        # a plain PeftModel (task_type=None) hands the model call's keywords to the wrapped module unchanged
        return args, {k: v for k, v in kwargs.items() if k != "modality_ids"}

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        context = self.open_context()
        cache = output_cache(output)
        if context is None or cache is None:
            return
        if not context.past_length:
            ids = None if context.forward is None else context.forward.modality_ids
            self._records[cache] = PromptRecord(ids, context.memos.derived(lambda memo: memo.carried()))
        elif cache not in self._records and context.continued is not None:
            self._records[cache] = context.continued

    def _enter_forward(self, context: ModalityContext, args: tuple, kwargs: dict) -> None:
        first = context.forward is None
        context.past_length = cached_length(call_cache(kwargs))
        context.forward = self._positions(context, args, kwargs)
        if first:
            for callback in list(self._call_starts):
                callback(context, args, kwargs)

    def _positions(self, context: ModalityContext, args: tuple, kwargs: dict) -> ForwardPositions | None:
        """The forward's positions, or ``None`` for a module that takes no token sequence and gets no ids (then its
        MoSE layers see every token as text, whatever their input's shape)."""
        inputs = call_input(args, kwargs)
        if inputs is None:
            if context.modality_ids is None:
                return None
            raise ValueError(
                "`modality_ids` were given, but the model call has no token input (`input_ids`, `inputs_embeds` or "
                "a positional tensor of token ids) to match them to."
            )
        batch, new = inputs.shape[0], (inputs.shape[1] if inputs.dim() > 1 else 1)
        past = context.past_length
        if context.modality_ids is None and context.tokens is not None and context.forward is None:
            context.modality_ids = context.tokens.call_ids(inputs, kwargs, past)
        record = self._records.get(call_cache(kwargs)) if past else None
        if past and context.continued is None:
            context.continued = record
        if record is not None:
            context.memos.seed(record.memos)
        cached_prompt = None if record is None else record.modality_ids
        positions = forward_positions(
            context.modality_ids, context.kind, cached_prompt, batch, new=new, past=past,
            attention_mask=kwargs.get("attention_mask"), prompt_mask=context.prompt_mask, device=inputs.device,
        )
        if context.left_out is not None:
            positions.valid = positions.valid & ~context.left_out.to(positions.valid.device)
        return positions


def start_generate(context: ModalityContext, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Check a ``generate`` call of ``model`` before it runs: no chunked prefill (its first forward, which fixes the
    prompt's ids and router weight, would see only the first chunk), and ids that fit the prompt exactly (beams
    expand both alike later). Keeps the prompt's 2-D ``attention_mask``, for forwards that get a 4-D one (a static
    cache's) and would otherwise count padding as tokens."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
    if chunk is not None:
        raise ValueError(
            f"generate(prefill_chunk_size={chunk}) is not supported: the prompt's modality ids and MoSE's router "
            "weight (Eq. 4, pooled over the whole prompt) are fixed by the call's first forward, which a chunked "
            f"prefill runs on the first {chunk} tokens only. Pass prefill_chunk_size=None."
        )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        context.prompt_mask = mask
    if context.modality_ids is None:
        return
    inputs = call_input(args, kwargs)
    if inputs is None:
        raise ValueError("`modality_ids` describe a prompt, but generate got neither `input_ids` nor `inputs_embeds`.")
    check_modality_shape(context.modality_ids, batch=inputs.shape[0], length=inputs.shape[1])


