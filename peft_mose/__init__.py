"""peft_mose: MoSEAR (modality-specific experts + attention reallocation) as a PEFT extension.

Importing the package registers the ``MOSE`` PEFT type, so ``get_peft_model(model, MoSEConfig(...))`` and
``PeftModel.from_pretrained(base, path)`` work like for PEFT's own methods.
"""

import importlib

from ._versions import check_supported_versions, environment, package_version

check_supported_versions()  # first: out of range, PEFT's private hooks would fail later and obscurely

from ._registration import register as _register
from .config import MoSEConfig, MoSEPeftType
from .context import ModalityContext
from .experts import EXPERTS
from .layer import MoSELayer, MoSELinear
from .layout import IGNORE_INDEX, SegmentRow, collate_rows, encode_segments, insert_embeddings, prompt_only
from .modality import Modality, modality_ids_from_segments, validate_modality_ids
from .positions import CallKind, ForwardPositions
from .model import MoSEModel, is_mose_model

_register()

# Loaded on first use: AR pulls in matplotlib for its plots, the metrics scikit-learn.
_LAZY = {
    "attention": "attention",
    "attention_reallocation": "attention",
    "reallocate_attention": "attention",
    "unimodal_attention_proportion": "attention",
    "metrics": "metrics",
    "recognition_scores": "metrics",
    "set_level_scores": "metrics",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'peft_mose' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    return module if name == _LAZY[name] else getattr(module, name)


__all__ = [
    "EXPERTS",
    "attention",
    "attention_reallocation",
    "metrics",
    "reallocate_attention",
    "recognition_scores",
    "set_level_scores",
    "unimodal_attention_proportion",
    "IGNORE_INDEX",
    "Modality",
    "CallKind",
    "ForwardPositions",
    "ModalityContext",
    "MoSEConfig",
    "MoSELayer",
    "MoSELinear",
    "MoSEModel",
    "MoSEPeftType",
    "SegmentRow",
    "collate_rows",
    "encode_segments",
    "environment",
    "insert_embeddings",
    "is_mose_model",
    "modality_ids_from_segments",
    "prompt_only",
    "validate_modality_ids",
]
__version__ = package_version()
