"""Attention reallocation (MoSEAR section 5.2), the PAI baseline and UAP diagnostics (section 4).

``functional`` holds the equations as pure tensor functions; ``backend`` runs them inside a transformers model as a
registered attention implementation (:func:`attention_reallocation`); ``gate`` decides per call which samples it
acts on (the conflict gate); ``diagnostics`` and ``plot`` collect and draw the per-layer statistics of every
generated step (the first response token, or the first emotion word) and the gate's decisions.
"""

from .backend import AttentionReallocation, ReallocationSettings, attention_reallocation
from .diagnostics import LayerDiagnostics, ReallocationDiagnostics, StepDiagnostics
from .gate import (
    DEFAULT_GATE_THRESHOLD,
    ConflictDetector,
    GateDecisions,
    GateInputs,
    LabelConflictDetector,
    jensen_shannon,
    label_token_ids,
)
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
from .strategy import PaiMode, Strategy
from .plot import (
    EmotionWordStep,
    collect_diagnostics,
    emotion_word_steps,
    middle_layers,
    plot_diagnostics,
    plot_gate_decisions,
)

__all__ = [
    "ARPlan",
    "AttentionReallocation",
    "ConflictDetector",
    "DEFAULT_GATE_THRESHOLD",
    "EmotionWordStep",
    "GateDecisions",
    "GateInputs",
    "LabelConflictDetector",
    "LayerDiagnostics",
    "PaiMode",
    "ReallocationDiagnostics",
    "ReallocationSettings",
    "StepDiagnostics",
    "Strategy",
    "amplify_visual_logits",
    "amplify_visual_weights",
    "attention_reallocation",
    "collect_diagnostics",
    "emotion_word_steps",
    "jensen_shannon",
    "label_token_ids",
    "layer_ratio",
    "middle_layers",
    "modality_mass",
    "plan_reallocation",
    "plot_diagnostics",
    "plot_gate_decisions",
    "reallocate_attention",
    "reallocation_delta",
    "unimodal_attention_proportion",
]
