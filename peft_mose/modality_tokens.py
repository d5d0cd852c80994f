"""Modality ids from a model's own tokens: the image, video and audio placeholders its config names.

transformers' multimodal models mark where the vision and audio features go with placeholder token ids in
``input_ids`` (``image_token_id``, ``video_token_id``, ``audio_token_id``, or their ``*_token_index`` spelling), one
placeholder per feature, as their processors write them. :class:`ModalityTokens` reads those ids off a config and turns
``input_ids`` into ``modality_ids``: image and video placeholders are visual, audio placeholders audio, every other
token (markers such as ``<vision_start>`` included) text. Interleaved audio and video (Qwen2.5-Omni's
``use_audio_in_video``), several images and padding need nothing more: each position is read on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .modality import Modality

VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
AUDIO_TOKEN_KEYS = ("audio_token_id", "audio_token_index")
MEDIA_KEYS = ("pixel_values", "pixel_values_videos", "input_features", "input_values", "input_features_mask")
"""Call keywords that carry image, video or audio data into a transformers multimodal model."""


@dataclass(frozen=True)
class ModalityTokens:
    """The placeholder token ids of a model's visual and audio features."""

    visual: tuple[int, ...]
    audio: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Any) -> ModalityTokens | None:
        """The placeholders ``config`` names (a transformers config), or ``None`` for a model without any."""
        def ids(keys: tuple[str, ...]) -> tuple[int, ...]:
            values = (getattr(config, key, None) for key in keys)
            return tuple(sorted({int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)}))

        visual, audio = ids(VISUAL_TOKEN_KEYS), ids(AUDIO_TOKEN_KEYS)
        return cls(visual, audio) if visual or audio else None

    def call_ids(self, inputs: Tensor, kwargs: Mapping[str, Any], past: int) -> Tensor | None:
        """The ids of a call whose first forward gets ``inputs`` (token ids or embeddings) and ``kwargs`` after
        ``past`` cached positions: read off the token ids of a call that starts a sequence; ``None`` for one that
        continues a cache (its prompt's ids come with the cache) or that gets embeddings and no media. Embeddings
        with media are refused: their placeholders cannot be read."""
        if inputs.is_floating_point():
            media = media_keywords(kwargs)
            if media:
                raise ValueError(
                    f"The model was called with {', '.join(media)} and `inputs_embeds` but without `modality_ids`: "
                    "the image/video/audio placeholders cannot be read off embeddings. Pass `input_ids`, or "
                    "`modality_ids` ([batch, seq] of peft_mose.Modality) with the embeddings."
                )
            return None
        return None if past else self.modality_ids(inputs if inputs.dim() > 1 else inputs[:, None])

    def modality_ids(self, input_ids: Tensor) -> Tensor:
        """``modality_ids`` of ``input_ids`` (``[batch, seq]``): VISUAL, AUDIO or TEXT per position."""
        ids = torch.full_like(input_ids, int(Modality.TEXT))
        for modality, tokens in ((Modality.VISUAL, self.visual), (Modality.AUDIO, self.audio)):
            if tokens:
                placeholder = torch.isin(input_ids, torch.tensor(tokens, device=input_ids.device))
                ids = torch.where(placeholder, int(modality), ids)
        return ids


def media_keywords(kwargs: Mapping[str, Any]) -> list[str]:
    """The keywords of a call that carry image, video or audio data (not ``None``)."""
    return [key for key in MEDIA_KEYS if kwargs.get(key) is not None]
