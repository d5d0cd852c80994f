"""Modality ids from a model's own tokens: the image, video and audio placeholders its config names.

transformers' multimodal models mark where the vision and audio features go with placeholder token ids in
``input_ids`` (``image_token_id``, ``video_token_id``, ``audio_token_id``, or their ``*_token_index`` spelling), one
placeholder per feature, as their processors write them. :class:`ModalityTokens` reads those ids off a config and turns
``input_ids`` into ``modality_ids``: image and video placeholders are visual, audio placeholders audio, every other
token (markers such as ``<vision_start>`` included) text. Interleaved audio and video (Qwen2.5-Omni's
``use_audio_in_video``), several images and padding need nothing more: each position is read on its own.

Only the multimodal classes the tests check (:data:`TESTED_MULTIMODAL`, ``docs/models.md``) are taken: on another one
the placeholders may sit in a sub-config, the language model may hold encoders or cross-attention, or ``generate`` may
run a sub-model, and each of those runs silently with wrong ids. :func:`model_tokens` refuses them where MoSE or
attention reallocation is set up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .modality import Modality

VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
AUDIO_TOKEN_KEYS = ("audio_token_id", "audio_token_index")
MEDIA_KEYS = (
    "pixel_values", "pixel_values_videos", "pixel_values_images", "input_features", "input_values",
    "input_features_mask", "mm_encoder_outputs",
)
"""Call keywords that carry image, video or audio data into a transformers multimodal model (raw, or encoded by
``generate`` before its prefill: ``mm_encoder_outputs``)."""
TESTED_MULTIMODAL = (
    "LlavaForConditionalGeneration", "LlavaNextVideoForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration",
    "Qwen2AudioForConditionalGeneration",
)
"""The transformers multimodal classes (and their subclasses) whose placeholders, language model and targets the
tests check against the model's own code (``tests/test_native_models.py``)."""
TEXT_PARTS = frozenset({"text_config", "attn_config", "ffn_config"})
"""Sub-configs that describe a language model's own parts, not an encoder."""


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
        continues a cache (its prompt's ids come with the cache) or that gets embeddings and no media. Refused:
        embeddings with media (their placeholders cannot be read) and media in a call that continues a cache."""
        if inputs.is_floating_point():
            media = media_keywords(kwargs)
            if media:
                raise ValueError(
                    f"The model was called with {', '.join(media)} and `inputs_embeds` but without `modality_ids`: "
                    "the image/video/audio placeholders cannot be read off embeddings. Pass `input_ids`, or "
                    "`modality_ids` ([batch, seq] of peft_mose.Modality) with the embeddings."
                )
            return None
        if past and media_keywords(kwargs):
            raise ValueError(
                f"The model was called with {', '.join(media_keywords(kwargs))} in a call that continues a cache of "
                f"{past} positions: a call's modality ids are read off the tokens of the call that starts the "
                "sequence, and MoSE's router weight (Eq. 4) is that prompt's, so new images, video or audio cannot be "
                "weighed. Run the whole conversation, media included, as one call without the cache."
            )
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
    """The keywords of a call that carry image, video or audio data (not ``None``, nor a mapping of ``None`` only:
    ``generate`` hands an empty ``mm_encoder_outputs`` to a text-only call)."""
    def carries(value: Any) -> bool:
        return any(v is not None for v in value.values()) if isinstance(value, Mapping) else value is not None

    return [key for key in MEDIA_KEYS if carries(kwargs.get(key))]


def model_tokens(model: nn.Module) -> ModalityTokens | None:
    """The placeholder tokens of ``model`` (a transformers model; ``None`` for a text model). ``ValueError`` naming
    the class for a multimodal model that is not one of :data:`TESTED_MULTIMODAL`: MoSE and attention reallocation
    would run on it with ids and layers nobody checked."""
    config = getattr(model, "config", None)
    tokens = ModalityTokens.from_config(config)
    parts = sorted(set(getattr(config, "sub_configs", None) or ()) - TEXT_PARTS)
    if not (tokens or parts) or any(cls.__name__ in TESTED_MULTIMODAL for cls in type(model).__mro__):
        return tokens
    name = type(model).__name__
    found = ", ".join(parts) if parts else f"placeholder tokens {tokens.visual + tokens.audio}"
    hint = (
        "Use its thinker alone, `model.thinker` (Qwen2_5OmniThinkerForConditionalGeneration, as "
        "recipes/omni_finetune.py does): this class's `generate` runs the thinker as a sub-model, outside MoSE's call."
        if "thinker_config" in parts else
        "Use one of those, or its language model as a text model with `modality_ids` passed on every call."
    )
    raise ValueError(
        f"{name} is a multimodal model ({found} in its config) that peft_mose has not been tested on: its placeholder "
        "tokens, the layers of its language model and its generate loop are only checked for "
        f"{', '.join(TESTED_MULTIMODAL)} (docs/models.md), and on another class they can be wrong without any error. "
        + hint
    )
