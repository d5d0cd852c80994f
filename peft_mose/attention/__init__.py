"""Attention reallocation (MoSEAR section 5.2), the PAI baseline and UAP diagnostics (section 4).

``functional`` holds the equations as pure tensor functions; ``backend`` runs them inside a transformers model as a
registered attention implementation (:func:`attention_reallocation`); ``diagnostics`` and ``plot`` collect and draw
the per-layer statistics of the first response token.
"""

from .backend import AttentionReallocation, ReallocationSettings, attention_reallocation
from .diagnostics import LayerDiagnostics, ReallocationDiagnostics
from .functional import (
    ARPlan,
    amplify_visual_logits,
    amplify_visual_weights,
    layer_ratio,
    modality_mass,
    plan_reallocation,
    reallocate_attention,
    reallocation_delta,
    unimodal_attention_proportion,
)
from .plot import collect_diagnostics, middle_layers, plot_diagnostics

__all__ = [
    "ARPlan",
    "AttentionReallocation",
    "LayerDiagnostics",
    "ReallocationDiagnostics",
    "ReallocationSettings",
    "amplify_visual_logits",
    "amplify_visual_weights",
    "attention_reallocation",
    "collect_diagnostics",
    "layer_ratio",
    "middle_layers",
    "modality_mass",
    "plan_reallocation",
    "plot_diagnostics",
    "reallocate_attention",
    "reallocation_delta",
    "unimodal_attention_proportion",
]
