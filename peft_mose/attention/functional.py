"""Attention reallocation (MoSEAR Eq. 1, 5-14, Algorithm 1) and the PAI baseline as pure tensor functions.

This module is the single place where each equation is computed; the attention backend and the diagnostics call it.
Shapes: attention weights or logits ``[batch, heads, q_len, k_len]``, modality masks bool ``[batch, k_len]``.
Everything is computed in :func:`compute_dtype` of the input (float64 for float64 inputs, float32 for the others)
and cast back to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class ARPlan(NamedTuple):
    """What Algorithm 1 does to each head and query row (``[batch, heads, q_len]``; c itself: :func:`layer_ratio`)."""

    biased: Tensor
    """H_bias of Eq. 7."""
    moved: Tensor
    """Δ_h of Eq. 14 (0 for heads left unchanged)."""
    change: Tensor
    """``[..., 2]``: every visual weight becomes ω (1 + Δ_h / S_h(ω, V)) (Eq. 13) and every audio weight
    ω (1 - Δ_h / S_h(ω, A)) (Eq. 12); these two relative changes, 0 for heads left unchanged."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the equations are computed in for inputs of ``dtype``: float64 stays float64 (a float64 model gets
    float64 attention), every other dtype is computed in float32 (half types are too coarse for masses and ratios)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tau(tau: float) -> float:
    """Return ``tau`` as a float; ``ValueError`` unless it is a number >= 0 (``math.inf`` turns AR off)."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"`tau` must be a number >= 0, got {tau!r}.") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"`tau` must be a number >= 0 (math.inf turns reallocation off), got {tau!r}.")
    return value


def check_alpha(alpha: float) -> float:
    """Return PAI's ``alpha`` as a float; ``ValueError`` unless it is finite and >= 0."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"`alpha` must be a finite number >= 0, got {alpha!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`alpha` must be a finite number >= 0, got {alpha!r}.")
    return value


def check_attention_inputs(attn: Tensor, visual_mask: Tensor, audio_mask: Tensor | None, name: str) -> None:
    """``ValueError`` naming the problem unless ``attn`` is a float ``[batch, heads, q_len, k_len]`` tensor and the
    masks are disjoint bool ``[batch, k_len]`` tensors on its device."""
    if not isinstance(attn, Tensor) or not attn.is_floating_point():
        kind = attn.dtype if isinstance(attn, Tensor) else type(attn).__name__
        raise ValueError(f"`{name}` must be a floating-point tensor, got {kind}.")
    if attn.dim() != 4:
        raise ValueError(f"`{name}` must have shape [batch, heads, q_len, k_len], got {tuple(attn.shape)}.")
    expected = (attn.shape[0], attn.shape[-1])
    for mask_name, mask in (("visual_mask", visual_mask), ("audio_mask", audio_mask)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"`{mask_name}` must be a bool tensor, got {kind}.")
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"`{mask_name}` must have shape [batch, k_len] = {expected} to match `{name}`, got {tuple(mask.shape)}."
            )
        if mask.device != attn.device:
            raise ValueError(f"`{mask_name}` is on {mask.device} but `{name}` is on {attn.device}.")
    if audio_mask is not None and bool((visual_mask & audio_mask).any()):
        raise ValueError("`visual_mask` and `audio_mask` overlap: a token cannot be both visual and audio.")


def stack_masks(visual_mask: Tensor, audio_mask: Tensor) -> Tensor:
    """The two masks as float32 columns ``[batch, k_len, 2]``: one batched matmul then sums or spreads per modality
    (cast to float64 by the functions below for float64 weights)."""
    return torch.stack((visual_mask, audio_mask), dim=-1).to(torch.float32)


def stacked_modality_mass(attn_weights: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`modality_mass` with the masks already stacked (:func:`stack_masks`), unchecked: the backend's path."""
    batch, heads, q_len, k_len = attn_weights.shape
    weights = attn_weights.to(compute_dtype(attn_weights.dtype))
    mass = (weights.reshape(batch, heads * q_len, k_len) @ masks.to(weights.dtype)).view(batch, heads, q_len, 2)
    return mass[..., 0], mass[..., 1]


def stacked_reallocation_delta(attn_weights: Tensor, masks: Tensor, plan: ARPlan) -> Tensor:
    """:func:`reallocation_delta` with the masks already stacked (:func:`stack_masks`), unchecked."""
    batch, heads, q_len, k_len = attn_weights.shape
    change = plan.change.view(batch, heads * q_len, 2)
    per_key = (change @ masks.to(change.dtype).transpose(1, 2)).view(batch, heads, q_len, k_len)
    return attn_weights.to(change.dtype) * per_key


def modality_mass(attn_weights: Tensor, visual_mask: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
    """S_h(ω, V) and S_h(ω, A): each head's total weight on visual and on audio tokens (:func:`compute_dtype`,
    ``[batch, heads, q_len]`` each)."""
    check_attention_inputs(attn_weights, visual_mask, audio_mask, "attn_weights")
    return stacked_modality_mass(attn_weights, stack_masks(visual_mask, audio_mask))


def modality_totals(visual_mass: Tensor, audio_mass: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_h S_h(ω, V), Σ_h S_h(ω, A) and their ratio c (Eq. 6) as IEEE division gives it (inf, 0 or NaN without mass)."""
    total_v = visual_mass.sum(1, keepdim=True)
    total_a = audio_mass.sum(1, keepdim=True)
    return total_v, total_a, total_a / total_v


def layer_ratio(visual_mass: Tensor, audio_mass: Tensor) -> Tensor:
    """c(ω) of Eq. 6 from per-head masses, ``[batch, 1, q_len]``; NaN where either modality has no mass."""
    total_v, total_a, ratio = modality_totals(visual_mass, audio_mass)
    return torch.where((total_v > 0) & (total_a > 0), ratio, math.nan)


def plan_reallocation(visual_mass: Tensor, audio_mass: Tensor, tau: float, samples: Tensor | None = None) -> ARPlan:
    """Eq. 5-7 and 12-14 from the per-head masses S_h(ω, V), S_h(ω, A) (``[batch, heads, q_len]``, float32 or
    float64); ``samples`` (bool ``[batch]``, the conflict gate's flags) limits H_bias to those samples.

    c_h > c is tested as S_A,h Σ_h S_V,h > Σ_h S_A,h S_V,h, which needs no division by a head's (possibly zero)
    visual mass, in float64: products of float32 (or half) masses are exact there, so a head whose c_h equals c (two
    identical heads, one head) is never made biased by rounding; Eq. 7 is strict. Rows
    without audio mass (c = 0), without visual mass (c = inf, and no head reaches the minimum visual mass) or without
    both (c = NaN) get no biased head. Heads whose visual mass is below the smallest normal number of the masses'
    dtype are left alone: Eq. 13 would need a factor that overflows, and there is no visual distribution to scale
    (Eq. 11) anyway.
    """
    tau, c = check_tau(tau), modality_totals(visual_mass, audio_mass)[2]
    wide = torch.float64 if visual_mass.device.type != "mps" else visual_mass.dtype  # MPS has no float64
    wide_v, wide_a = visual_mass.to(wide), audio_mass.to(wide)
    above = wide_a * wide_v.sum(1, keepdim=True) > wide_a.sum(1, keepdim=True) * wide_v
    biased = (c > tau) & (visual_mass >= torch.finfo(visual_mass.dtype).tiny) & above
    if samples is not None:
        biased = biased & samples[:, None, None]
    moved = torch.where(biased, ((audio_mass - c * visual_mass) / (1 + c)).clamp_min(0), 0.0)
    change = moved.unsqueeze(-1) / torch.stack((visual_mass, -audio_mass), dim=-1)
    return ARPlan(biased=biased, moved=moved, change=torch.where(biased.unsqueeze(-1), change, 0.0))


def reallocation_delta(attn_weights: Tensor, visual_mask: Tensor, audio_mask: Tensor, plan: ARPlan) -> Tensor:
    """ω' - ω of Eq. 12-13 (in ``plan``'s dtype): each weight times its modality's change; exactly 0 elsewhere.

    Scaling every weight of a modality by one factor is what Eq. 10-11 ask for (intra-modality proportions kept).
    """
    check_attention_inputs(attn_weights, visual_mask, audio_mask, "attn_weights")
    return stacked_reallocation_delta(attn_weights, stack_masks(visual_mask, audio_mask), plan)


def reallocate_attention(
    attn_weights: Tensor, visual_mask: Tensor, audio_mask: Tensor, tau: float = 1.0
) -> Tensor:
    """MoSEAR's attention reallocation (Algorithm 1, Eq. 5-14) on post-softmax weights ``[batch, heads, q, k]``.

    Per sample and query row: if c > ``tau``, every head with c_h > c moves Δ_h from audio to visual tokens; all other
    heads, rows and samples come back bit for bit unchanged, as do samples without visual or audio mass (and heads
    whose visual mass is below the smallest normal number of the compute dtype, where Eq. 13 is undefined in floating
    point).
    """
    check_attention_inputs(attn_weights, visual_mask, audio_mask, "attn_weights")
    tau = check_tau(tau)
    masks = stack_masks(visual_mask, audio_mask)
    plan = plan_reallocation(*stacked_modality_mass(attn_weights, masks), tau)
    delta = stacked_reallocation_delta(attn_weights, masks, plan)
    return (attn_weights.to(delta.dtype) + delta).to(attn_weights.dtype)


def unimodal_attention_proportion(
    attn_weights: Tensor | Sequence[Tensor], visual_mask: Tensor, audio_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """UAP_v and UAP_a of Eq. 1: each modality's attention mass averaged over heads (:func:`compute_dtype`).

    ``attn_weights`` is one layer ``[batch, heads, q, k]`` (returns ``[batch, q]`` each) or a sequence of layers such
    as ``outputs.attentions`` (returns ``[layers, batch, q]`` each).
    """
    if isinstance(attn_weights, Tensor):
        visual_mass, audio_mass = modality_mass(attn_weights, visual_mask, audio_mask)
        return visual_mass.mean(1), audio_mass.mean(1)
    layers = [unimodal_attention_proportion(w, visual_mask, audio_mask) for w in attn_weights]
    if not layers:
        raise ValueError("`attn_weights` is an empty sequence; pass one tensor per layer.")
    return torch.stack([v for v, _ in layers]), torch.stack([a for _, a in layers])


def amplify_visual_logits(scores: Tensor, visual_mask: Tensor, alpha: float) -> Tensor:
    """PAI as its reference code does it: visual pre-softmax logits z become z + alpha * |z| (apply softmax after).

    Masked (non-finite) logits stay as they are.
    """
    check_attention_inputs(scores, visual_mask, None, "scores")
    alpha = check_alpha(alpha)
    logits = scores.to(compute_dtype(scores.dtype))
    boost = visual_mask[:, None, None, :] & torch.isfinite(logits)
    return torch.where(boost, logits + alpha * logits.abs(), logits).to(scores.dtype)


def amplify_visual_weights(attn_weights: Tensor, visual_mask: Tensor, alpha: float) -> Tensor:
    """PAI as the MoSEAR paper describes it: visual weights times (1 + alpha), each row rescaled to its old sum."""
    check_attention_inputs(attn_weights, visual_mask, None, "attn_weights")
    alpha = check_alpha(alpha)
    weights = attn_weights.to(compute_dtype(attn_weights.dtype))
    boosted = torch.where(visual_mask[:, None, None, :], weights * (1.0 + alpha), weights)
    old, new = weights.sum(-1, keepdim=True), boosted.sum(-1, keepdim=True)
    out = torch.where(new > 0, boosted * (old / new), weights)
    return out.to(attn_weights.dtype)
