"""A slow, loop-by-loop MoSE layer written from the paper's equations, independent of the fast path.

Loops over samples, tokens and experts; matrix-vector products in float64; softmax, GELU and means written out.
"""

from __future__ import annotations

import math

import torch

from peft_mose import Modality

VISUAL, NONVISUAL, OMNI = 0, 1, 2


def reference_lambda(layer, adapter: str, x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Eq. 3 per sample: means over visual / non-visual prompt tokens (a zero vector when there are none)."""
    visual_set, nonvisual_set = layer.expert_ids[adapter]
    router = layer.mose_router[adapter]
    w_in, b_in = router.in_weight.detach().double(), router.in_bias.detach().double()
    w_out, b_out = router.out_weight.detach().double(), router.out_bias.detach().double()
    x = x.detach().double()
    lambdas = []
    for b in range(x.shape[0]):
        groups = []
        for members in (visual_set, nonvisual_set):
            rows = [
                x[b, t]
                for t in range(x.shape[1])
                if bool(valid[b, t]) and int(ids[b, t]) in members and int(ids[b, t]) != int(Modality.ANSWER)
            ]
            groups.append(sum(rows) / len(rows) if rows else torch.zeros(x.shape[2], dtype=x.dtype))
        hidden = w_in @ torch.cat(groups) + b_in
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        score = float((w_out @ hidden + b_out)[0])
        lambdas.append(0.5 + layer.eps[adapter] * math.tanh(score))
    return lambdas


def reference_output(
    layer, adapter: str, x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, lambdas: list[float] | None = None
) -> torch.Tensor:
    """Eq. 4 with Eq. 2 experts, token by token, in float64."""
    x = x.detach().double()
    A = layer.mose_A[adapter].detach().double()
    B = layer.mose_B[adapter].detach().double()
    gate = layer.mose_gate[adapter].detach().double() if adapter in layer.mose_gate else None
    n = B.shape[2]
    scaling = layer.scaling[adapter]
    visual_set, nonvisual_set = layer.expert_ids[adapter]
    if lambdas is None:
        lambdas = reference_lambda(layer, adapter, x, ids, valid)
    weight = layer.base_layer.weight.detach().double()
    bias = layer.base_layer.bias.detach().double() if layer.base_layer.bias is not None else 0.0
    out = torch.empty(x.shape[0], x.shape[1], B.shape[0], dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            modality = int(ids[b, t])
            out[b, t] = weight @ token + bias
            weights = {OMNI: 1.0}
            if modality in visual_set:
                weights[VISUAL] = lambdas[b]
            if modality in nonvisual_set:
                weights[NONVISUAL] = 1.0 - lambdas[b]
            for expert, expert_weight in weights.items():
                if gate is None:
                    alpha = [1.0]
                else:
                    logits = [float(gate[expert, i] @ token) for i in range(n)]
                    exps = [math.exp(v - max(logits)) for v in logits]
                    alpha = [v / sum(exps) for v in exps]
                down = A[expert] @ token
                expert_out = sum(alpha[i] * (B[:, expert, i, :] @ down) for i in range(n))
                out[b, t] += scaling * expert_weight * expert_out
    return out
