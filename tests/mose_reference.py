"""A slow, loop-by-loop MoSE layer written from the paper's equations, independent of the fast path.

Loops over samples, tokens and experts; matrix-vector products in float64; softmax, GELU and means written out.
Built from torch operations on float64 copies of the weights (:func:`reference_params`), so autograd gives
reference gradients for every weight and the input.
"""

from __future__ import annotations

import math

import torch

from peft_mose import Modality

VISUAL, NONVISUAL, OMNI = 0, 1, 2


def reference_params(layer, adapter: str) -> dict[str, torch.Tensor]:
    """float64 copies of the layer's weights, as leaves that require grad (names as in the layer)."""
    params = {
        "mose_A": layer.mose_A[adapter],
        "mose_B": layer.mose_B[adapter],
        "base_layer.weight": layer.base_layer.weight,
    }
    if adapter in layer.mose_router:
        router = layer.mose_router[adapter]
        for name in ("in_weight", "in_bias", "out_weight", "out_bias"):
            params[f"mose_router.{name}"] = getattr(router, name)
    if adapter in layer.mose_gate:
        params["mose_gate"] = layer.mose_gate[adapter]
    if layer.base_layer.bias is not None:
        params["base_layer.bias"] = layer.base_layer.bias
    return {name: p.detach().double().requires_grad_() for name, p in params.items()}


def reference_lambda(layer, adapter: str, x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Eq. 3 per sample: means over visual / non-visual prompt tokens (a zero vector when there are none)."""
    with torch.no_grad():
        lambdas = _lambdas(layer, adapter, x.double(), ids, valid, reference_params(layer, adapter))
    return [float(lam) for lam in lambdas]


def _lambdas(layer, adapter: str, x: torch.Tensor, ids, valid, params: dict) -> list[torch.Tensor]:
    if "mose_router.in_weight" not in params:  # no router (Table 6, row c): a plain average
        return [torch.tensor(0.5, dtype=x.dtype)] * x.shape[0]
    visual_set, nonvisual_set = layer.expert_ids[adapter]
    w_in, b_in = params["mose_router.in_weight"], params["mose_router.in_bias"]
    w_out, b_out = params["mose_router.out_weight"], params["mose_router.out_bias"]
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
        score = (w_out @ hidden + b_out)[0]
        lambdas.append(0.5 + layer.eps[adapter] * torch.tanh(score))
    return lambdas


def reference_output(
    layer, adapter: str, x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, params: dict | None = None
) -> torch.Tensor:
    """Eq. 4 with Eq. 2 experts, token by token, in float64. With ``params`` from :func:`reference_params` (and a
    float64 ``x`` that requires grad), the output is differentiable with respect to them. The Table 6 ablations:
    ``A`` with one matrix per B (symmetric), and MoAE: one expert of N LoRAs on every token, weight 1."""
    if params is None:
        with torch.no_grad():
            return reference_output(layer, adapter, x.detach(), ids, valid, reference_params(layer, adapter))
    x = x.double()
    A, B, gate = params["mose_A"], params["mose_B"], params.get("mose_gate")
    weight, bias = params["base_layer.weight"], params.get("base_layer.bias", 0.0)
    n = B.shape[2]
    scaling = layer.scaling[adapter]
    visual_set, nonvisual_set = layer.expert_ids[adapter]
    moae = layer.expert_kind[adapter] == "moae"
    lambdas = None if moae else _lambdas(layer, adapter, x, ids, valid, params)
    rows = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            modality = int(ids[b, t])
            out = weight @ token + bias
            weights = {0: 1.0} if moae else {OMNI: 1.0}
            if not moae and modality in visual_set:
                weights[VISUAL] = lambdas[b]
            if not moae and modality in nonvisual_set:
                weights[NONVISUAL] = 1.0 - lambdas[b]
            for expert, expert_weight in weights.items():
                if gate is None:
                    alpha = [1.0]
                else:
                    logits = [gate[expert, i] @ token for i in range(n)]
                    shift = max(float(v.detach()) for v in logits)
                    exps = [torch.exp(v - shift) for v in logits]
                    alpha = [v / sum(exps) for v in exps]
                downs = [A[expert] @ token] * n if A.dim() == 3 else [A[expert, i] @ token for i in range(n)]
                expert_out = sum(alpha[i] * (B[:, expert, i, :] @ downs[i]) for i in range(n))
                out = out + scaling * expert_weight * expert_out
            rows.append(out)
    return torch.stack(rows).view(x.shape[0], x.shape[1], -1)
