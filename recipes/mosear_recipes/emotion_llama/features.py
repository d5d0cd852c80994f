"""Where Emotion-LLaMA's pre-extracted encoder features live and what shape they have.

Per sample ``<name>``, under the feature root (by default the annotation file's folder):

- ``<eva_dir>/<name>.npy``:   ``[eva_patches + 1, eva_dim]`` = ``[1025, 1408]``, EVA-CLIP ViT-g on the first frame
  after ``ln_vision``; row 0 is the CLS token, rows 1.. the 32x32 patch tokens in raster order.
- ``<face_dir>/<name>.npy``:  ``[feature_dim]`` or ``[1, feature_dim]`` = ``[1024]``, face MAE utterance feature.
- ``<video_dir>/<name>.npy``: same shape, VideoMAE utterance feature.
- ``<audio_dir>/<name>.npy``: same shape, HuBERT-large utterance feature.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SPEC_FILE = "feature_spec.json"


@dataclass(frozen=True)
class FeatureSpec:
    """Feature dimensions and folder names of one dataset (defaults: the real MERR / MER2023 layout)."""

    eva_dim: int = 1408
    eva_patches: int = 1024
    eva_group: int = 4
    feature_dim: int = 1024
    eva_dir: str = "EVA_448"
    face_dir: str = "mae_340_UTT"
    video_dir: str = "maeV_399_UTT"
    audio_dir: str = "HL-UTT"

    def __post_init__(self) -> None:
        for name in ("eva_dim", "eva_patches", "eva_group", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureSpec.{name} must be >= 1, got {getattr(self, name)}.")
        if self.eva_patches % self.eva_group:
            raise ValueError(
                f"FeatureSpec.eva_patches ({self.eva_patches}) must be a multiple of eva_group ({self.eva_group})."
            )

    @classmethod
    def mer2024(cls) -> FeatureSpec:
        """The MER2024 folder names (``mae_340_23_UTT``, ``maeVideo_399_23_UTT``, ``HL_23_UTT``)."""
        return cls(face_dir="mae_340_23_UTT", video_dir="maeVideo_399_23_UTT", audio_dir="HL_23_UTT")

    @classmethod
    def tiny(cls) -> FeatureSpec:
        """Small feature dimensions with the real token structure (1024 EVA patches grouped by 4, 260 tokens)."""
        return cls(eva_dim=8, feature_dim=16)

    @property
    def n_patch_tokens(self) -> int:
        """EVA tokens the LLM sees: 256 for the real layout (4 consecutive patches concatenated per token)."""
        return self.eva_patches // self.eva_group

    @property
    def patch_token_dim(self) -> int:
        return self.eva_dim * self.eva_group

    @property
    def folders(self) -> dict[str, str]:
        """Feature folder per kind: ``eva``, ``face``, ``video``, ``audio``."""
        return {"eva": self.eva_dir, "face": self.face_dir, "video": self.video_dir, "audio": self.audio_dir}

    def shapes(self, kind: str) -> tuple[tuple[int, ...], ...]:
        """The accepted array shapes of one feature kind."""
        if kind == "eva":
            return ((self.eva_patches + 1, self.eva_dim),)
        return ((self.feature_dim,), (1, self.feature_dim))

    def n_multimodal_tokens(self, audio_repeat: int = 1) -> int:
        """Multimodal tokens per sample: patches + face + video + ``audio_repeat`` audio + CLS (260 by default)."""
        return self.n_patch_tokens + 3 + audio_repeat

    def save(self, root: str | Path) -> Path:
        """Write the spec as ``feature_spec.json`` in ``root``."""
        path = Path(root) / SPEC_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_dir(cls, root: str | Path, default: FeatureSpec | None = None) -> FeatureSpec:
        """Read ``root/feature_spec.json`` if it exists, else return ``default`` (the real MERR layout)."""
        path = Path(root) / SPEC_FILE
        if not path.exists():
            return default if default is not None else cls()
        try:
            values = json.loads(path.read_text())
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"Invalid feature spec {path}: {err}") from None
