"""Eq. 1, 5-14 and PAI as pure tensor functions, checked against float64 loops and a numeric constraint solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_mose.attention import (
    amplify_visual_logits,
    amplify_visual_weights,
    modality_mass,
    plan_reallocation,
    reallocate_attention,
    reallocation_delta,
    unimodal_attention_proportion,
)

TAUS = st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0, math.inf])
CASES = settings(max_examples=80, derandomize=True, deadline=None)


def random_case(seed: int, batch: int, heads: int, q_len: int, k_len: int, sharpness: float, holes: bool):
    """Softmax rows over random logits and a random text/visual/audio layout; some samples lack a modality, and
    with ``holes`` some keys get exactly zero weight (masked logits), so whole modalities can have zero mass."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, q_len, k_len, generator=gen, dtype=torch.float64) * sharpness
    if holes:
        logits = logits.masked_fill(torch.rand(logits.shape, generator=gen, dtype=torch.float64) < 0.3, -math.inf)
        logits[..., 0] = 0.0  # keep every row non-empty
    weights = torch.softmax(logits, dim=-1).float()
    kind = torch.randint(0, 3, (batch, k_len), generator=gen)  # 0 text, 1 visual, 2 audio
    for b, drop in enumerate(torch.rand(batch, generator=gen).tolist()):
        if drop < 0.2:  # some samples have no visual (or no audio) token at all
            kind[b][kind[b] == (1 if drop < 0.1 else 2)] = 0
    return weights, kind == 1, kind == 2


case_args = dict(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    heads=st.integers(1, 5),
    q_len=st.integers(1, 3),
    k_len=st.integers(2, 12),
    sharpness=st.sampled_from([0.5, 2.0, 6.0]),
    holes=st.booleans(),
)


def oracle(weights: torch.Tensor, visual: torch.Tensor, audio: torch.Tensor, tau: float,
           min_visual_mass: float = np.finfo(np.float32).tiny):  # fmt: skip
    """Algorithm 1's decisions and Eq. 14 in float64 loops: per (sample, row) c and per head (biased, Δ); heads with
    less visual mass than ``min_visual_mass`` (the compute dtype's smallest normal number) are left alone."""
    w = weights.double().numpy()
    batch, heads, q_len, _ = w.shape
    biased = np.zeros((batch, heads, q_len), dtype=bool)
    delta = np.zeros((batch, heads, q_len))
    ratio = np.full((batch, q_len), np.nan)
    for b in range(batch):
        v_idx, a_idx = np.flatnonzero(visual[b].numpy()), np.flatnonzero(audio[b].numpy())
        for q in range(q_len):
            s_v = np.array([w[b, h, q, v_idx].sum() for h in range(heads)])
            s_a = np.array([w[b, h, q, a_idx].sum() for h in range(heads)])
            if s_v.sum() == 0 or s_a.sum() == 0:
                continue
            c = s_a.sum() / s_v.sum()
            ratio[b, q] = c
            for h in range(heads):
                if c > tau and s_v[h] >= min_visual_mass and s_a[h] / s_v[h] > c:
                    biased[b, h, q] = True
                    delta[b, h, q] = (s_a[h] - c * s_v[h]) / (1 + c)
    return biased, delta, ratio


def masses(weights, visual, audio):
    w = weights.double()
    return (w * visual[:, None, None]).sum(-1), (w * audio[:, None, None]).sum(-1)


def clear_decisions(weights, visual, audio, tau, rel=1e-4):
    """Rows and heads whose decision is not within float32 rounding of a tie (c vs tau, c_h vs c)."""
    s_v, s_a = masses(weights, visual, audio)
    tot_v, tot_a = s_v.sum(1, keepdim=True), s_a.sum(1, keepdim=True)
    c = tot_a / tot_v
    c_h = s_a / s_v
    clear_layer = ~torch.isfinite(c) | ((c - tau).abs() > rel * (1 + c.abs())) | math.isinf(tau)
    clear_head = ~torch.isfinite(c_h) | ~torch.isfinite(c) | ((c_h - c).abs() > rel * (1 + c.abs()))
    return clear_layer & clear_head


@CASES
@given(tau=TAUS, **case_args)
def test_properties_of_reallocated_weights(tau, seed, batch, heads, q_len, k_len, sharpness, holes):
    weights, visual, audio = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    out = reallocate_attention(weights, visual, audio, tau=tau)
    assert out.dtype == weights.dtype and torch.isfinite(out).all() and (out >= 0).all()

    changed = (out != weights).any(-1)
    plan = plan_reallocation(*modality_mass(weights, visual, audio), tau)
    assert torch.equal(weights + reallocation_delta(weights, visual, audio, plan), out)
    biased, delta, _ = oracle(weights, visual, audio, tau)
    clear = clear_decisions(weights, visual, audio, tau)
    assert torch.equal(changed[clear], torch.from_numpy(biased)[clear])
    assert torch.equal(plan.biased[clear], changed[clear])
    # Unchanged heads, rows and samples are bit for bit identical.
    assert torch.equal(out[~changed], weights[~changed])

    s_v, s_a = masses(weights, visual, audio)
    n_v, n_a = masses(out, visual, audio)
    torch.testing.assert_close(out.double().sum(-1), weights.double().sum(-1), atol=2e-6, rtol=0)  # rows sum to 1
    torch.testing.assert_close(n_v + n_a, s_v + s_a, atol=2e-6, rtol=0)  # Eq. 9
    assert (n_v >= s_v - 1e-7).all()  # visual mass never decreases
    torch.testing.assert_close((s_a - n_a)[clear], torch.from_numpy(delta)[clear], atol=2e-6, rtol=1e-4)  # Eq. 14
    torch.testing.assert_close(plan.moved.double()[clear], torch.from_numpy(delta)[clear], atol=2e-6, rtol=1e-4)
    c = s_a.sum(1, keepdim=True) / s_v.sum(1, keepdim=True)
    ratio_after = n_a / n_v
    torch.testing.assert_close(ratio_after[changed], c.expand_as(n_a)[changed], rtol=1e-4, atol=1e-6)  # Eq. 8
    # Eq. 10-11: each modality keeps its internal proportions.
    for mask, old, new in ((visual, s_v, n_v), (audio, s_a, n_a)):
        keys = mask[:, None, None, :].expand_as(weights) & changed[..., None]
        expected = weights.double() / old[..., None] * new[..., None]
        torch.testing.assert_close(out.double()[keys], expected[keys], rtol=1e-5, atol=1e-9)


def solve_constraints(w: np.ndarray, visual: np.ndarray, audio: np.ndarray, c: float) -> np.ndarray:
    """Solve Eq. 8-11 for one head's row as a linear system (least squares), independently of the closed form.

    Unknowns: the new weights of the audio and visual tokens. Eq. 10 multiplied out reads
    S_A w'(a) - w(a) sum_a' w'(a') = 0 (same for Eq. 11); Eq. 8 reads sum_A w' - c sum_V w' = 0; Eq. 9 fixes the sum.
    """
    idx = np.concatenate([np.flatnonzero(audio), np.flatnonzero(visual)])
    n_a = int(audio.sum())
    is_audio = np.arange(idx.size) < n_a
    s_a, s_v = w[audio].sum(), w[visual].sum()
    rows, rhs = [], []
    rows.append(np.where(is_audio, 1.0, -c))
    rhs.append(0.0)
    rows.append(np.ones(idx.size))
    rhs.append(s_a + s_v)
    for j, token in enumerate(idx):
        same = is_audio == is_audio[j]
        row = -w[token] * same.astype(float)
        row[j] += s_a if is_audio[j] else s_v
        rows.append(row)
        rhs.append(0.0)
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    residual = np.array(rows) @ solution - np.array(rhs)
    assert np.abs(residual).max() < 1e-10
    out = w.copy()
    out[idx] = solution
    return out


@CASES
@given(tau=st.sampled_from([0.0, 0.3, 1.0]), **case_args)
def test_closed_form_matches_numeric_solution_of_eq_8_to_11(tau, seed, batch, heads, q_len, k_len, sharpness, holes):
    weights, visual, audio = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    out = reallocate_attention(weights, visual, audio, tau=tau).double().numpy()
    biased, _, ratio = oracle(weights, visual, audio, tau)
    w = weights.double().numpy()
    for b, h, q in zip(*np.nonzero(biased)):
        expected = solve_constraints(w[b, h, q], visual[b].numpy(), audio[b].numpy(), ratio[b, q])
        if (out[b, h, q] != w[b, h, q]).any():  # not a float32 tie, see test above
            np.testing.assert_allclose(out[b, h, q], expected, rtol=2e-5, atol=1e-8)


def test_tau_inf_and_missing_modalities_leave_weights_unchanged():
    weights, visual, audio = random_case(3, 3, 4, 2, 10, 2.0, False)
    assert torch.equal(reallocate_attention(weights, visual, audio, tau=math.inf), weights)
    no_audio = torch.zeros_like(audio)
    assert torch.equal(reallocate_attention(weights, visual, no_audio, tau=0.0), weights)
    no_visual = torch.zeros_like(visual)
    assert torch.equal(reallocate_attention(weights, no_visual, audio, tau=0.0), weights)
    zero_visual_mass = weights.masked_fill(visual[:, None, None, :], 0.0)
    out = reallocate_attention(zero_visual_mass, visual, audio, tau=0.0)
    assert torch.equal(out, zero_visual_mass)


def test_an_audio_heavy_head_is_reallocated_and_a_visual_one_is_not():
    # One sample, two heads, keys: [text, visual, visual, audio]; c = (0.6 + 0.1) / (0.2 + 0.8) = 0.7,
    # c_0 = 0.6 / 0.2 = 3 > c (reallocated), c_1 = 0.1 / 0.8 < c (kept).
    weights = torch.tensor([[[[0.2, 0.1, 0.1, 0.6]], [[0.1, 0.5, 0.3, 0.1]]]])
    visual = torch.tensor([[False, True, True, False]])
    audio = torch.tensor([[False, False, False, True]])
    out = reallocate_attention(weights, visual, audio, tau=0.5)
    assert torch.equal(out[0, 1], weights[0, 1])
    c, pair = 0.7, 0.8
    new_visual = pair / (1 + c)  # Eq. 8-9
    expected = torch.tensor([0.2, 0.1 * new_visual / 0.2, 0.1 * new_visual / 0.2, pair - new_visual])
    torch.testing.assert_close(out[0, 0, 0], expected)
    assert torch.equal(reallocate_attention(weights, visual, audio, tau=0.9), weights)  # c <= tau: layer untouched


def test_heads_whose_ratio_is_the_layers_are_left_alone_bit_for_bit():
    """Eq. 7 is strict: identical heads have c_h = c, so none is biased, whatever rounding does to c S_V,h."""
    rows = torch.softmax(2 * torch.randn(2000, 9, generator=torch.Generator().manual_seed(0)), -1)
    weights = rows[:, None, None, :].expand(-1, 2, 1, -1).contiguous()
    visual = torch.tensor([False, True, True, True, True, True, False, False, False]).expand(2000, -1)
    audio = torch.tensor([False, False, False, False, False, False, True, True, False]).expand(2000, -1)
    assert torch.equal(reallocate_attention(weights, visual, audio, tau=0.0), weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_stable_and_close_to_float32(dtype):
    weights, visual, audio = random_case(7, 3, 5, 2, 40, 6.0, True)
    half = weights.to(dtype)
    out = reallocate_attention(half, visual, audio, tau=0.0)
    reference = reallocate_attention(half.float(), visual, audio, tau=0.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=4e-3, rtol=1e-2)
    changed = (out != half).any(-1)
    assert changed.any() and torch.equal(out[~changed], half[~changed])


def test_tiny_visual_mass_in_bfloat16_neither_overflows_nor_loses_mass():
    # Keys [text, visual, visual, audio]. The second head makes c = 0.5 / 0.4 moderate, so the first (almost no visual
    # mass) is biased: 1 + Δ / S_V is about 1e37 there, close to float32's limit.
    visual = torch.tensor([[False, True, True, False]])
    audio = torch.tensor([[False, False, False, True]])
    other = torch.tensor([[[[0.5, 0.2, 0.2, 0.1]]]], dtype=torch.bfloat16)
    near_limit = torch.tensor([[[[0.5, 3e-38, 3e-38, 0.5]]]], dtype=torch.bfloat16)
    out = reallocate_attention(torch.cat([near_limit, other], dim=1), visual, audio, tau=0.0)
    assert torch.isfinite(out).all() and out[0, 0, 0, 1] == out[0, 0, 0, 2] and out[0, 0, 0, 1] > 0.05
    torch.testing.assert_close(out[0, 0, 0].float().sum(), torch.tensor(1.0), atol=1e-2, rtol=0)
    # Below float32's smallest normal number there is no visual distribution to scale: the head is left alone.
    subnormal = torch.tensor([[[[0.5, 2e-40, 2e-40, 0.5]]]], dtype=torch.bfloat16)
    out = reallocate_attention(torch.cat([subnormal, other], dim=1), visual, audio, tau=0.0)
    assert torch.equal(out[0, 0], subnormal[0, 0])


@CASES
@given(tau=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0]), **case_args)
def test_float64_weights_are_reallocated_in_float64(tau, seed, batch, heads, q_len, k_len, sharpness, holes):
    weights, visual, audio = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    weights = weights.double()
    out = reallocate_attention(weights, visual, audio, tau=tau)
    assert out.dtype == torch.float64
    biased, delta, ratio = oracle(weights, visual, audio, tau, min_visual_mass=np.finfo(np.float64).tiny)
    clear = clear_decisions(weights, visual, audio, tau, rel=1e-12)
    changed = (out != weights).any(-1)
    assert torch.equal(changed[clear], torch.from_numpy(biased)[clear])
    s_v, s_a = masses(weights, visual, audio)
    n_v, n_a = masses(out, visual, audio)
    torch.testing.assert_close(s_a - n_a, torch.from_numpy(delta), atol=1e-12, rtol=0)  # Eq. 14
    torch.testing.assert_close(n_v + n_a, s_v + s_a, atol=1e-12, rtol=0)  # Eq. 9
    plan = plan_reallocation(*modality_mass(weights, visual, audio), tau)
    assert plan.moved.dtype == torch.float64
    torch.testing.assert_close(plan.moved, torch.from_numpy(delta), atol=1e-12, rtol=0)
    w = weights.numpy()
    for b, h, q in zip(*np.nonzero(biased)):  # Eq. 8-11 solved numerically, in float64
        expected = solve_constraints(w[b, h, q], visual[b].numpy(), audio[b].numpy(), ratio[b, q])
        np.testing.assert_allclose(out[b, h, q].numpy(), expected, rtol=0, atol=1e-12)
    uap_v, uap_a = unimodal_attention_proportion(weights, visual, audio)
    assert uap_v.dtype == torch.float64
    torch.testing.assert_close(uap_v, s_v.mean(1), atol=1e-14, rtol=0)
    torch.testing.assert_close(uap_a, s_a.mean(1), atol=1e-14, rtol=0)


def test_float64_pai_and_visual_mass_below_float32s_range():
    weights, visual, audio = random_case(5, 2, 3, 2, 9, 2.0, False)
    w = weights.double()
    boosted = w * torch.where(visual[:, None, None], 1.5, 1.0)
    expected = boosted * (w.sum(-1, keepdim=True) / boosted.sum(-1, keepdim=True))
    out = amplify_visual_weights(w, visual, 0.5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)
    scores = torch.randn(2, 3, 2, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits = amplify_visual_logits(scores, visual, 0.5)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, torch.where(visual[:, None, None], scores + 0.5 * scores.abs(), scores),
                               atol=0, rtol=0)  # fmt: skip
    # float64 weights of 1e-300 on the visual tokens: there is a visual distribution to scale, unlike in float32
    visual1 = torch.tensor([[False, True, True, False]])
    audio1 = torch.tensor([[False, False, False, True]])
    tiny = torch.tensor([[[[0.5, 1e-300, 3e-300, 0.5]], [[0.5, 0.2, 0.2, 0.1]]]], dtype=torch.float64)
    out = reallocate_attention(tiny, visual1, audio1, tau=0.0)
    assert torch.isfinite(out).all() and (out[0, 0, 0, 1:3] > 0.01).all()
    torch.testing.assert_close(out[0, 0, 0, 2] / out[0, 0, 0, 1], torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0, 0].sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-15, rtol=0)


@CASES
@given(**case_args)
def test_uap_is_the_head_mean_of_each_modalitys_mass(seed, batch, heads, q_len, k_len, sharpness, holes):
    weights, visual, audio = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    uap_v, uap_a = unimodal_attention_proportion(weights, visual, audio)
    w = weights.double().numpy()
    for b in range(batch):
        for q in range(q_len):
            expected_v = sum(w[b, h, q, k] for h in range(heads) for k in range(k_len) if visual[b, k]) / heads
            expected_a = sum(w[b, h, q, k] for h in range(heads) for k in range(k_len) if audio[b, k]) / heads
            assert uap_v[b, q].item() == pytest.approx(expected_v, abs=1e-6)
            assert uap_a[b, q].item() == pytest.approx(expected_a, abs=1e-6)
    layers_v, layers_a = unimodal_attention_proportion([weights, weights.flip(1)], visual, audio)
    assert layers_v.shape == (2, batch, q_len)
    torch.testing.assert_close(layers_v[1], uap_v)
    torch.testing.assert_close(layers_a[0], uap_a)


@CASES
@given(alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0, 3.0]), **case_args)
def test_pai_on_logits_adds_alpha_abs_logit_to_visual_keys(alpha, seed, batch, heads, q_len, k_len, sharpness, holes):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, q_len, k_len, generator=gen) * sharpness
    if holes:
        scores[..., -1] = -math.inf
    _, visual, _ = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    out = amplify_visual_logits(scores, visual, alpha).numpy()
    s = scores.double().numpy()
    boost = visual.numpy()[:, None, None, :] & np.isfinite(s)
    expected = s.copy()
    expected[boost] += alpha * np.abs(s[boost])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@CASES
@given(alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0, 3.0]), **case_args)
def test_pai_on_weights_scales_visual_share(alpha, seed, batch, heads, q_len, k_len, sharpness, holes):
    weights, visual, _ = random_case(seed, batch, heads, q_len, k_len, sharpness, holes)
    out = amplify_visual_weights(weights, visual, alpha).double()
    w = weights.double()
    torch.testing.assert_close(out.sum(-1), w.sum(-1), atol=2e-6, rtol=0)
    share = (w * visual[:, None, None]).sum(-1) / w.sum(-1)
    expected_share = (1 + alpha) * share / (1 + alpha * share)
    torch.testing.assert_close((out * visual[:, None, None]).sum(-1) / out.sum(-1), expected_share, atol=2e-6, rtol=0)
    # Each row: visual weights times (1 + alpha), then one common factor back to the old row sum.
    boosted = w * torch.where(visual[:, None, None], 1 + alpha, 1.0)
    expected = boosted * (w.sum(-1, keepdim=True) / boosted.sum(-1, keepdim=True))
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w, v, a: reallocate_attention(w, v[:, :-1], a), "visual_mask` must have shape"),
        (lambda w, v, a: reallocate_attention(w, v.long(), a), "visual_mask` must be a bool"),
        (lambda w, v, a: reallocate_attention(w[0], v, a), "attn_weights` must have shape"),
        (lambda w, v, a: reallocate_attention(w.long(), v, a), "floating-point"),
        (lambda w, v, a: reallocate_attention(w, v, v), "overlap"),
        (lambda w, v, a: reallocate_attention(w, v, a, tau=math.nan), "tau"),
        (lambda w, v, a: reallocate_attention(w, v, a, tau=-1.0), "tau"),
        (lambda w, v, a: amplify_visual_logits(w, v, alpha=math.inf), "alpha"),
        (lambda w, v, a: amplify_visual_weights(w, v, alpha=-0.1), "alpha"),
        (lambda w, v, a: unimodal_attention_proportion([], v, a), "empty"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(call, message):
    weights, visual, audio = random_case(0, 2, 2, 1, 6, 1.0, False)
    with pytest.raises(ValueError, match=message):
        call(weights, visual, audio)
