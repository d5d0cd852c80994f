"""peft_mose: MoSEAR (modality-specific experts + attention reallocation) as a PEFT extension."""

from .modality import Modality, modality_ids_from_segments, validate_modality_ids

__all__ = ["Modality", "modality_ids_from_segments", "validate_modality_ids"]
__version__ = "0.1.0"
