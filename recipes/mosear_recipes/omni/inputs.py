"""Model inputs of one clip for the Qwen2.5-Omni thinker: the prompt (ChatML, the clip's media placeholders, the
question), the target's tokens and labels, frames and audio through the model's own processors.

Two paths, chosen once per :class:`OmniEncoder` and logged: with torchvision installed, transformers'
``Qwen2_5OmniProcessor`` (its video processor included) does everything; without it (this project's CI: PyPI's
torchvision does not load beside the CPU torch build), that processor cannot be built in transformers 5.24, so the
tokenizer, the Whisper feature extractor and the PIL image processor of the model are used directly and the video
layout is :mod:`.layout`'s (docs/omni.md, "Video without torchvision").
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from peft_mose import Modality
from peft_mose.modality_tokens import ModalityTokens

from .layout import audio_token_count, video_patches, video_placeholders
from .media import Audio, Frames

logger = logging.getLogger(__name__)

PROCESSOR_PATH = "transformers Qwen2_5OmniProcessor (torchvision video processor)"
FRAMES_PATH = "PIL image processor per frame + mosear_recipes.omni.layout (no torchvision)"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                  "auditory and visual inputs, as well as generating text and speech.")  # fmt: skip
DEFAULT_QUESTION = "What emotion does the person show? Explain the cues."
VIDEO_CONFIG = "video_preprocessor_config.json"
DEFAULT_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}  # Qwen2_5OmniProcessor's


def torchvision_available() -> bool:
    """Whether torchvision can be imported (the path of :class:`OmniEncoder` depends on it)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a build that does not match torch fails at import
        return False
    return True


@dataclass(frozen=True)
class MediaInput:
    """What one prompt shows the model: sampled frames, audio, and whether the audio is the video's own track
    (interleaved with its frames: ``use_audio_in_video``)."""

    frames: Frames | None = None
    audio: Audio | None = None
    audio_in_video: bool = False


@dataclass
class EncodedClip:
    """One clip's tensors (no batch dimension on ``input_ids``/``labels``/``modality_ids``) and its placeholder
    counts. ``modality_ids`` are read off the thinker's tokens, with the target ``ANSWER``: MoSE's router then pools
    over the prompt alone, in training as at generation."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    modality_ids: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    use_audio_in_video: bool = False
    visual_tokens: int = 0
    audio_tokens: int = 0
    prompt_length: int = 0


class OmniEncoder:
    """Turns a :class:`MediaInput`, a question and a target into thinker inputs; ``path`` says which processor path
    it uses. ``video_size``: per-frame min/max pixels; ``chunking``: the thinker config's
    ``position_id_per_seconds`` and ``seconds_per_chunk`` (processor and model must agree on them)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, feature_extractor: WhisperFeatureExtractor,
        image_processor: Qwen2VLImageProcessorPil, video_size: dict[str, int], thinker_config: Any,
        system_prompt: str = DEFAULT_SYSTEM, question: str = DEFAULT_QUESTION, processor: Any = None,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.image_processor = image_processor
        self.video_size = dict(video_size)
        self.position_id_per_seconds = float(thinker_config.position_id_per_seconds)
        self.seconds_per_chunk = float(thinker_config.seconds_per_chunk)
        self.modality_tokens = ModalityTokens.from_config(thinker_config)
        self.system_prompt = system_prompt
        self.question = question
        self.processor = processor
        self.path = PROCESSOR_PATH if processor is not None else FRAMES_PATH
        self.tokens = {name: getattr(tokenizer, f"{name}_token") for name in
                       ("video", "audio", "vision_bos", "vision_eos", "audio_bos", "audio_eos")}  # fmt: skip
        self.end_id = tokenizer.convert_tokens_to_ids(IM_END)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def max_audio_seconds(self) -> float:
        """The longest audio the feature extractor keeps (it pads/cuts every clip to this many seconds)."""
        return float(self.feature_extractor.n_samples / self.sampling_rate)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, thinker_config: Any, max_pixels: int | None = None,
                        **prompt: str) -> OmniEncoder:  # fmt: skip
        """The encoder of a model folder: its tokenizer, feature extractor and image processor, its video settings
        (``video_preprocessor_config.json``'s ``size``, else ``Qwen2_5OmniProcessor``'s), ``max_pixels`` capping
        the pixels per frame; the full processor when torchvision is installed. The path is logged."""
        model_path = Path(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(model_path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        size = dict(DEFAULT_VIDEO_SIZE)
        video_config = model_path / VIDEO_CONFIG
        if video_config.is_file():
            size.update(json.loads(video_config.read_text(encoding="utf-8")).get("size", {}))
        if max_pixels is not None:
            size["longest_edge"] = min(size["longest_edge"], max_pixels)
            size["shortest_edge"] = min(size["shortest_edge"], size["longest_edge"])
        processor = None
        if torchvision_available():
            from transformers import Qwen2_5OmniProcessor, Qwen2VLVideoProcessor

            video_processor = Qwen2VLVideoProcessor(
                size=size, patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                temporal_patch_size=image_processor.temporal_patch_size,
            )  # fmt: skip
            processor = Qwen2_5OmniProcessor(image_processor, video_processor, feature_extractor, tokenizer)
        encoder = cls(tokenizer, feature_extractor, image_processor, size, thinker_config, processor=processor, **prompt)
        logger.info("Omni inputs: %s.", encoder.path)
        return encoder

    def prompt(self, media: MediaInput) -> str:
        """The ChatML prompt with one video and/or one audio placeholder, as the processor expects them."""
        parts = []
        if media.frames is not None:
            parts.append(self.tokens["vision_bos"] + self.tokens["video"] + self.tokens["vision_eos"])
        if media.audio is not None and not media.audio_in_video:
            parts.append(self.tokens["audio_bos"] + self.tokens["audio"] + self.tokens["audio_eos"])
        return (f"{IM_START}system\n{self.system_prompt}{IM_END}\n{IM_START}user\n{''.join(parts)}{self.question}"
                f"{IM_END}\n{IM_START}assistant\n")  # fmt: skip

    def audio_tokens(self, audio: Audio) -> int:
        """How many audio placeholders ``audio`` becomes (0 for a clip shorter than about 40 ms)."""
        return audio_token_count(int(self._audio_features(audio)["feature_attention_mask"].sum()))

    def _audio_features(self, audio: Audio) -> dict[str, torch.Tensor]:
        features = self.feature_extractor(
            audio.samples, sampling_rate=self.sampling_rate, padding="max_length", return_attention_mask=True,
            return_tensors="pt",
        )  # fmt: skip
        return {"input_features": features["input_features"], "feature_attention_mask": features["attention_mask"]}

    def _expand(self, prompt: str, media: MediaInput) -> tuple[str, dict[str, torch.Tensor]]:
        """The prompt with its placeholders expanded, and the media tensors (the path without torchvision)."""
        tensors: dict[str, torch.Tensor] = {}
        audio_tokens = None
        if media.audio is not None:
            tensors |= self._audio_features(media.audio)
            audio_tokens = audio_token_count(int(tensors["feature_attention_mask"].sum()))
            if not media.audio_in_video:
                prompt = prompt.replace(self.tokens["audio"], self.tokens["audio"] * audio_tokens, 1)
        if media.frames is not None:
            pixels, grid = video_patches(media.frames.pixels, self.image_processor, self.video_size)
            second_per_grid = self.image_processor.temporal_patch_size / media.frames.fps
            text = video_placeholders(
                grid, self.image_processor.merge_size, self.tokens, audio_tokens if media.audio_in_video else None,
                second_per_grid, self.position_id_per_seconds, self.seconds_per_chunk,
            )  # fmt: skip
            prompt = prompt.replace(self.tokens["video"], text, 1)
            tensors |= {"pixel_values_videos": torch.from_numpy(pixels), "video_grid_thw": torch.tensor([grid]),
                        "video_second_per_grid": torch.tensor([second_per_grid])}  # fmt: skip
        return prompt, tensors

    def _processor_inputs(self, prompt: str, media: MediaInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prompt's ids and media tensors from ``Qwen2_5OmniProcessor`` (the path with torchvision)."""
        kwargs: dict[str, Any] = {"seconds_per_chunk": self.seconds_per_chunk,
                                  "position_id_per_seconds": self.position_id_per_seconds}  # fmt: skip
        if media.frames is not None:
            kwargs["videos"] = [media.frames.pixels]
            kwargs["videos_kwargs"] = {"fps": media.frames.fps, "do_sample_frames": False}
        if media.audio is not None:
            kwargs["audio"] = [media.audio.samples]
            if media.audio_in_video:
                kwargs |= {"load_audio_from_video": True, "audio_from_video_indices": [0]}
        out = self.processor(text=[prompt], return_tensors="pt", **kwargs)
        keep = ("pixel_values_videos", "video_grid_thw", "video_second_per_grid", "input_features",
                "feature_attention_mask")  # fmt: skip
        media_tensors = {k: torch.as_tensor(out[k]) for k in keep if k in out}
        return out["input_ids"][0], media_tensors

    def encode(self, media: MediaInput, target: str | None = None) -> EncodedClip:
        """The clip's inputs; with a ``target``, its tokens and ``<|im_end|>`` follow the prompt and are the only
        positions with labels."""
        if media.frames is None and media.audio is None:
            raise ValueError("A prompt needs frames or audio.")
        prompt = self.prompt(media)
        if self.processor is not None:
            prompt_ids, tensors = self._processor_inputs(prompt, media)
        else:
            text, tensors = self._expand(prompt, media)
            prompt_ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        target_ids = torch.tensor([], dtype=torch.long)
        if target is not None:
            target_ids = torch.tensor(self.tokenizer(target + IM_END, add_special_tokens=False)["input_ids"])
        input_ids = torch.cat([prompt_ids.long(), target_ids.long()])
        labels = torch.cat([torch.full_like(prompt_ids, -100), target_ids]).long()
        modality = self.modality_tokens.modality_ids(input_ids[None])[0]
        modality[len(prompt_ids):] = int(Modality.ANSWER)
        return EncodedClip(
            input_ids=input_ids,
            labels=labels,
            modality_ids=modality,
            media=tensors,
            use_audio_in_video=media.audio_in_video and media.frames is not None and media.audio is not None,
            visual_tokens=int((modality == int(Modality.VISUAL)).sum()),
            audio_tokens=int((modality == int(Modality.AUDIO)).sum()),
            prompt_length=len(prompt_ids),
        )


def collate(clips: list[EncodedClip], pad_id: int) -> dict[str, Any]:
    """A batch, left-padded (``pad_id``, labels -100): media tensors concatenated in sample order (the model
    matches them to the placeholders in that order). Samples must agree on ``use_audio_in_video``."""
    flags = {clip.use_audio_in_video for clip in clips}
    if len(flags) > 1:
        raise ValueError("A batch mixes clips whose audio is interleaved with their video (use_audio_in_video) and "
                         "clips where it is not; train with --per_device_train_batch_size 1 or give every clip the "
                         "same media.")  # fmt: skip
    length = max(len(clip.input_ids) for clip in clips)
    input_ids = torch.full((len(clips), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(clips), length), dtype=torch.long)
    labels = torch.full((len(clips), length), -100, dtype=torch.long)
    modality_ids = torch.full((len(clips), length), int(Modality.TEXT), dtype=torch.long)
    for i, clip in enumerate(clips):
        n = len(clip.input_ids)
        input_ids[i, length - n:], attention_mask[i, length - n:] = clip.input_ids, 1
        labels[i, length - n:], modality_ids[i, length - n:] = clip.labels, clip.modality_ids
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                             "modality_ids": modality_ids}  # fmt: skip
    for key in sorted({k for clip in clips for k in clip.media}):
        batch[key] = torch.cat([clip.media[key] for clip in clips if key in clip.media])
    if flags == {True}:
        batch["use_audio_in_video"] = True
    return batch

