"""peft_mose: MoSEAR (modality-specific experts + attention reallocation) as a PEFT extension.

Importing the package registers the ``MOSE`` PEFT type, so ``get_peft_model(model, MoSEConfig(...))`` and
``PeftModel.from_pretrained(base, path)`` work like for PEFT's own methods.
"""

from ._registration import register as _register
from .config import MoSEConfig, MoSEPeftType
from .experts import EXPERTS
from .layer import MoSELayer, MoSELinear
from .layout import IGNORE_INDEX, SegmentRow, collate_rows, encode_segments, insert_embeddings, prompt_only
from .modality import Modality, modality_ids_from_segments, validate_modality_ids
from .model import MoSEModel
from .tracking import ModalityTracker, TokenState

_register()

__all__ = [
    "EXPERTS",
    "IGNORE_INDEX",
    "Modality",
    "ModalityTracker",
    "MoSEConfig",
    "MoSELayer",
    "MoSELinear",
    "MoSEModel",
    "MoSEPeftType",
    "SegmentRow",
    "TokenState",
    "collate_rows",
    "encode_segments",
    "insert_embeddings",
    "modality_ids_from_segments",
    "prompt_only",
    "validate_modality_ids",
]
__version__ = "0.1.0"
