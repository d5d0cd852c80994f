"""Tiny random transformers multimodal models with the inputs their processors would produce (no downloads).

``build_native(name)`` returns a :class:`NativeCase`: a model built from configs with fresh seeded weights, and a
batch laid out as the model's processor writes it: one placeholder token per image/video/audio feature the model
inserts (counted the way the processor counts them), the start/end tokens around them, grid and feature masks, and
``mm_token_type_ids`` where the model reads them. Samples differ in length; the shorter ones are padded with the text
config's pad id. ``case.modality`` marks exactly the placeholder positions (visual: image and video, audio: audio).

All models share one vocabulary: ids 0-2 pad/bos/eos, random text from ``[3, FIRST_SPECIAL)``, every special and
placeholder id from ``FIRST_SPECIAL`` on. Generation is not constrained: a random model may emit a placeholder id.

Not built here: ``Gemma3nForConditionalGeneration``. Its vision tower is a ``TimmWrapperModel``, which needs ``timm``:
without it, building the model raises "ImportError: TimmWrapperModel requires the timm library but it was not found
in your environment"; and ``timm`` (1.0.31) fails to import without torchvision ("ModuleNotFoundError: No module named
'torchvision'", from ``timm/layers/create_norm.py``), whose PyPI builds do not match this torch build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from peft_mose import Modality

TEXT, VISUAL, AUDIO = int(Modality.TEXT), int(Modality.VISUAL), int(Modality.AUDIO)

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
FIRST_SPECIAL = 120
IMAGE, VIDEO, AUDIO_PAD, VISION_START, VISION_END, AUDIO_START, AUDIO_END = range(FIRST_SPECIAL, FIRST_SPECIAL + 7)

HIDDEN = 64  # the language models
ENCODER_HIDDEN = 32  # the vision and audio towers
PATCH = 4  # pixels per patch side
MERGE = 2  # Qwen vision: 2x2 patches merged into one placeholder
TEMPORAL_PATCH = 2  # Qwen vision: frames per temporal patch
FPS = 2.0  # the Qwen processors' default frame rate: one temporal patch per second
MEL_BINS = 8


@dataclass(frozen=True)
class NativeCase:
    """A tiny model and one batch of its native inputs."""

    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor | bool]
    """Keyword arguments of ``model(...)`` and ``model.generate(...)``: tensors, and ``use_audio_in_video=True`` in
    the interleaved Omni case."""
    modality: torch.Tensor
    """``[batch, seq]`` long: the ``Modality`` of each position of ``inputs["input_ids"]``."""
    visual_keys: tuple[str, ...]
    """The inputs of the images and videos: pixels, grids or sizes, and seconds per temporal patch of videos."""
    audio_keys: tuple[str, ...]
    """The inputs of the audio: ``input_features`` and ``feature_attention_mask``."""


@dataclass(frozen=True)
class _Run:
    """``count`` consecutive positions of a sample: ``token`` repeated, or random text when it is ``None``."""

    token: int | None
    count: int
    modality: int = TEXT


@dataclass(frozen=True)
class _Parts:
    """What a builder makes: the model, each sample's runs, and the media inputs."""

    model: nn.Module
    samples: list[list[_Run]]
    media: dict[str, torch.Tensor | bool]
    visual_keys: tuple[str, ...] = ()
    audio_keys: tuple[str, ...] = ()
    mm_token_type_ids: bool = False
    """Whether the model takes ``mm_token_type_ids`` (the Qwen-VL processors return them)."""


def _text(count: int) -> _Run:
    return _Run(None, count)


def _token(token: int) -> _Run:
    return _Run(token, 1)


def _prompt(i: int, media: Sequence[_Run], bos: bool = False) -> list[_Run]:
    """Sample ``i``: text, the media, text. The text before the media grows with ``i``, so lengths differ."""
    return [*([_token(BOS)] if bos else []), _text(2 + 3 * i), *media, _text(3)]


def _collate(samples: Sequence[Sequence[_Run]], gen: torch.Generator, left_pad: bool) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``modality`` of the samples, padded with ``PAD`` to the longest."""
    rows, mods = [], []
    for runs in samples:
        rows.append(
            torch.cat(
                [
                    torch.randint(3, FIRST_SPECIAL, (run.count,), generator=gen)
                    if run.token is None
                    else torch.full((run.count,), run.token)
                    for run in runs
                ]
            )
        )
        mods.append(torch.cat([torch.full((run.count,), run.modality) for run in runs]))
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    modality = torch.full((len(rows), length), TEXT, dtype=torch.long)
    for i, (row, mod) in enumerate(zip(rows, mods)):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        input_ids[i, span], attention_mask[i, span], modality[i, span] = row, 1, mod
    return {"input_ids": input_ids, "attention_mask": attention_mask, "modality": modality}


def _text_values() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def _qwen_text_values() -> dict:
    """Qwen text configs: multimodal RoPE, the head dim 16 split into (temporal, height, width) sections."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return dict(_text_values(), rope_parameters=rope)


def _qwen_vision_values() -> dict:
    """The Qwen2.5 vision tower (also Omni's): windows of 2x2 merged patches, full attention in the last block."""
    return dict(
        depth=2,
        hidden_size=ENCODER_HIDDEN,
        intermediate_size=2 * ENCODER_HIDDEN,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        window_size=2 * MERGE * PATCH,
        fullatt_block_indexes=[1],
    )


def _qwen_audio_values() -> dict:
    return dict(
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * ENCODER_HIDDEN,
        d_model=ENCODER_HIDDEN,
        max_source_positions=32,
    )


def _clip(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=ENCODER_HIDDEN,
        intermediate_size=2 * ENCODER_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=ENCODER_HIDDEN,
    )


def _qwen_patches(grids: Sequence[tuple[int, int, int]], gen: torch.Generator) -> torch.Tensor:
    """Pixels as the Qwen-VL image and video processors return them: one flattened row per (t, h, w) patch."""
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=gen)


def _merged(grid: tuple[int, int, int]) -> int:
    """The placeholders of one Qwen image or video: its patches, 2x2 merged."""
    t, h, w = grid
    return t * h * w // MERGE**2


def _audio_tokens(frames: int) -> int:
    """The placeholders of ``frames`` mel frames (a stride-2 conv, then pooling by 2), as the Qwen processors count."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _audio_features(frames: Sequence[int], padded: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Log-mel ``input_features`` padded to ``padded`` frames, and the ``feature_attention_mask`` of the real ones."""
    mask = (torch.arange(padded)[None, :] < torch.tensor(frames)[:, None]).long()
    features = torch.randn(len(frames), MEL_BINS, padded, generator=gen) * mask[:, None, :]
    return {"input_features": features, "feature_attention_mask": mask}


def _llava(batch: int, gen: torch.Generator) -> _Parts:
    """LLaVA: a 16x16 image per sample; the "default" feature strategy drops CLIP's CLS: a placeholder per patch."""
    image_size = 16
    tokens = (image_size // PATCH) ** 2
    config = LlavaConfig(
        vision_config=_clip(image_size),
        text_config=LlamaConfig(**_text_values()),
        image_token_index=IMAGE,
        image_seq_length=tokens,
    )
    samples = [_prompt(i, [_Run(IMAGE, tokens, VISUAL)], bos=True) for i in range(batch)]
    media = {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=gen)}
    return _Parts(LlavaForConditionalGeneration(config), samples, media, visual_keys=tuple(media))


def _llava_next_video(batch: int, gen: torch.Generator) -> _Parts:
    """LLaVA-NeXT-Video: a 2-frame 16x16 video per sample (16 patches a frame, pooled 2x2: 4 placeholders a frame)
    and a 16x16 image in sample 0, one "anyres" tile of its own size: the base view less CLIP's CLS and the tile,
    16 patches each, and a newline per row of the tile: 36 placeholders."""
    image_size, frames = 16, 2
    side = image_size // PATCH
    config = LlavaNextVideoConfig(
        vision_config=_clip(image_size),
        text_config=LlamaConfig(**_text_values()),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=[[image_size, image_size]],
        image_seq_length=2 * side * side + side,
        video_seq_length=frames * side * side // 4,
    )
    samples = []
    for i in range(batch):
        image = [_Run(IMAGE, config.image_seq_length, VISUAL), _text(1)] if i == 0 else []
        samples.append(_prompt(i, [*image, _Run(VIDEO, config.video_seq_length, VISUAL)], bos=True))
    media = {
        "pixel_values": torch.randn(1, 2, 3, image_size, image_size, generator=gen),
        "image_sizes": torch.tensor([[image_size, image_size]]),
        "pixel_values_videos": torch.randn(batch, frames, 3, image_size, image_size, generator=gen),
    }
    return _Parts(LlavaNextVideoForConditionalGeneration(config), samples, media, visual_keys=tuple(media))


def _qwen_vl_parts(model: nn.Module, batch: int, gen: torch.Generator, video_seconds: bool) -> _Parts:
    """Qwen2-VL and Qwen2.5-VL: an image (grid 1x4x4, 4 placeholders) in even samples, a 4-frame video (grid 2x4x4,
    8 placeholders) in odd ones, each between vision start/end tokens. ``video_seconds``: the processor returns the
    videos' ``second_per_grid_ts`` (Qwen2.5-VL)."""
    image_grid, video_grid = (1, 4, 4), (2, 4, 4)
    samples, images, videos = [], [], []
    for i in range(batch):
        grid, token, grids = (video_grid, VIDEO, videos) if i % 2 else (image_grid, IMAGE, images)
        grids.append(grid)
        samples.append(_prompt(i, [_token(VISION_START), _Run(token, _merged(grid), VISUAL), _token(VISION_END)]))
    media: dict[str, torch.Tensor | bool] = {}
    if images:
        media |= {"pixel_values": _qwen_patches(images, gen), "image_grid_thw": torch.tensor(images)}
    if videos:
        media |= {"pixel_values_videos": _qwen_patches(videos, gen), "video_grid_thw": torch.tensor(videos)}
        if video_seconds:
            media["second_per_grid_ts"] = torch.full((len(videos),), TEMPORAL_PATCH / FPS)
    return _Parts(model, samples, media, visual_keys=tuple(media), mm_token_type_ids=True)


def _qwen2_vl(batch: int, gen: torch.Generator) -> _Parts:
    vision = dict(
        depth=2,
        embed_dim=ENCODER_HIDDEN,
        hidden_size=HIDDEN,
        mlp_ratio=2,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text_values(),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return _qwen_vl_parts(Qwen2VLForConditionalGeneration(config), batch, gen, video_seconds=False)


def _qwen2_5_vl(batch: int, gen: torch.Generator) -> _Parts:
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_values(),
        vision_config=_qwen_vision_values(),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return _qwen_vl_parts(Qwen2_5_VLForConditionalGeneration(config), batch, gen, video_seconds=True)


def _omni_config() -> Qwen2_5OmniThinkerConfig:
    """Qwen2.5-Omni's thinker. ``seconds_per_chunk=1`` (2 in the released model) so that a short video and its audio
    already interleave in two chunks; 25 positions per second, the audio tokens' rate, as released. The vision
    start/end ids are not fields of the config but ``get_rope_index`` reads them (the released config sets them)."""
    return Qwen2_5OmniThinkerConfig(
        text_config=_qwen_text_values(),
        vision_config=_qwen_vision_values(),
        audio_config=dict(_qwen_audio_values(), n_window=16, output_dim=HIDDEN),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        audio_token_index=AUDIO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        audio_start_token_id=AUDIO_START,
        audio_end_token_id=AUDIO_END,
        seconds_per_chunk=1,
    )


def _chunk_sizes(positions: torch.Tensor, per_chunk: int) -> list[int]:
    """How many of the (increasing) ``positions`` fall in each chunk ``[k per_chunk, (k + 1) per_chunk)``, the way the
    Omni processor's ``get_chunked_index`` splits them: one chunk closed at each boundary crossed."""
    sizes, start, boundary = [], 0, per_chunk
    for i, position in enumerate(positions.tolist()):
        if position >= boundary:
            sizes.append(i - start)
            start, boundary = i, boundary + per_chunk
    return [*sizes, len(positions) - start]


def _video_with_audio(config: Qwen2_5OmniThinkerConfig, grid: tuple[int, int, int], audio_tokens: int) -> list[_Run]:
    """A video with its audio track (``use_audio_in_video``): video and audio placeholders alternating by time chunk,
    as ``Qwen2_5OmniProcessor.replace_video_with_audio_token`` writes them."""
    t, h, w = grid
    seconds = torch.arange(t).repeat_interleave(h * w // MERGE**2) * TEMPORAL_PATCH / FPS
    per_chunk = int(config.position_id_per_seconds * config.seconds_per_chunk)
    video = _chunk_sizes(seconds * config.position_id_per_seconds, per_chunk)
    audio = _chunk_sizes(torch.arange(audio_tokens), per_chunk)
    runs = [_token(VISION_START), _token(AUDIO_START)]
    for j in range(max(len(video), len(audio))):
        runs += [_Run(VIDEO, video[j], VISUAL)] if j < len(video) else []
        runs += [_Run(AUDIO_PAD, audio[j], AUDIO)] if j < len(audio) else []
    return [*runs, _token(AUDIO_END), _token(VISION_END)]


def _omni_parts(batch: int, gen: torch.Generator, interleaved: bool) -> _Parts:
    """Qwen2.5-Omni's thinker: a 4-frame video (grid 2x4x4) and an audio clip per sample, 120 mel frames (1.2 s,
    30 placeholders) in even samples and 88 (22) in odd ones, padded to 128. The video and the audio between their
    own start/end tokens, or, ``interleaved``, the audio as the video's track (``use_audio_in_video=True``)."""
    config = _omni_config()
    grid = (2, 4, 4)
    frames = [88 if i % 2 else 120 for i in range(batch)]
    samples = []
    for i, count in enumerate(frames):
        if interleaved:
            media = _video_with_audio(config, grid, _audio_tokens(count))
        else:
            video = [_token(VISION_START), _Run(VIDEO, _merged(grid), VISUAL), _token(VISION_END)]
            audio = [_token(AUDIO_START), _Run(AUDIO_PAD, _audio_tokens(count), AUDIO), _token(AUDIO_END)]
            media = [*video, _text(2), *audio]
        samples.append(_prompt(i, media))
    visual = {
        "pixel_values_videos": _qwen_patches([grid] * batch, gen),
        "video_grid_thw": torch.tensor([grid] * batch),
        "video_second_per_grid": torch.full((batch,), TEMPORAL_PATCH / FPS),
    }
    audio_inputs = _audio_features(frames, 128, gen)
    flags = {"use_audio_in_video": True} if interleaved else {}
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    return _Parts(model, samples, visual | audio_inputs | flags, tuple(visual), tuple(audio_inputs))


def _qwen2_5_omni_thinker(batch: int, gen: torch.Generator) -> _Parts:
    return _omni_parts(batch, gen, interleaved=False)


def _qwen2_5_omni_thinker_interleaved(batch: int, gen: torch.Generator) -> _Parts:
    return _omni_parts(batch, gen, interleaved=True)


def _qwen2_audio(batch: int, gen: torch.Generator) -> _Parts:
    """Qwen2-Audio: a clip per sample, 64 mel frames (16 placeholders) in even samples and 40 (10) in odd ones. Its
    encoder takes exactly ``2 * max_source_positions`` frames (3000, 30 s, as released): the processor pads to that."""
    config = Qwen2AudioConfig(
        audio_config=_qwen_audio_values(),
        text_config=Qwen2Config(**_text_values()),
        audio_token_index=AUDIO_PAD,
    )
    frames = [40 if i % 2 else 64 for i in range(batch)]
    samples = [
        _prompt(i, [_token(AUDIO_START), _Run(AUDIO_PAD, _audio_tokens(count), AUDIO), _token(AUDIO_END)])
        for i, count in enumerate(frames)
    ]
    audio = _audio_features(frames, 2 * config.audio_config.max_source_positions, gen)
    return _Parts(Qwen2AudioForConditionalGeneration(config), samples, audio, audio_keys=tuple(audio))


_BUILDERS: dict[str, Callable[[int, torch.Generator], _Parts]] = {
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen2_5_omni_thinker": _qwen2_5_omni_thinker,
    "qwen2_5_omni_thinker_interleaved": _qwen2_5_omni_thinker_interleaved,
    "llava_next_video": _llava_next_video,
    "qwen2_audio": _qwen2_audio,
}

NATIVE_MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_native(name: str, seed: int = 0, batch: int = 2, left_pad: bool = True) -> NativeCase:
    """The model ``name`` (one of ``NATIVE_MODELS``) with fresh weights from ``seed``, in eval mode, and ``batch``
    samples of different lengths, the shorter ones padded on the left (``left_pad``) or on the right."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown native model {name!r}; expected one of {NATIVE_MODELS}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    parts = _BUILDERS[name](batch, gen)
    model = parts.model.eval()
    model.generation_config.pad_token_id = PAD
    inputs = _collate(parts.samples, gen, left_pad)
    modality = inputs.pop("modality")
    if parts.mm_token_type_ids:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long() + 2 * (inputs["input_ids"] == VIDEO).long()
    return NativeCase(name, model, inputs | parts.media, modality, parts.visual_keys, parts.audio_keys)
