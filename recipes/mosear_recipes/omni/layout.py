"""Qwen2.5-Omni's input layout, written out for when ``Qwen2_5OmniProcessor`` cannot be built: in transformers 5.24
its video half (``Qwen2VLVideoProcessor``, and the processor's own class check of any video processor) needs
torchvision. What is implemented here, each part tested against an independent computation
(``tests/test_omni_media.py``):

- :func:`video_patches`: ``pixel_values_videos`` / ``video_grid_thw`` in the Qwen2-VL patch layout. Each frame goes
  through the model's own image processor (``Qwen2VLImageProcessorPil``: resize, rescale, normalize, patches, with
  ``temporal_patch_size=1``); only the grouping of ``temporal_patch_size`` consecutive frames into one patch row is
  done here (the last frame repeated to fill the final group, as ``Qwen2VLVideoProcessor.patchify`` does).
- :func:`audio_token_count`: placeholders per clip from its mel frames (``_get_feat_extract_output_lengths``).
- :func:`video_placeholders`: the text that replaces one video token: video placeholders, or with the clip's audio
  (``use_audio_in_video``) video and audio placeholders alternating by time chunk, as
  ``Qwen2_5OmniProcessor.replace_video_with_audio_token`` writes them.

Frames resized by PIL here and by torchvision in the video processor can differ by resampling rounding; the layout
and the token counts are the same.
"""

from __future__ import annotations

import numpy as np


def video_patches(frames: np.ndarray, image_processor, size: dict[str, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(pixel_values_videos, (grid_t, grid_h, grid_w))`` of ``frames`` (``[T, H, W, 3]`` uint8) resized within
    ``size`` (``shortest_edge``/``longest_edge``: min/max pixels per frame)."""
    temporal = int(image_processor.temporal_patch_size)
    out = image_processor(images=list(frames), temporal_patch_size=1, size=size, return_tensors="np")
    grids = np.asarray(out["image_grid_thw"])
    _, grid_h, grid_w = (int(v) for v in grids[0])
    rows = grid_h * grid_w
    per_frame = np.asarray(out["pixel_values"]).reshape(len(frames), rows, -1)
    if pad := -len(frames) % temporal:
        per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], pad, axis=0)])
    grid_t = len(per_frame) // temporal
    channels = 3
    patch = int(round((per_frame.shape[-1] / channels) ** 0.5))
    grouped = per_frame.reshape(grid_t, temporal, rows, channels, patch, patch).transpose(0, 2, 3, 1, 4, 5)
    return np.ascontiguousarray(grouped.reshape(grid_t * rows, channels * temporal * patch * patch)), (
        grid_t, grid_h, grid_w)  # fmt: skip


def audio_token_count(mel_frames: int) -> int:
    """Audio placeholders of ``mel_frames`` valid mel frames: a stride-2 convolution, then pooling by 2."""
    frames = (mel_frames - 1) // 2 + 1
    return (frames - 2) // 2 + 1


def chunk_sizes(positions: np.ndarray, per_chunk: int) -> list[int]:
    """How many of the increasing ``positions`` fall in each chunk ``[k per_chunk, (k + 1) per_chunk)``, a chunk
    closed at each boundary crossed (``Qwen2_5OmniProcessor.get_chunked_index``)."""
    sizes, start, boundary = [], 0, per_chunk
    for i, position in enumerate(positions.tolist()):
        if position >= boundary:
            sizes.append(i - start)
            start, boundary = i, boundary + per_chunk
    return [*sizes, len(positions) - start]


def video_placeholders(
    grid: tuple[int, int, int], merge_size: int, tokens: dict[str, str], audio_tokens: int | None = None,
    second_per_grid: float = 1.0, position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
) -> str:  # fmt: skip
    """The text replacing one video token: ``t h w / merge²`` video tokens, or with ``audio_tokens`` of the clip's
    audio, ``audio_bos``, video and audio tokens alternating by chunk of ``seconds_per_chunk``, ``audio_eos``.
    ``tokens``: ``video``, ``audio``, ``audio_bos``, ``audio_eos`` token strings."""
    t, h, w = grid
    per_time = (h // merge_size) * (w // merge_size)
    if audio_tokens is None:
        return tokens["video"] * (t * per_time)
    video_positions = np.repeat(np.arange(t), per_time) * second_per_grid * position_id_per_seconds
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video = chunk_sizes(video_positions, per_chunk)
    audio = chunk_sizes(np.arange(audio_tokens), per_chunk)
    text = tokens["audio_bos"]
    for j in range(max(len(video), len(audio))):
        text += tokens["video"] * video[j] if j < len(video) else ""
        text += tokens["audio"] * audio[j] if j < len(audio) else ""
    return text + tokens["audio_eos"]
