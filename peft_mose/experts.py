"""The three modality-specific experts of MoSE (paper Eq. 2 and 4), computed without Python loops over tokens.

Every expert ``e`` (0 visual, 1 non-visual, 2 omni) has a shared down-projection ``A_e`` (``r x in``), ``N``
up-projections ``B_{e,i}`` (``out x r``) and a token gate ``W_e`` (``N x in``):
``E_e(x) = sum_i softmax(W_e x)_i B_{e,i} A_e x`` (Eq. 2). Eq. 4 adds ``E_o(x) + lambda 1[x visual] E_v(x) +
(1 - lambda) 1[x non-visual] E_n(x)`` to the frozen layer's output. With ``coef`` the per-token expert weights
``(lambda 1[v], (1 - lambda) 1[n], 1)``, a token needs at most two experts: omni plus visual or non-visual.

:func:`mose_delta` groups the tokens by the experts they use (:func:`token_groups`) and runs, per group, one GEMM
for the A's of its experts (omni fused alongside, width ``2r``) and one for their B's (width ``2Nr``); the gates of
all experts come from one GEMM over all tokens. Backward recomputes ``h = A x`` and the mixed ``z`` from ``x``
instead of keeping them (:class:`_ExpertMixture`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

EXPERTS = ("visual", "nonvisual", "omni")


class TokenGroup(NamedTuple):
    """Tokens that use the same experts: their ``rows`` among the flattened tokens (``None``: every token) and
    the ``experts`` they run (ascending indices into :data:`EXPERTS`)."""

    rows: torch.Tensor | None
    experts: tuple[int, ...]


# Every expert on every token, the unused ones at weight 0: no gathers, 1.5x the FLOPs of grouped tokens.
EVERY_EXPERT = (TokenGroup(None, (0, 1, 2)),)
# MoAE (the Table 6 ablation) has one expert for every token.
ONLY_EXPERT = (TokenGroup(None, (0,)),)

# Grouping pays once the expert FLOPs it skips exceed 64 per element it moves (gathered token rows, copied
# weights) plus 1.5e7 for its extra operations: measured on a 2-core CPU, see docs/performance.md.
FLOPS_PER_MOVED_ELEMENT, GROUPING_OVERHEAD_FLOPS = 64, 1.5e7


def token_groups(is_visual: torch.Tensor, is_nonvisual: torch.Tensor) -> tuple[TokenGroup, ...]:
    """Partition the tokens (boolean masks of any shape, flattened) into visual + omni, non-visual + omni and
    omni-only groups. Empty groups are left out; a group of every token has ``rows=None``. On the meta device (no
    data to group by) every token runs every expert."""
    if is_visual.device.type == "meta":
        return EVERY_EXPERT
    kind = 2 - is_nonvisual.flatten().long() - 2 * is_visual.flatten().long()  # 0 visual, 1 non-visual, 2 omni
    counts = torch.bincount(kind, minlength=3).tolist()  # the one host sync of the grouping
    order = torch.argsort(kind, stable=True)
    experts = ((0, 2), (1, 2), (2,))
    if max(counts) == kind.numel():
        return (TokenGroup(None, experts[counts.index(kind.numel())]),)
    return tuple(TokenGroup(rows, e) for rows, e, n in zip(order.split(counts), experts, counts) if n)


def expert_gates(x: torch.Tensor, gate: torch.Tensor | None, n_experts: int, n_groups: int) -> torch.Tensor:
    """Eq. 2's mixing weights ``softmax(W_e x)``: ``[..., n_groups, N]`` (3 experts, or MoAE's one); all ones when
    ``N == 1`` (no gate)."""
    if gate is None:
        return x.new_ones(*x.shape[:-1], n_groups, 1)
    return F.linear(x, gate.reshape(n_groups * n_experts, -1)).unflatten(-1, (n_groups, n_experts)).softmax(-1)


def mose_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gate: torch.Tensor | None,
    coef: torch.Tensor,
    groups: tuple[TokenGroup, ...] = EVERY_EXPERT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_e coef_e * E_e(x)`` for every token (Eq. 2 inside Eq. 4), and the gates ``softmax(W_e x)``.

    Shapes: ``x [..., in]`` (any float dtype; computed in ``A``'s dtype, or autocast's), ``A [E, r, in]`` (one A per
    expert) or ``[E, N, r, in]`` (one per B: the symmetric and MoAE ablations), ``B [out, E, N, r]``,
    ``gate [E, N, in]`` or ``None`` for ``N = 1``, ``coef [..., E]`` (the per-token expert weights, LoRA scaling
    included), with ``E = 3`` experts (MoAE: 1). ``groups`` (over the flattened tokens, see :func:`token_groups`) say which
    experts each token runs; ``coef`` must be 0 for the others. Returns ``delta [..., out]`` and
    ``gates [..., 3, N]`` (not differentiable).
    """
    tokens, (r, in_features) = x.shape[:-1], A.shape[-2:]
    if len(groups) > 1 and not _grouping_pays(groups, r, in_features, B.shape[0], B.shape[2]):
        groups = EVERY_EXPERT
    delta, gates = _ExpertMixture.apply(
        x.reshape(-1, in_features), A, B, gate, coef.reshape(-1, coef.shape[-1]), groups, _compute_dtype(x, A)
    )
    return delta.unflatten(0, tokens), gates.unflatten(0, tokens)


def uniform_weights(
    A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor | None, experts: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Neighbouring ``experts`` side by side as views: their A's ``[k r, in]``, B's ``[out, k N r]`` and gates
    ``[k N, in]`` (``None`` for ``N = 1``), for :func:`uniform_delta`."""
    A_g, B_g = _group_weights(A, B, experts, A.dtype)
    return A_g, B_g, None if gate is None else _pick(gate, 0, experts).reshape(-1, gate.shape[2])


def uniform_delta(
    x: torch.Tensor, A_g: torch.Tensor, B_g: torch.Tensor, gate_g: torch.Tensor | None, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 inside Eq. 4 for tokens that all run the same ``k`` experts (every decode step): one GEMM for the
    gates, one for the stacked A's, one for the stacked B's, in plain autograd ops and nothing else, since a decode
    step is bound by the number of operations, not by FLOPs.

    ``x [batch, seq, in]`` in the weights' dtype; weights from :func:`uniform_weights`; ``coef [batch, 1, k, 1]``:
    each sample's expert weights, LoRA scaling included. Returns ``delta [batch, seq, out]`` and the gates
    ``softmax(W_e x)`` ``[batch, seq, k, N]`` (all ones for ``N = 1``).
    """
    k = coef.shape[2]
    if gate_g is None:
        gates = torch.ones_like(coef)
        weights = coef
    else:
        gates = F.linear(x, gate_g).unflatten(-1, (k, -1)).softmax(-1)
        weights = gates * coef
    rank = B_g.shape[1] // (k * gates.shape[-1])
    h = F.linear(x, A_g).unflatten(-1, (k, -1, rank))  # [.., k, 1, r], or [.., k, N, r] with an A per B
    return F.linear((h * weights.unsqueeze(-1)).flatten(-3), B_g), gates


def _grouping_pays(groups: tuple[TokenGroup, ...], r: int, d_in: int, d_out: int, n: int) -> bool:
    """Whether gathered ``groups`` beat every expert on every token (the decision changes no result)."""
    skipped = sum((len(EXPERTS) - len(g.experts)) * g.rows.numel() for g in groups)
    moved = sum(g.rows.numel() for g in groups) * (d_in + d_out)
    if (0, 2) in (g.experts for g in groups):
        moved += 2 * r * (d_in + n * d_out)  # visual and omni are no neighbours: their A's and B's are copied
    return 2 * r * (d_in + n * d_out) * skipped >= FLOPS_PER_MOVED_ELEMENT * moved + GROUPING_OVERHEAD_FLOPS


class _ExpertMixture(torch.autograd.Function):
    """Eq. 2-4's adapter output over flattened tokens ``x [T, in]``, group by group.

    Saves ``x`` (the layer's input, one tensor for every adapter reading it), the parameters, ``coef`` and the gates
    (``[T, 3, N]``); backward recomputes each group's ``h = A x`` and ``z`` (one GEMM) instead of keeping
    ``[T, 2r]`` and ``[T, 2Nr]`` per layer.
    """

    @staticmethod
    def forward(ctx, x, A, B, gate, coef, groups, dtype):
        with _explicit_dtype(x.device.type):
            xc = x.to(dtype)
            gates = expert_gates(xc, None if gate is None else gate.to(dtype), B.shape[2], B.shape[1])
            s = gates * coef.to(dtype).unsqueeze(-1)
            out = None if groups[0].rows is None else xc.new_empty(x.shape[0], B.shape[0])
            for rows, experts in groups:
                A_g, B_g = _group_weights(A, B, experts, dtype)
                _, z = _group_mix(_take(xc, rows), A_g, _take(_pick(s, 1, experts), rows), A.shape[-2])
                y = F.linear(z, B_g)
                out = y if rows is None else out.index_copy_(0, rows, y)
        ctx.save_for_backward(x, A, B, gate, coef, gates)
        ctx.groups, ctx.dtype = groups, dtype
        ctx.mark_non_differentiable(gates)
        return out, gates

    @staticmethod
    def backward(ctx, d_out, _):
        x, A, B, gate, coef, gates = ctx.saved_tensors
        need_x, need_a, need_b, need_gate, need_coef = ctx.needs_input_grad[:5]
        groups, dtype = ctx.groups, ctx.dtype
        with _explicit_dtype(x.device.type):
            xc, c, d_out = x.to(dtype), coef.to(dtype), d_out.to(dtype)
            s = gates * c.unsqueeze(-1)
            dA, dB, ds = A.new_zeros(A.shape, dtype=dtype), B.new_zeros(B.shape, dtype=dtype), torch.zeros_like(s)
            dx = xc.new_empty(xc.shape) if need_x and groups[0].rows is not None else None
            for rows, experts in groups:
                A_g, B_g = _group_weights(A, B, experts, dtype)
                x_g, s_g, dy = _take(xc, rows), _take(_pick(s, 1, experts), rows), _take(d_out, rows)
                h, z = _group_mix(x_g, A_g, s_g, A.shape[-2])
                dz = (dy @ B_g).view(*s_g.shape, -1)
                if need_b:
                    _pick(dB, 1, experts).add_((dy.T @ z).view(B.shape[0], *s_g.shape[1:], -1))
                _put(_pick(ds, 1, experts), rows, (dz * h).sum(-1))
                dh = dz * s_g.unsqueeze(-1)
                dh = (dh.sum(2) if h.shape[2] == 1 else dh).flatten(1)  # a shared A sums over its B's
                if need_a:
                    picked = _pick(dA, 0, experts)
                    picked.add_((dh.T @ x_g).view(picked.shape))
                if need_x:
                    dx_g = dh @ A_g
                    dx = dx_g if rows is None else dx.index_copy_(0, rows, dx_g)
            d_gate = None
            if gate is not None and (need_gate or need_x):
                dg = ds * c.unsqueeze(-1)
                d_logits = (gates * (dg - (dg * gates).sum(-1, keepdim=True))).flatten(1)
                if need_gate:
                    d_gate = (d_logits.T @ xc).view(gate.shape).to(gate.dtype)
                if need_x:
                    dx.addmm_(d_logits, gate.to(dtype).flatten(0, 1))
        return (
            dx.to(x.dtype) if need_x else None,
            dA.to(A.dtype) if need_a else None,
            dB.to(B.dtype) if need_b else None,
            d_gate,
            (ds * gates).sum(-1).to(coef.dtype) if need_coef else None,
            None,
            None,
        )


def _group_weights(
    A: torch.Tensor, B: torch.Tensor, experts: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's ``k`` experts side by side, GEMM-ready: their A's ``[k r, in]`` (``[k N r, in]`` with an A per B)
    and B's ``[out, k N r]`` (views, except for visual + omni, which are not neighbours)."""
    A_g, B_g = _pick(A, 0, experts).to(dtype), _pick(B, 1, experts).to(dtype)
    return A_g.reshape(-1, A.shape[-1]), B_g.reshape(B.shape[0], -1)


def _group_mix(x: torch.Tensor, A: torch.Tensor, s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2-4 up to the B's for one group's tokens ``x [n, in]``: ``h = A x`` per expert (``[n, k, 1, r]``, or
    ``[n, k, N, r]`` with an A per B) and every B head's input ``z = s h`` (``[n, k N r]``; ``s [n, k, N]``: the
    gates times the expert weights)."""
    h = F.linear(x, A).view(x.shape[0], s.shape[1], -1, rank)
    return h, (h * s.unsqueeze(-1)).flatten(1)


def _pick(t: torch.Tensor, dim: int, experts: tuple[int, ...]) -> torch.Tensor:
    """A view of ``t`` restricted to ``experts`` along ``dim`` (they are evenly spaced)."""
    step = experts[1] - experts[0] if len(experts) > 1 else 1
    return t[(slice(None),) * dim + (slice(experts[0], experts[-1] + 1, step),)]


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _put(t: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
    if rows is None:
        t.copy_(value)
    else:
        t[rows] = value


def autocast_on(device: str) -> bool:
    """Whether autocast is on for the device type ``device``."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """``A``'s dtype, or autocast's where autocast is on for ``x``'s device (what ``F.linear`` would use)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if autocast_on(device) else A.dtype


def _explicit_dtype(device: str) -> contextlib.AbstractContextManager:
    """The experts compute in the dtype chosen by :func:`_compute_dtype`: autocast off inside, where it is on."""
    return torch.autocast(device, enabled=False) if autocast_on(device) else contextlib.nullcontext()
