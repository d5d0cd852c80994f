"""The three modality-specific experts of MoSE (paper Eq. 2 and 4), computed without Python loops.

Every expert ``e`` (0 visual, 1 non-visual, 2 omni) has a shared down-projection ``A_e`` (``r x in``), ``N``
up-projections ``B_{e,i}`` (``out x r``) and a token gate ``W_e`` (``N x in``):
``E_e(x) = sum_i softmax(W_e x)_i B_{e,i} A_e x`` (Eq. 2). Eq. 4 adds ``E_o(x) + lambda 1[x visual] E_v(x) +
(1 - lambda) 1[x non-visual] E_n(x)`` to the frozen layer's output. With ``coef`` the per-token expert weights
``(lambda 1[v], (1 - lambda) 1[n], 1)``, the whole sum is one GEMM for the A's (width ``3r``), one for the gates
(width ``3N``) and one for the B's (width ``3Nr``), like a single LoRA of rank ``3Nr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPERTS = ("visual", "nonvisual", "omni")


def expert_gates(x: torch.Tensor, gate: torch.Tensor | None, n_experts: int) -> torch.Tensor:
    """Eq. 2's mixing weights ``softmax(W_e x)``: ``[..., 3, N]``; all ones when ``N == 1`` (no gate)."""
    if gate is None:
        return x.new_ones(*x.shape[:-1], len(EXPERTS), 1)
    n_groups = gate.shape[0]
    return F.linear(x, gate.reshape(n_groups * n_experts, -1)).unflatten(-1, (n_groups, n_experts)).softmax(-1)


def mose_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """``sum_e coef_e * E_e(x)`` for every token (Eq. 2 inside Eq. 4).

    Shapes: ``x [..., in]``, ``A [3, r, in]``, ``B [out, 3, N, r]``, ``gates [..., 3, N]``, ``coef [..., 3]``
    (the per-token expert weights, LoRA scaling included); returns ``[..., out]``.
    """
    n_groups, r, in_features = A.shape
    h = F.linear(x, A.reshape(n_groups * r, in_features)).unflatten(-1, (n_groups, 1, r))
    z = h * (gates * coef.unsqueeze(-1)).unsqueeze(-1)
    return F.linear(z.flatten(-3), B.flatten(1))
