"""Attention reallocation inside a transformers model, through transformers' attention registry.

:func:`attention_reallocation` switches a model to the attention implementation ``"mosear_<base>"`` (registered with
``AttentionInterface`` and ``AttentionMaskInterface``), where ``<base>`` is the implementation the model had
(``"sdpa"`` or ``"eager"``), and restores the previous one on exit. In the chosen layers, the registered function
computes the rows that produce response tokens (each sample's last prompt position, every generated token)
explicitly: their attention weights in float32 (float64 for a float64 model), changed by :mod:`.functional`, times
V. All other rows come from the base implementation, unchanged (the prefill keeps SDPA's kernels); a decode step,
whose rows are all response rows, does not run the base at all, so AR reads the KV cache once, like the model
without it. With a conflict gate (:mod:`.gate`), only the samples it flags get the explicit rows; the others keep the
base rows bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .._compat.transformers import attn_implementation, uses_attention_interface
from ..context import ContextScope, ModalityContext, start_generate
from ..modality import Modality, validate_modality_ids
from ..modality_tokens import ModalityTokens, model_tokens
from ..model import mose_tuner
from ..positions import CallKind, ForwardPositions
from .diagnostics import ReallocationDiagnostics
from .gate import (
    DEFAULT_GATE_THRESHOLD,
    ConflictDetector,
    GateDecisions,
    LabelConflictDetector,
    check_decisions,
    check_gate_labels,
    describe_gate,
    gate_inputs,
)
from .functional import (
    amplify_visual_logits,
    amplify_visual_weights,
    check_alpha,
    check_tau,
    compute_dtype,
    modality_totals,
    plan_reallocation,
    stack_masks,
    stacked_modality_mass,
    stacked_reallocation_delta,
)
from .strategy import PaiMode, Strategy

ROW_MODES = ("response", "all")
GATES = ("conflict",)
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
PREFIX = "mosear_"


@dataclass(frozen=True)
class ReallocationSettings:
    """What the attention backend does; built and validated by :func:`attention_reallocation`."""

    strategy: Strategy
    tau: float
    alpha: float
    pai_mode: PaiMode
    rows: str
    layers: frozenset[int]
    gate: ConflictDetector | None = None
    """Decides per call which samples AR acts on (``None``: all)."""


@dataclass
class AttentionReallocation:
    """Yielded by :func:`attention_reallocation`: its settings, with ``record=True`` the diagnostics, and with a gate
    the decisions of every call made in the block, in order (each computed by and for that call alone)."""

    settings: ReallocationSettings
    diagnostics: ReallocationDiagnostics | None
    gate_decisions: list[GateDecisions] = field(default_factory=list)


@dataclass(frozen=True)
class _Reallocate:
    """AR (Eq. 5-14, threshold ``tau``) on the response rows of the samples the gate flags."""

    tau: float
    needs = (Modality.VISUAL, Modality.AUDIO)

    @property
    def changes_attention(self) -> bool:
        return self.tau != math.inf

    def __call__(self, scores: Tensor, bias: Tensor | None, weights: Tensor, keys: _KeyMasks) -> Tensor:
        """The rows' new weights, or ``weights`` itself when AR changes nothing (checked only on CPU, where it is
        cheaper than the work it saves, while on GPUs it would sync every layer)."""
        check = weights.device.type == "cpu"
        visual_mass, audio_mass = stacked_modality_mass(weights, keys.stacked)
        if check and not bool((modality_totals(visual_mass, audio_mass)[2] > self.tau).any()):
            return weights
        plan = plan_reallocation(visual_mass, audio_mass, self.tau, keys.gated)
        if check and not bool(plan.biased.any()):
            return weights
        return weights + stacked_reallocation_delta(weights, keys.stacked, plan)


@dataclass(frozen=True)
class _AmplifyVisualWeights:
    """PAI as the MoSEAR paper describes it (``pai_mode="weights"``)."""

    alpha: float
    changes_attention = True
    needs = (Modality.VISUAL,)

    def __call__(self, scores: Tensor, bias: Tensor | None, weights: Tensor, keys: _KeyMasks) -> Tensor:
        return amplify_visual_weights(weights, keys.visual, self.alpha)


@dataclass(frozen=True)
class _AmplifyVisualLogits:
    """PAI as its reference code does it (``pai_mode="logits"``)."""

    alpha: float
    changes_attention = True
    needs = (Modality.VISUAL,)

    def __call__(self, scores: Tensor, bias: Tensor | None, weights: Tensor, keys: _KeyMasks) -> Tensor:
        boosted = amplify_visual_logits(scores, keys.visual, self.alpha)
        return torch.softmax(boosted if bias is None else boosted + bias, dim=-1)


_Rule = _Reallocate | _AmplifyVisualWeights | _AmplifyVisualLogits


def _rule(settings: ReallocationSettings) -> _Rule:
    """What the chosen rows' weights become, chosen once per block."""
    if settings.strategy is Strategy.PAI:
        return (_AmplifyVisualWeights if settings.pai_mode is PaiMode.WEIGHTS else _AmplifyVisualLogits)(settings.alpha)
    return _Reallocate(settings.tau)


@dataclass
class _Active:
    settings: ReallocationSettings
    rule: _Rule
    scope: ContextScope
    diagnostics: ReallocationDiagnostics | None
    target: nn.Module
    gate_decisions: list[GateDecisions]


# Attention modules of the models inside an `attention_reallocation` block, and what to do in them.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _Active] = weakref.WeakKeyDictionary()


@dataclass
class _Restore:
    """What an open `attention_reallocation` block restores on exit: the attention implementation and entries."""

    previous: str
    saved: dict[nn.Module, _Active | None]


# The open blocks' restores, by id of their `_Active`: a block exited out of order hands its own to the blocks it held.
_OPEN: dict[int, _Restore] = {}


def _hand_over(active: _Active, restore: _Restore) -> None:
    """Give the open blocks that would restore ``active`` on exit what ``active``'s block would have restored."""
    for other in _OPEN.values():
        if any(entry is active for entry in other.saved.values()):
            other.previous = restore.previous
            other.saved = {m: restore.saved[m] if e is active else e for m, e in other.saved.items()}


# True while a conflict detector runs its probes: every attention module runs its base implementation, unrecorded.
_SUSPENDED: ContextVar[bool] = ContextVar("peft_mose_ar_suspended", default=False)


@dataclass
class _Rows:
    """Query rows of one call, padded to the same count per sample: ``index`` ``[batch, r]`` (``None``: all rows
    in order) and ``ok`` ``[batch, r]`` (False for padding entries; ``all_ok`` if there are none)."""

    index: Tensor | None
    ok: Tensor
    all_ok: bool


@dataclass
class _KeyMasks:
    """The modalities of the ``k_len`` keys of one forward's attention calls, and the query rows AR changes."""

    modality_ids: Tensor
    valid: Tensor
    visual: Tensor
    audio: Tensor
    stacked: Tensor
    """``visual`` and ``audio`` as float columns (:func:`~.functional.stack_masks`)."""
    gated: Tensor | None
    """The samples the conflict gate lets AR act on, ``[batch]`` (``None``: no gate, all)."""
    rows: _Rows | None
    recorded: _Rows | None
    """With ``record=True``: the response rows, whose statistics are recorded at their key positions below."""
    recorded_positions: Tensor | None


def _select_rows(selected: Tensor) -> _Rows | None:
    """The True positions of ``selected`` ``[batch, q_len]``, or ``None`` if there are none."""
    counts = selected.sum(1)
    count = int(counts.max()) if selected.numel() else 0
    if count == 0:
        return None
    all_ok = bool((counts == count).all())
    if count == selected.shape[1]:
        return _Rows(index=None, ok=selected, all_ok=all_ok)
    # A stable sort puts each sample's selected rows first; the distinct unselected rows after them pad the count.
    index = torch.sort(selected.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]
    return _Rows(index=index, ok=selected.gather(1, index), all_ok=all_ok)


def _row_positions(rows: _Rows, q_len: int) -> Tensor:
    """The query positions (within the forward's new rows) of ``rows``, ``[batch, r]``."""
    if rows.index is not None:
        return rows.index
    return torch.arange(q_len, device=rows.ok.device).expand_as(rows.ok)


@dataclass
class _ForwardMemo:
    """AR's per-forward memo: the response rows and the key masks by ``(all rows, recorded, k_len)``."""

    response_rows: Tensor | None = None
    key_masks: dict[tuple[bool, bool, int], _KeyMasks] = field(default_factory=dict)


@dataclass
class _CallGate:
    """AR's per-call memo: the conflict gate's decisions for the call (made at its first forward)."""

    decisions: GateDecisions | None = None


def _response_rows(positions: ForwardPositions, memo: _ForwardMemo) -> Tensor:
    """Rows whose next token is part of the response, ``[batch, total]``: each sample's last real prompt position and
    every answer one."""
    if memo.response_rows is None:
        answer = positions.modality_ids == int(Modality.ANSWER)
        prompt = positions.valid & ~answer
        columns = torch.arange(answer.shape[1], device=answer.device).expand_as(answer)
        last_prompt = torch.where(prompt, columns, -1).amax(dim=1, keepdim=True)
        memo.response_rows = (columns == last_prompt) | (answer & positions.valid)
    return memo.response_rows


def _key_masks(
    positions: ForwardPositions, batch: int, q_len: int, k_len: int, sliding_window: int | None, all_rows: bool,
    record: bool, gated: Tensor | None, needs: tuple[Modality, ...],
) -> _KeyMasks:
    """The key masks of an attention call with ``k_len`` keys (``sliding_window``: the call's, if any)."""
    memo = positions.memos.get(_ForwardMemo)
    key = (all_rows, record, k_len, needs)
    if key in memo.key_masks:
        return memo.key_masks[key]
    total = positions.past_length + positions.new_length
    # A cache holds positions in order: all of them, then unused slots (a static cache), or, once a sliding-window
    # layer has dropped the oldest, the last `k_len` (the keys its update returns, for dynamic and static caches).
    dropped = max(total - k_len, 0)
    windowed = sliding_window is not None and k_len >= sliding_window - 1 + q_len
    if positions.batch_size != batch or positions.new_length != q_len or (dropped and not windowed):
        raise ValueError(
            f"Attention reallocation expected {positions.new_length} query rows over {total} positions for batch "
            f"{positions.batch_size}, got an attention call with batch {batch}, {q_len} queries and {k_len} keys "
            f"(sliding window {sliding_window}; attention over other sequences is not supported)."
        )
    if dropped and record:
        raise ValueError(
            f"record=True needs the keys of every position, but a sliding-window cache layer holds only the last "
            f"{k_len} of {total}: generate with a cache that keeps every position (e.g. cache=DynamicCache(), "
            "past_key_values= before transformers 5.24), or without recording."
        )
    ids = nn.functional.pad(positions.modality_ids[:, dropped:], (0, k_len + dropped - total), value=int(Modality.TEXT))
    valid = nn.functional.pad(positions.valid[:, dropped:], (0, k_len + dropped - total), value=False)
    visual = valid & (ids == int(Modality.VISUAL))
    audio = valid & (ids == int(Modality.AUDIO))
    selected = positions.valid if all_rows else _response_rows(positions, memo)
    if gated is not None:
        selected = selected & gated[:, None]
    for needed in needs:  # a sample without a modality the rule acts on keeps the base rows, bit for bit
        selected = selected & (visual if needed is Modality.VISUAL else audio).any(1, keepdim=True)
    recorded = _select_rows(positions.new(_response_rows(positions, memo))) if record else None
    masks = memo.key_masks[key] = _KeyMasks(
        modality_ids=ids,
        valid=valid,
        visual=visual,
        audio=audio,
        stacked=stack_masks(visual, audio),
        gated=gated,
        rows=_select_rows(positions.new(selected)),
        recorded=recorded,
        recorded_positions=None if recorded is None else positions.past_length + _row_positions(recorded, q_len),
    )
    return masks


def _gather_rows(tensor: Tensor, rows: _Rows) -> Tensor:
    """Rows ``rows.index`` of dim 2 of ``[batch, x, q_len, y]`` (a size-1 batch is broadcast)."""
    if rows.index is None:
        return tensor
    batch = rows.index.shape[0]
    tensor = tensor.expand(batch, *tensor.shape[1:])
    index = rows.index[:, None, :, None].expand(batch, tensor.shape[1], -1, tensor.shape[-1])
    return tensor.gather(2, index)


# Keyword arguments the registered attention functions receive, besides `scaling` and `dropout`. HONOURED ones
# shape the weights and the explicit rows apply them exactly as the model's eager attention does; INERT ones do not
# touch the weights. Any other one with a value is refused (`_logit_options`): it may change the weights in a way AR
# would not reproduce (e.g. GPT-OSS's attention sinks `s_aux`), so a new model cannot make AR silently wrong.
HONOURED_KWARGS = frozenset({"softcap", "sliding_window", "is_causal"})
INERT_KWARGS = frozenset(
    {"position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states", "output_router_logits"}
)


@dataclass(frozen=True)
class _LogitOptions:
    """What shapes one attention call's weights besides the mask: scale, tanh soft-capping (Gemma 2's ``softcap``),
    causality for a call without a mask, and the sliding window (which transformers' masks contain; it tells
    :func:`_key_masks` which keys a sliding-window cache layer returns)."""

    scaling: float | None
    softcap: float | None
    sliding_window: int | None
    is_causal: bool


def _logit_options(module: nn.Module, scaling: float | None, kwargs: dict, base: str) -> _LogitOptions:
    """The options of one attention call; ``ValueError`` naming any keyword AR does not know to be harmless, or
    soft-capping on a base that ignores it."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in HONOURED_KWARGS | INERT_KWARGS)
    if unknown:
        raise ValueError(
            f"Attention reallocation cannot reproduce the attention of {type(module).__name__}: its attention "
            f"function receives {unknown}, which may change the attention weights and which AR does not apply to "
            f"the rows it computes (it applies scaling, {', '.join(sorted(HONOURED_KWARGS))}). Run this model "
            "without attention_reallocation."
        )
    if kwargs.get("softcap") is not None and base != "eager":
        # transformers before 5.23 offers SDPA for Gemma 2, whose SDPA function drops `softcap`: AR's soft-capped
        # rows would then not be the model's
        raise ValueError(
            f"Attention reallocation cannot run on {type(module).__name__} with {base!r} attention: the model "
            f"soft-caps its attention logits (softcap={kwargs['softcap']}), which transformers' {base!r} attention "
            "ignores, so the rows AR computes would not be the model's. Call model.set_attn_implementation('eager') "
            "first (transformers 5.23 and later refuse SDPA for such models)."
        )
    is_causal = kwargs.get("is_causal")
    return _LogitOptions(
        scaling=scaling,
        softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"),
        is_causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
    )


def _row_logits(
    query: Tensor, key: Tensor, mask: Tensor | None, rows: _Rows, options: _LogitOptions
) -> tuple[Tensor, Tensor | None]:
    """Logits ``[batch, heads, r, k_len]`` of the chosen rows (scaled and soft-capped scores) and the additive mask
    of those rows (broadcastable, or ``None``), both in :func:`~.functional.compute_dtype` of the query, computed
    as eager attention does, without repeating the KV heads."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    q = _gather_rows(query, rows)
    r = q.shape[2]
    scale = options.scaling if options.scaling is not None else dim**-0.5
    scores = (q * scale).reshape(batch, kv_heads, (heads // kv_heads) * r, dim) @ key.transpose(-1, -2)
    scores = scores.view(batch, heads, r, k_len).to(compute_dtype(query.dtype))
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    if mask is None:
        # transformers leaves the mask out only where the causal pattern says it all (a sliding window then covers
        # every key); SDPA then runs with `is_causal`, aligned to the top left, and without it for a single row.
        if not options.is_causal or q_len == 1:
            return scores, None
        positions = rows.index if rows.index is not None else torch.arange(q_len, device=query.device)[None]
        allowed = (torch.arange(k_len, device=query.device) <= positions[..., None]).unsqueeze(1)
    elif mask.dtype == torch.bool:
        allowed = _gather_rows(mask, rows)
    else:
        return scores, _gather_rows(mask, rows).to(scores.dtype)
    return scores, torch.where(allowed, scores.new_zeros(()), -math.inf)


def _row_weights(
    query: Tensor, key: Tensor, mask: Tensor | None, rows: _Rows, options: _LogitOptions
) -> tuple[Tensor, Tensor | None, Tensor]:
    scores, bias = _row_logits(query, key, mask, rows, options)
    weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    return scores, bias, weights


def _put_rows(full: Tensor, rows: _Rows, new: Tensor, dim: int) -> Tensor:
    """``full`` with its rows ``rows.index`` along ``dim`` replaced by ``new`` where ``rows.ok`` (out of place)."""
    shape = [1] * full.dim()
    shape[0], shape[dim] = rows.ok.shape
    ok = rows.ok.reshape(shape)
    if rows.index is None:
        return torch.where(ok, new, full)
    index = rows.index.reshape(shape).expand(new.shape)
    return full.scatter(dim, index, torch.where(ok, new, full.gather(dim, index)))


def _attend(
    active: _Active, base: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
    scaling: float | None, dropout: float, kwargs: dict,
) -> tuple[Tensor, Tensor | None]:
    """Base attention for every row except the chosen rows of the chosen layers, which get explicit float32 (float64
    for float64 inputs) attention weights changed by the strategy. When every row is chosen (decoding), the base is
    not run at all."""
    base_function = _base_function(base, module)
    settings, context = active.settings, active.scope.current()
    positions = None if context is None else context.forward
    apply = module.layer_idx in settings.layers and active.rule.changes_attention
    record = active.diagnostics is not None
    if positions is None or not (apply or record):
        return base_function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout > 0:
        raise ValueError("Attention reallocation is an inference-time method; call model.eval() (dropout > 0).")
    options = _logit_options(module, scaling, kwargs, base)
    gated = _gated(settings, context, positions)
    keys = _key_masks(
        positions, query.shape[0], query.shape[2], key.shape[2], options.sliding_window, settings.rows == "all",
        record, gated, active.rule.needs,
    )

    if record and keys.recorded is not None:
        scores, bias, before = _row_weights(query, key, mask, keys.recorded, options)
        after = active.rule(scores, bias, before, keys) if apply else before
        active.diagnostics.record(
            module.layer_idx, before, after, keys.recorded_positions, keys.recorded.ok, keys.visual,
            keys.audio, keys.modality_ids, keys.valid,
        )

    rows = keys.rows
    if not apply or rows is None:
        return base_function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    scores, bias, weights = _row_weights(query, key, mask, rows, options)
    new = active.rule(scores, bias, weights, keys)
    batch, heads, r, k_len = new.shape
    kv_heads, dim = value.shape[1], value.shape[-1]
    new_weights = new.to(value.dtype)
    row_output = (new_weights.view(batch, kv_heads, -1, k_len) @ value).view(batch, heads, r, dim).transpose(1, 2)
    if rows.index is None and rows.all_ok:
        return row_output.contiguous(), (new_weights if base == "eager" else None)
    output, weights_out = base_function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    output = _put_rows(output, rows, row_output, dim=1)
    if weights_out is not None:
        weights_out = _put_rows(weights_out, rows, new.to(weights_out.dtype), dim=2)
    return output, weights_out


def _gated(settings: ReallocationSettings, context: ModalityContext, positions: ForwardPositions) -> Tensor | None:
    """The call's conflict flags ``[batch]`` on the forward's device, or ``None`` without a gate."""
    if settings.gate is None:
        return None
    decisions = context.memos.get(_CallGate).decisions
    if decisions is None or decisions.conflict.shape[0] != positions.batch_size:
        raise ValueError(
            "The conflict gate has no decision for this forward's samples: it decides at the first forward of each "
            "call made inside the block (a model call or generate), with the batch that call starts with."
        )
    return decisions.conflict.to(positions.valid.device)


def _gate_call_start(active: _Active, probe: nn.Module) -> Callable[[ModalityContext, tuple, dict], None]:
    """The callback that runs the gate's detector at the start of each call on ``active``'s scope (when ``active``
    is the block in force on the module ``probe``), with AR off, and stores its decisions in the call's context."""

    def start(context: ModalityContext, args: tuple, kwargs: dict) -> None:
        if _SUSPENDED.get() or _ACTIVE.get(probe) is not active or context.forward is None:
            return
        ids = context.forward.modality_ids

        def run(keywords: dict[str, Any], left_out: Tensor) -> Any:
            with active.scope.layer_call(ids, left_out=left_out):
                return active.target(**keywords, use_cache=False)

        inputs = gate_inputs(active.target, context.forward, args, kwargs, run)
        token = _SUSPENDED.set(True)
        try:
            with torch.no_grad():
                decisions = active.settings.gate(inputs)
        finally:
            _SUSPENDED.reset(token)
        context.memos.get(_CallGate).decisions = check_decisions(decisions, context.forward.batch_size)
        active.gate_decisions.append(decisions)

    return start


def _leave_out(context: ModalityContext | None, mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """``mask`` with the keys of the positions a gate probe leaves out masked too (the probe's context marks them
    invalid), or ``mask`` itself outside a probe."""
    positions = None if context is None or context.left_out is None else context.forward
    if positions is None:
        return mask
    q_len, k_len = query.shape[2], key.shape[2]
    columns = torch.arange(k_len, device=query.device)
    rows = columns[k_len - q_len :, None]
    # a left-out token still attends to itself (a row with no key would give NaNs), but no other token sees it
    keys = nn.functional.pad(positions.valid, (0, k_len - positions.valid.shape[1]), value=False)[:, None, None, :]
    allowed = keys | (columns == rows)
    if mask is None:
        return allowed & (columns <= rows)
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


@functools.cache
def _eager_function(module_class: type) -> Callable:
    """The eager attention function of the modeling file that defines ``module_class``."""
    function = getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"Attention reallocation on 'eager' needs `eager_attention_forward` in {module_class.__module__}, which "
            f"defines {module_class.__name__}; call model.set_attn_implementation('sdpa') first."
        )
    return function


def _base_function(base: str, module: nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _eager_function(type(module))


def _make_attention(base: str) -> Callable:
    def attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        active = _ACTIVE.get(module)
        if active is not None and _SUSPENDED.get():
            attention_mask = _leave_out(active.scope.current(), attention_mask, query, key)
        if active is None or _SUSPENDED.get():
            return _base_function(base, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return _attend(active, base, module, query, key, value, attention_mask, scaling, dropout, kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


for _base, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _base, _make_attention(_base))
    AttentionMaskInterface.register(PREFIX + _base, _mask)


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model of ``model`` (``get_base_model()`` of a PEFT model)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(target, "set_attn_implementation"):
        raise ValueError(
            f"Attention reallocation needs a transformers PreTrainedModel (or a PEFT model of one), got "
            f"{type(model).__name__}."
        )
    return target


def _mose_scope(model: nn.Module) -> ContextScope | None:
    """The context scope of a MoSE model, else ``None``."""
    tuner = mose_tuner(model)
    return None if tuner is None else tuner.scope


def _attention_modules(target: nn.Module) -> dict[nn.Module, int]:
    """The modules of the language decoder that carry a ``layer_idx``."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target
    modules = {m: m.layer_idx for m in decoder.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    if not modules:
        raise ValueError(f"Found no attention layers (modules with `layer_idx`) in {type(target).__name__}.")
    return modules


@contextlib.contextmanager
def _plain_model_calls(
    scope: ContextScope, model: nn.Module, modality_ids: Tensor | None, tokens: ModalityTokens | None
) -> Iterator[None]:
    """Inside the block, every outermost forward and every ``generate`` of ``model`` (a plain transformers model,
    which cannot take the ids itself) is one call of ``scope`` whose prompt ``modality_ids`` describe (``None``: read
    off each call's ``input_ids`` by the model's placeholder ``tokens``). ``generate`` is wrapped by an instance
    attribute for the block; hooks and wrapper are removed on exit."""
    opened: list[contextlib.ExitStack | None] = []  # per forward of `model` in progress: the call it opened

    def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if scope.open_context() is not None:
            opened.append(None)
            return
        stack = contextlib.ExitStack()
        opened.append(stack)
        stack.enter_context(scope.call(model, modality_ids, CallKind.PROMPT, starting=(args, kwargs), tokens=tokens))

    def post_forward(module: nn.Module, args: tuple, output: Any) -> None:
        stack = opened.pop() if opened else None
        if stack is not None:
            stack.close()

    generate = model.generate
    had_attribute = "generate" in model.__dict__

    def generate_in_context(*args: Any, **kwargs: Any) -> Any:
        with scope.call(model, modality_ids, CallKind.GENERATE, tokens=tokens) as context:
            start_generate(context, model, args, kwargs)
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
            stack = opened.pop()
            if stack is not None:
                stack.close()


def _check_layers(layers: Iterable[int] | None, num_layers: int) -> frozenset[int]:
    if layers is None:
        return frozenset(range(num_layers))
    chosen = []
    for value in layers:
        try:
            layer = operator.index(value)
        except TypeError:
            layer = None
        if layer is None or isinstance(value, bool):
            raise ValueError(f"`layers` must hold layer indices (int), got {value!r}.")
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"Layer index {layer} is out of range: the model has {num_layers} layers (0-{num_layers - 1})."
            )
        chosen.append(layer)
    if not chosen:
        raise ValueError("`layers` is empty; pass None for every layer.")
    return frozenset(chosen)


def _choice(value: str, options: tuple[str, ...], name: str) -> str:
    if value not in options:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(options)}.")
    return value


def _check_gate(
    gate: str | ConflictDetector | None, labels: Iterable[int] | None, threshold: float | None, strategy: Strategy,
    target: nn.Module,
) -> ConflictDetector | None:
    """The detector for ``gate`` (``None``, ``"conflict"`` or a callable), its options checked."""
    if gate is None or callable(gate):
        if labels is not None or threshold is not None:
            raise ValueError("`gate_labels` and `gate_threshold` configure gate='conflict'; a custom detector or "
                             "gate=None takes neither.")  # fmt: skip
        if gate is None:
            return None
    else:
        _choice(gate, GATES, "gate")
        if labels is None:
            raise ValueError("gate='conflict' needs `gate_labels`: the first token id of each emotion label "
                             "(peft_mose.attention.label_token_ids(tokenizer, labels) gives them).")  # fmt: skip
        output = target.get_output_embeddings()
        vocab_size = output.weight.shape[0] if output is not None else None
        threshold = DEFAULT_GATE_THRESHOLD if threshold is None else threshold
        gate = LabelConflictDetector(check_gate_labels(labels, vocab_size), threshold)
    if strategy is not Strategy.AR:
        raise ValueError(
            f"A gate is for strategy='ar' only, got strategy={strategy.value!r}: PAI is kept as the paper's ungated "
            "baseline (Table 7), which intervenes on every sample."
        )
    return gate


def _base_implementation(target: nn.Module, modules: Collection[nn.Module], previous: str) -> str:
    """The implementation AR runs on top of (``"sdpa"`` or ``"eager"``); ``ValueError`` naming the model and what
    works instead where AR could not reproduce the model's attention exactly."""
    name = type(target).__name__
    if not uses_attention_interface(target):
        raise ValueError(
            f"Attention reallocation cannot run on {name}: it computes attention inside its own attention modules "
            "instead of calling transformers' AttentionInterface (Bloom, and Falcon before transformers 5.25, add "
            "their ALiBi position biases there), so AR can neither compute nor change its attention weights. AR runs "
            "on models whose attention goes through the interface with 'sdpa' or 'eager' (Llama, Mistral, Qwen2/3, "
            "Gemma 2/3, Phi-3, GPT-2, OPT, GPT-NeoX, Mixtral, Qwen2-MoE, ...)."
        )
    if any(getattr(module, "sinks", None) is not None for module in modules):
        raise ValueError(
            f"Attention reallocation cannot run on {name}: its attention sinks (GPT-OSS: a learned logit per head "
            "that takes part in the softmax and is dropped after it) are not part of the rows AR computes, so the "
            "weights AR changes would not be the model's."
        )
    base = previous.removeprefix(PREFIX)
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"Attention reallocation runs on top of {list(BASE_IMPLEMENTATIONS)} attention, but {name} uses "
            f"{previous!r} (AR computes its rows as explicit weights, which flex attention's block masks and score "
            "functions do not give); call model.set_attn_implementation('sdpa') first, or 'eager' for models "
            "without SDPA (Gemma 2)."
        )
    if base == "eager":
        for module in modules:
            _eager_function(type(module))
            if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2 takes its own path on plain "eager" only
                raise ValueError(
                    f"Attention reallocation on 'eager' cannot run on {name} with reorder_and_upcast_attn=True: "
                    f"{type(module).__name__} then computes attention outside AttentionInterface on 'eager' only. "
                    "Call model.set_attn_implementation('sdpa') first."
                )
    return base


@contextlib.contextmanager
def attention_reallocation(
    model: nn.Module,
    modality_ids: Tensor | None = None,
    *,
    tau: float | None = None,
    strategy: Strategy | str = Strategy.AR,
    layers: Iterable[int] | None = None,
    rows: str = "response",
    alpha: float | None = None,
    pai_mode: PaiMode | str | None = None,
    record: bool = False,
    gate: str | ConflictDetector | None = None,
    gate_labels: Iterable[int] | None = None,
    gate_threshold: float | None = None,
) -> Iterator[AttentionReallocation]:
    """Reallocate attention in ``model`` (transformers or PEFT/MoSE) inside the block; restore it on exit.

    On a MoSE model the ids come with each call (``model(..., modality_ids=)``, ``model.generate(...,
    modality_ids=)``). A model without MoSE cannot take them, so they are given here instead: ``modality_ids``
    ``[batch, prompt_len]`` describe the prompt of every forward and ``generate`` in the block (generated positions
    are answer tokens; a forward without a cache must be exactly that prompt). ``strategy`` is ``"ar"`` (MoSEAR,
    threshold ``tau``, default 1) or ``"pai"`` (factor ``alpha``, default 0.5, ``pai_mode`` ``"logits"``, the
    default, or ``"weights"``); an option of the other strategy is refused. ``layers`` restricts it to some layer
    indices; ``rows="all"`` applies it to every query row instead of the response rows; ``record=True`` fills
    ``.diagnostics`` for every response row, step by step (step 0: the first response token).

    ``gate="conflict"`` applies AR only to the samples whose prompt is in modality conflict (:mod:`.gate`: two extra
    forwards of each call's prompt, without audio and without visual tokens, compared on the label token ids
    ``gate_labels``, e.g. from :func:`~.gate.label_token_ids`, with JS threshold ``gate_threshold``, default
    :data:`~.gate.DEFAULT_GATE_THRESHOLD`); ``gate`` may also be a :class:`~.gate.ConflictDetector`. The other samples
    are computed exactly as without AR. Each call's decisions are appended to ``.gate_decisions``.
    """
    target = _transformers_model(model)
    modules = _attention_modules(target)
    num_layers = max(modules.values()) + 1
    strategy = Strategy.parse(strategy)
    if strategy is Strategy.NONE:
        raise ValueError("strategy='none' changes no attention: call the model outside attention_reallocation.")
    if strategy is Strategy.AR_GATE:  # AR with the conflict gate
        strategy, gate = Strategy.AR, "conflict" if gate is None else gate
    other = {"tau": tau} if strategy is Strategy.PAI else {"alpha": alpha, "pai_mode": pai_mode}
    unused = [name for name, value in other.items() if value is not None]
    if unused:
        raise ValueError(
            f"{' and '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to strategy={strategy.value!r} "
            "(tau is AR's threshold; alpha and pai_mode are PAI's): leave them out."
        )
    settings = ReallocationSettings(
        strategy=strategy,
        tau=check_tau(1.0 if tau is None else tau),
        alpha=check_alpha(0.5 if alpha is None else alpha),
        pai_mode=PaiMode.parse(PaiMode.LOGITS if pai_mode is None else pai_mode),
        rows=_choice(rows, ROW_MODES, "rows"),
        layers=_check_layers(layers, num_layers),
        gate=_check_gate(gate, gate_labels, gate_threshold, strategy, target),
    )
    scope = _mose_scope(model)
    if scope is not None and modality_ids is not None:
        raise ValueError(
            "This is a MoSE model: pass `modality_ids` to its forward or generate call, not to attention_reallocation "
            "(they describe one call, and the model opens a context for each)."
        )
    tokens = None
    if scope is None:
        tokens = model_tokens(target)
        if modality_ids is None and tokens is None:
            raise ValueError(
                f"Attention reallocation on a model without MoSE needs `modality_ids` ([batch, prompt_len]) to know "
                f"which tokens are visual and audio ({type(target).__name__} names no image/video/audio placeholder "
                "tokens to read them from): attention_reallocation(model, modality_ids=...)."
            )
        if modality_ids is not None:
            validate_modality_ids(modality_ids)
        scope = ContextScope()
    previous = attn_implementation(target)
    base = _base_implementation(target, modules, previous)

    described = {**settings.__dict__, "layers": sorted(settings.layers), "gate": describe_gate(settings.gate)}
    diagnostics = ReallocationDiagnostics(settings=described) if record else None
    saved = {module: _ACTIVE.get(module) for module in modules}
    result = AttentionReallocation(settings=settings, diagnostics=diagnostics)
    active = _Active(settings, _rule(settings), scope, diagnostics, target, result.gate_decisions)
    restore = _Restore(previous, saved)
    _OPEN[id(active)] = restore
    try:
        for module in modules:
            _ACTIVE[module] = active
        target.set_attn_implementation(PREFIX + base)
        if attn_implementation(target) != PREFIX + base:
            raise ValueError(f"{type(target).__name__} cannot switch its attention implementation at run time.")
        calls = contextlib.nullcontext() if _mose_scope(model) else _plain_model_calls(scope, target, modality_ids, tokens)
        probes = contextlib.nullcontext()
        if settings.gate is not None:
            probes = scope.on_call_start(_gate_call_start(active, next(iter(modules))))
        with calls, probes:
            yield result
    finally:
        del _OPEN[id(active)]
        if any(_ACTIVE.get(module) is not active for module in modules):
            _hand_over(active, restore)  # a block opened inside this one is still open: it stays in effect
            raise RuntimeError(
                "attention_reallocation blocks on one model must exit in the reverse order of entry: this block "
                "exited while one opened inside it is still open. That inner block stays in effect until it exits "
                "(then the model is as before this block); nest them as `with` statements."
            )
        if attn_implementation(target) != restore.previous:
            target.set_attn_implementation(restore.previous)
        for module, entry in restore.saved.items():
            if entry is None:
                _ACTIVE.pop(module, None)
            else:
                _ACTIVE[module] = entry
