"""The five trainable linear projectors that map encoder features into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from .features import FeatureSpec

FEATURE_KEYS = ("eva_patch", "eva_cls", "face", "video", "audio")
"""The projectors' inputs, in the order of :meth:`EmotionLlamaProjectors.forward` (also the batch keys)."""


class EmotionLlamaProjectors(nn.Module):
    """``eva_patch`` (5632 -> H), ``eva_cls`` (1408 -> H), ``face``, ``video``, ``audio`` (1024 -> H); no activation."""

    def __init__(
        self,
        hidden_size: int,
        eva_dim: int = 1408,
        eva_group: int = 4,
        feature_dim: int = 1024,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kwargs = {"device": device, "dtype": dtype}
        self.eva_patch = nn.Linear(eva_dim * eva_group, hidden_size, **kwargs)
        self.eva_cls = nn.Linear(eva_dim, hidden_size, **kwargs)
        self.face = nn.Linear(feature_dim, hidden_size, **kwargs)
        self.video = nn.Linear(feature_dim, hidden_size, **kwargs)
        self.audio = nn.Linear(feature_dim, hidden_size, **kwargs)

    @classmethod
    def from_spec(cls, spec: FeatureSpec, hidden_size: int, **kwargs) -> EmotionLlamaProjectors:
        """Projectors for the feature dimensions of ``spec``."""
        return cls(hidden_size, eva_dim=spec.eva_dim, eva_group=spec.eva_group, feature_dim=spec.feature_dim, **kwargs)

    def forward(
        self,
        eva_patch: torch.Tensor,
        eva_cls: torch.Tensor,
        face: torch.Tensor,
        video: torch.Tensor,
        audio: torch.Tensor,
        audio_repeat: int = 1,
    ) -> torch.Tensor:
        """Project ``eva_patch`` [B, P, 4*eva_dim], ``eva_cls`` [B, eva_dim] and the [B, feature_dim] features into
        the multimodal tokens [B, P + 3 + audio_repeat, H], ordered patches, face, video, audio x repeat, CLS."""
        dtype = self.eva_patch.weight.dtype
        audio_token = self.audio(audio.to(dtype)).unsqueeze(1)
        return torch.cat(
            [
                self.eva_patch(eva_patch.to(dtype)),
                self.face(face.to(dtype)).unsqueeze(1),
                self.video(video.to(dtype)).unsqueeze(1),
                audio_token.expand(-1, audio_repeat, -1),
                self.eva_cls(eva_cls.to(dtype)).unsqueeze(1),
            ],
            dim=1,
        )
