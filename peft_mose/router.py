"""The sample-wise modality router of MoSE (paper Eq. 3).

``lambda = 1/2 + eps * tanh(f(v_mean; n_mean))`` where ``v_mean`` and ``n_mean`` are the means of the layer's input
over a sample's visual and non-visual prompt tokens and ``f`` is a small MLP. A sample without tokens of one group
pools to a zero vector for that group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ModalityRouter(nn.Module):
    """``f`` of Eq. 3: ``GELU([v_mean; n_mean] W_in^T + b_in) W_out^T + b_out``, hidden width ``hidden_size``.

    Parameters sit directly on the module so that PEFT's state-dict keys stay one level deep
    (``mose_router.in_weight``), like LoRA's ``lora_A.weight``.
    """

    def __init__(self, in_features: int, hidden_size: int, zero_init_output: bool = True, device=None) -> None:
        super().__init__()
        self.in_weight = nn.Parameter(torch.empty(hidden_size, 2 * in_features, device=device))
        self.in_bias = nn.Parameter(torch.empty(hidden_size, device=device))
        self.out_weight = nn.Parameter(torch.empty(1, hidden_size, device=device))
        self.out_bias = nn.Parameter(torch.empty(1, device=device))
        self.reset_parameters(zero_init_output)

    @torch.no_grad()
    def reset_parameters(self, zero_init_output: bool = True) -> None:
        """``nn.Linear``'s default init; a zero output layer starts every sample at ``lambda = 1/2``."""
        for weight, bias in ((self.in_weight, self.in_bias), (self.out_weight, self.out_bias)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)
        if zero_init_output:
            self.out_weight.zero_()
            self.out_bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(features, self.in_weight, self.in_bias))
        return F.linear(hidden, self.out_weight, self.out_bias)


def pool_modalities(x: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample means ``[batch, 2, in]`` of ``x`` (``[batch, seq, in]``) under row-normalised ``pool_weights``
    (``[batch, 2, seq]``: visual row, non-visual row; an all-zero row pools to zero)."""
    return torch.bmm(pool_weights.to(x.dtype), x)


def routing_weight(router: nn.Module, pooled: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 3: the visual expert's weight ``lambda`` per sample, ``[batch]``, from ``pooled`` ``[batch, 2, in]``."""
    score = router(pooled.flatten(1)).squeeze(-1)
    return 0.5 + eps * torch.tanh(score)
