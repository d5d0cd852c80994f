"""The modality context of one model call: which modality every position has, prefill or decode, the router weight.

A :class:`ModalityContext` is opened for exactly one top-level call (a forward of a MoSE model, one whole
``generate``, or, for a plain model inside :func:`~peft_mose.attention_reallocation`, one forward) and closed after
it, exceptions included. MoSE layers and the attention backend read it through the :class:`ContextScope` of their
model; nothing in it survives into the next call. Each forward of the transformers model inside the call gets a
:class:`StepLayout`, derived from that forward's own arguments: the past length from the KV cache it receives (an
empty cache or none is a prefill), the batch, the padding from its 2-D attention mask.

A KV cache is the one thing a caller carries from one call to the next, so the prompt's modality ids and router
weights are remembered with it (:class:`PromptRecord`, weakly keyed by the cache object): a hand-written decode loop
that passes the cache back continues the prompt that filled it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._compat.torch import in_backward
from ._compat.transformers import cached_length, call_cache, call_input, output_cache
from .modality import Modality, validate_modality_ids

if TYPE_CHECKING:
    from transformers import Cache

    from .attention.gate import GateDecisions

AdapterKey = tuple[str, str]
"""``(layer name, adapter name)``: where a router weight or routing statistic belongs."""


@dataclass(frozen=True)
class PromptRecord:
    """What a cache's prompt left behind for the calls that continue it: the modality ids of every position it
    computed (``[batch, length]``; ``None``: all text) and each MoSE layer's router weight ``lambda`` (``[batch]``)."""

    modality_ids: Tensor | None
    router_weights: dict[AdapterKey, Tensor]


@dataclass(eq=False)
class StepLayout:
    """Modality layout of one forward of the transformers model inside a call.

    ``modality_ids``, ``valid`` and :attr:`response_rows` cover every position the forward attends to (cached ones
    included): ``[batch, past_length + new_length]``. :meth:`new` slices out the positions it computes. The memos are
    filled by their readers, once per forward: MoSE's expert masks (by expert modality sets) and AR's key layouts.
    """

    modality_ids: Tensor
    valid: Tensor
    past_length: int
    new_length: int
    prefill: bool
    uniform: Modality | None = None
    """The modality of every new position when the call's structure says so (a decode step past the prompt:
    ``ANSWER``), so that no layer reads the ids to find out."""
    expert_masks: dict[Any, Any] = field(default_factory=dict, repr=False)
    attention_layouts: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.modality_ids.shape[0]

    @functools.cached_property
    def response_rows(self) -> Tensor:
        """Rows whose next token is part of the response: each sample's last real prompt position and every answer
        one (read by attention reallocation only, so made on its first read)."""
        answer = self.modality_ids == int(Modality.ANSWER)
        prompt = self.valid & ~answer
        positions = torch.arange(self.modality_ids.shape[1], device=self.modality_ids.device).expand_as(answer)
        last_prompt = torch.where(prompt, positions, -1).amax(dim=1, keepdim=True)
        return (positions == last_prompt) | (answer & self.valid)

    def new(self, tensor: Tensor) -> Tensor:
        """The positions computed by this forward (``[:, past_length:]``) of a ``[batch, total]`` tensor."""
        return tensor[:, self.past_length :]


@dataclass(eq=False)
class ModalityContext:
    """Per-call facts shared by every MoSE layer and the attention backend of one model.

    ``modality_ids`` is what the caller passed (``None``: every token is text). With ``prompt=True`` (``generate``,
    plain models under attention reallocation) they describe the prompt: positions after it are generated
    (``Modality.ANSWER``) and the batch may be a multiple of theirs (beams, ``num_return_sequences``). Otherwise they
    cover every position of the forward, cached ones included. ``generate=True`` marks one whole ``generate``, whose
    forwards without a cache (``use_cache=False``) may also cover generated positions.
    """

    modality_ids: Tensor | None
    prompt: bool
    generate: bool = False
    router_weights: dict[AdapterKey, Tensor] = field(default_factory=dict)
    """``lambda`` (Eq. 3) of the prompt, per MoSE layer and adapter: computed at prefill, read by decode steps."""
    expert_weights: dict[AdapterKey, Callable[[], Tensor]] = field(default_factory=dict)
    """Each expert's mean token gate in the call's last forward, ``[batch, 3, N]`` (diagnostics, computed when the
    call closes, so that decode steps do not pay for them)."""
    uniform_plans: dict[AdapterKey, tuple | None] = field(default_factory=dict)
    """Per MoSE layer and adapter: the weight views and expert weights of uniform (decode) steps, made once."""
    step: StepLayout | None = None
    """The forward being computed."""
    continued: PromptRecord | None = None
    """The record of the cache this call continues, if any."""
    cached: int = 0
    """Positions already cached when the current forward started (0: a prefill)."""
    needs_grad: bool = False
    gate_decisions: GateDecisions | None = None
    """Attention reallocation's conflict gate: which samples of this call it reallocates (decided at the call's first
    forward, :mod:`peft_mose.attention.gate`)."""


CallStart = Callable[[ModalityContext, tuple, dict], None]
"""Run at the first forward of every call on a scope, after its layout is known, with that forward's arguments."""

_OPEN: ContextVar[tuple[tuple["ContextScope", ModalityContext], ...]] = ContextVar("peft_mose_contexts", default=())


class ContextScope:
    """Where the layers of one model find the context of the call being computed (a thread- and task-local
    binding, so two models, threads or replicas never see each other's calls).

    Holds no per-call state between calls except: the weak cache records (:class:`PromptRecord`), the routing
    statistics of the last call (read by :meth:`~peft_mose.MoSEModel.routing_stats`, never by computation), and,
    for activation checkpointing, the last call that built an autograd graph, read only while autograd runs backward.
    While a call is open the scope also mirrors its context in a plain attribute, which compiled code reads instead of
    the ``ContextVar`` (Dynamo cannot trace ``ContextVar.get``); so a compiled model runs one call at a time.
    The callbacks of :meth:`on_call_start` are installed by a block (attention reallocation's gate) for its duration.
    """

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary[Cache, PromptRecord] = weakref.WeakKeyDictionary()
        self._backward: ModalityContext | None = None
        self._call_starts: list[CallStart] = []
        self._compiled_view: ModalityContext | None = None
        self.last_routing: dict[AdapterKey, dict[str, Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles of a model start with no calls behind them
        return {"last_routing": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def current(self) -> ModalityContext | None:
        """The open context of this scope; during backward, the one of the call whose graph is being recomputed."""
        if torch.compiler.is_compiling():
            # Dynamo cannot trace ContextVar.get (a graph break per layer): compiled code reads the scope's mirror
            # of its open context, kept by _set_open (torch.compile runs one call at a time on a module)
            return self._compiled_view
        context = self.open_context()
        if context is not None:
            return context
        if self._backward is not None and in_backward():
            return self._backward
        return None

    def open_context(self) -> ModalityContext | None:
        """The context of the call in progress on this scope, if one is open."""
        for scope, context in reversed(_OPEN.get()):
            if scope is self:
                return context
        return None

    def step(self) -> StepLayout | None:
        context = self.current()
        return None if context is None else context.step

    @contextlib.contextmanager
    def call(self, model: nn.Module, modality_ids: Tensor | None, generate: bool) -> Iterator[ModalityContext]:
        """Open a context for one forward or ``generate`` of ``model`` (the transformers model whose forwards it
        covers), with hooks on ``model`` for exactly that call."""
        context = _new_context(modality_ids, prompt=generate, generate=generate)
        with self._opened(context):
            pre = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            post = model.register_forward_hook(self._post_forward)
            try:
                yield context
            finally:
                pre.remove()
                post.remove()

    @contextlib.contextmanager
    def calls_of(self, model: nn.Module, modality_ids: Tensor) -> Iterator[None]:
        """Inside the block, every outermost forward and every ``generate`` of ``model`` (a plain transformers model
        under attention reallocation, which cannot take the ids itself) is one call with ``modality_ids`` as its
        prompt. ``generate`` is wrapped by an instance attribute for the block; both are removed on exit."""
        _new_context(modality_ids, prompt=True, generate=False)  # checks the ids once, up front
        opened: list[ModalityContext] = []

        def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.open_context() is not None:
                self._pre_forward(module, args, kwargs)
                return
            context = _new_context(modality_ids, prompt=True, generate=False)
            self._enter_forward(context, args, kwargs)
            self._set_open(_OPEN.get() + ((self, context),))
            opened.append(context)

        def post_forward(module: nn.Module, args: tuple, output: Any) -> None:
            self._post_forward(module, args, output)
            context = self.open_context()
            if opened and opened[-1] is context:
                self._remove(opened.pop())
                self._close(context)

        generate = model.generate
        had_attribute = "generate" in model.__dict__

        def generate_in_context(*args: Any, **kwargs: Any) -> Any:
            check_prompt(modality_ids, args, kwargs)
            with self._opened(_new_context(modality_ids, prompt=True, generate=True)):
                return generate(*args, **kwargs)

        pre = model.register_forward_pre_hook(pre_forward, with_kwargs=True)
        post = model.register_forward_hook(post_forward, always_call=True)
        model.generate = generate_in_context
        try:
            yield
        finally:
            pre.remove()
            post.remove()
            if had_attribute:
                model.generate = generate
            else:
                del model.generate
            while opened:
                self._remove(opened.pop())

    @contextlib.contextmanager
    def on_call_start(self, callback: CallStart) -> Iterator[None]:
        """Inside the block, ``callback(context, args, kwargs)`` runs at the first forward of every call on this
        scope (its prefill, for ``generate``), once the forward's layout is in ``context.step``; e.g. the conflict
        gate, which probes the prompt before the call computes anything."""
        self._call_starts.append(callback)
        try:
            yield
        finally:
            self._call_starts.remove(callback)

    @contextlib.contextmanager
    def side_call(self, modality_ids: Tensor) -> Iterator[ModalityContext]:
        """A context for extra forwards of the model made while a call is open (the conflict gate's probes), each
        covering exactly ``modality_ids`` ``[batch, seq]``: the call's hooks route them here, so the call's own context
        (layout, router weights, cache records) and the routing statistics stay as they were."""
        context = _new_context(modality_ids, prompt=False, generate=False)
        token = self._set_open(_OPEN.get() + ((self, context),))
        try:
            yield context
        finally:
            self._reset_open(token)

    @contextlib.contextmanager
    def layer_call(self, modality_ids: Tensor) -> Iterator[ModalityContext]:
        """A context for calling MoSE layers directly (tests, benchmarks): one prefill over ``modality_ids``
        (``[batch, seq]``, every position real), with no model around the layers."""
        context = _new_context(modality_ids, prompt=False, generate=False)
        ids = modality_ids.long()
        valid = torch.ones_like(ids, dtype=torch.bool)
        context.step = StepLayout(ids, valid, 0, ids.shape[1], prefill=True)
        with self._opened(context):
            yield context

    @contextlib.contextmanager
    def _opened(self, context: ModalityContext) -> Iterator[None]:
        token = self._set_open(_OPEN.get() + ((self, context),))
        try:
            yield
        finally:
            self._reset_open(token)
            self._close(context)

    def _set_open(self, entries: tuple[tuple[ContextScope, ModalityContext], ...]) -> Token:
        token = _OPEN.set(entries)
        self._compiled_view = self.open_context()
        return token

    def _reset_open(self, token: Token) -> None:
        _OPEN.reset(token)
        self._compiled_view = self.open_context()

    def _remove(self, context: ModalityContext) -> None:
        """Take ``context`` off the open ones (by identity: hooks of nested blocks close in any order)."""
        self._set_open(tuple(entry for entry in _OPEN.get() if entry[1] is not context))

    def _close(self, context: ModalityContext) -> None:
        self.last_routing = {
            key: {"lambda": context.router_weights.get(key), "expert_weights": mean_gates()}
            for key, mean_gates in context.expert_weights.items()
        }
        if context.needs_grad and context.step is not None:
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
        if not context.cached:
            ids = None if context.step is None else context.step.modality_ids
            self._records[cache] = PromptRecord(ids, dict(context.router_weights))
        elif cache not in self._records and context.continued is not None:
            self._records[cache] = context.continued

    def _enter_forward(self, context: ModalityContext, args: tuple, kwargs: dict) -> None:
        first = context.step is None
        context.cached = cached_length(call_cache(kwargs))
        context.step = self._step(context, args, kwargs)
        if first:
            for callback in list(self._call_starts):
                callback(context, args, kwargs)

    def _step(self, context: ModalityContext, args: tuple, kwargs: dict) -> StepLayout | None:
        """The forward's layout, or ``None`` for a module that takes no token sequence and gets no ids (then its
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
        device = inputs.device
        cache, past = call_cache(kwargs), context.cached
        total = past + new
        record = self._records.get(cache) if past else None
        if past and context.continued is None:
            context.continued = record
        if record is not None and not context.router_weights:
            context.router_weights.update(record.router_weights)
        ids, uniform = _full_ids(context, record, batch, past, new, device)
        valid = _valid_positions(kwargs.get("attention_mask"), batch, total, device)
        return StepLayout(
            modality_ids=ids,
            valid=valid,
            past_length=past,
            new_length=new,
            prefill=past == 0,
            uniform=uniform,
        )


def check_prompt(modality_ids: Tensor, args: tuple, kwargs: dict) -> None:
    """``modality_ids`` given to ``generate`` must fit its prompt exactly (beams expand both alike later)."""
    inputs = call_input(args, kwargs)
    if inputs is None:
        raise ValueError("`modality_ids` describe a prompt, but generate got neither `input_ids` nor `inputs_embeds`.")
    validate_modality_ids(modality_ids, batch=inputs.shape[0], length=inputs.shape[1])


def _new_context(modality_ids: Tensor | None, prompt: bool, generate: bool) -> ModalityContext:
    if modality_ids is not None:
        validate_modality_ids(modality_ids)
    return ModalityContext(modality_ids, prompt=prompt, generate=generate, needs_grad=torch.is_grad_enabled())


def _full_ids(
    context: ModalityContext, record: PromptRecord | None, batch: int, past: int, new: int, device: torch.device
) -> tuple[Tensor, Modality | None]:
    """Modality ids of every position of a forward (``[batch, past + new]``), checked against its shape, and the
    modality of all new positions where it follows from the shape alone (new positions past the prompt)."""
    total = past + new
    ids, prompt, source = context.modality_ids, context.prompt, "`modality_ids`"
    if ids is None and record is not None and record.modality_ids is not None:
        ids, prompt, source = record.modality_ids, True, "the prompt that filled the cache"
    if ids is None:
        return torch.full((batch, total), int(Modality.TEXT), dtype=torch.long, device=device), Modality.TEXT
    ids = ids.to(device=device, dtype=torch.long)
    length = ids.shape[1]
    if ids.shape[0] != batch:
        if not (prompt and batch % ids.shape[0] == 0):
            raise ValueError(
                f"{source} has batch size {ids.shape[0]} but the model was called with batch size {batch}."
            )
        ids = ids.repeat_interleave(batch // ids.shape[0], dim=0)
    if length == total:
        return ids, None
    if not prompt:
        raise ValueError(
            f"`modality_ids` has length {length} but the call covers {total} positions ({past} cached + {new} "
            "new); pass one id per position, cached ones included."
        )
    if total < length or (past == 0 and not context.generate):
        raise ValueError(
            f"{source} describes a prompt of {length} tokens but the model was called on {total} positions "
            f"({past} cached + {new} new); pass the ids of this prompt."
        )
    answer = torch.full((batch, total - length), int(Modality.ANSWER), dtype=torch.long, device=device)
    return torch.cat([ids, answer], dim=1), (Modality.ANSWER if past >= length else None)


def _valid_positions(mask: Any, batch: int, total: int, device: torch.device) -> Tensor:
    """Real (non-padding) positions from a 2-D attention mask; other masks carry no padding we can read."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (batch, total):
        return mask.to(device=device) != 0
    return torch.ones(batch, total, dtype=torch.bool, device=device)
