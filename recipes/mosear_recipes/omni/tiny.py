"""The built-in tiny default: a random Qwen2.5-Omni thinker built from its config with an offline word-level
tokenizer carrying Qwen2.5-Omni's special tokens, its processors' configs, and short synthetic clips written as real
``.mp4`` (H.264/MPEG-4 video + AAC audio) and ``.wav`` files: a coloured square that moves (video cue) and a tone
(audio cue) per emotion. Consistent clips agree; video-aligned clips carry another emotion's tone, audio-aligned
clips another emotion's square, so the emotion is readable from the video alone, the audio alone, or neither."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .inputs import DEFAULT_QUESTION, IM_END, IM_START, VIDEO_CONFIG

SAMPLING_RATE = 16000
SIZE = 32
FPS = 8
SECONDS = 2.0
TINY_SYSTEM = "You are a tiny emotion model."
MEDIA_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # fmt: skip
SPECIAL = ["<|endoftext|>", IM_START, IM_END, *MEDIA_TOKENS.values()]


@dataclass(frozen=True)
class Emotion:
    """A synthetic emotion: the square's colour (RGB) and motion (pixels per second, x and y), the tone (Hz)."""

    name: str
    colour: tuple[int, int, int]
    motion: tuple[float, float]
    tone: float
    reason_video: str
    reason_audio: str


EMOTIONS = (
    Emotion("happy", (250, 220, 40), (0.0, -8.0), 660.0, "a bright square rises", "a high tone"),
    Emotion("sad", (40, 60, 220), (0.0, 8.0), 220.0, "a blue square sinks", "a low tone"),
    Emotion("angry", (230, 30, 30), (10.0, 0.0), 440.0, "a red square rushes sideways", "a middle tone"),
)


def frames_of(emotion: Emotion, seconds: float = SECONDS, fps: int = FPS, size: int = SIZE) -> np.ndarray:
    """``[T, size, size, 3]`` uint8: a grey background and the emotion's square moving."""
    count = int(round(seconds * fps))
    frames = np.full((count, size, size, 3), 96, np.uint8)
    side = size // 4
    for i in range(count):
        t = i / fps
        x = int((size - side) / 2 + emotion.motion[0] * t) % (size - side)
        y = int((size - side) / 2 + emotion.motion[1] * t) % (size - side)
        frames[i, y:y + side, x:x + side] = emotion.colour
    return frames


def tone_of(emotion: Emotion, seconds: float = SECONDS, rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 samples: the emotion's tone, faded in and out."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.minimum(1.0, np.minimum(t, seconds - t) * 10)
    return (0.3 * envelope * np.sin(2 * np.pi * emotion.tone * t)).astype(np.float32)


def write_clip(path: Path, frames: np.ndarray | None, audio: np.ndarray | None, fps: int = FPS,
               rate: int = SAMPLING_RATE) -> Path:  # fmt: skip
    """Write ``frames`` (MPEG-4 Part 2 video) and/or ``audio`` (AAC, mono) into the container ``path`` with PyAV."""
    import av

    with av.open(str(path), "w") as container:  # every stream is added before the first packet is written
        video = container.add_stream("mpeg4", rate=fps) if frames is not None else None
        sound = container.add_stream("aac", rate=rate, layout="mono") if audio is not None else None
        if video is not None:
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            video.bit_rate = 400_000
            for image in frames:
                container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(video.encode())
        if sound is not None:
            for start in range(0, len(audio), 1024):
                frame = av.AudioFrame.from_ndarray(audio[None, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def _target(video: Emotion, audio: Emotion, label: Emotion) -> str:
    return f"{label.name} . {video.reason_video} and {audio.reason_audio}"


def write_tiny_clips(out_dir: str | Path) -> Path:
    """Write the clips and ``train.jsonl`` (every clip, with CA-MER subsets) to ``out_dir``; returns the manifest.
    The video shows one emotion, the audio track another or the same; the label is the aligned one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, emotion in enumerate(EMOTIONS):
        other = EMOTIONS[(i + 1) % len(EMOTIONS)]
        for subset, video, audio in (("consistent", emotion, emotion), ("video_aligned", emotion, other),
                                     ("audio_aligned", other, emotion)):  # fmt: skip
            name = f"{emotion.name}_{subset}"
            write_clip(out_dir / f"{name}.mp4", frames_of(video), tone_of(audio))
            records.append({"id": name, "video": f"{name}.mp4", "target": _target(video, audio, emotion),
                            "label": emotion.name, "subset": subset})  # fmt: skip
    manifest = out_dir / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return manifest


def tiny_corpus() -> list[str]:
    """Every word the tiny prompts and targets use."""
    words = [TINY_SYSTEM, DEFAULT_QUESTION, "system user assistant and ."]
    for emotion in EMOTIONS:
        words += [emotion.name, emotion.reason_video, emotion.reason_audio]
    return words


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`tiny_corpus` with Qwen2.5-Omni's special tokens (named as its tokenizer
    names them: ``video_token``, ``audio_bos_token``, ...)."""
    vocabulary = ["[UNK]", *SPECIAL]
    pre = pre_tokenizers.Whitespace()
    for text in tiny_corpus():
        for word, _ in pre.pre_tokenize_str(text):
            if word not in vocabulary:
                vocabulary.append(word)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre
    tokenizer.add_special_tokens(SPECIAL)  # matched whole, before the pre-tokenizer splits on punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token=IM_END,
        extra_special_tokens=MEDIA_TOKENS,
    )  # fmt: skip


def tiny_thinker_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5OmniThinkerConfig:
    """A 2-layer thinker (hidden 64) with 2-layer vision and audio towers; ids from ``tokenizer``;
    ``seconds_per_chunk=1`` (2 as released) so a 2-second clip's video and audio interleave in two chunks."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in MEDIA_TOKENS.items()}
    hidden, encoder = 64, 32
    # initializer_range 0.2 (0.02 as released; the thinker's own is the one its weights are drawn with): peaked
    # attention, so that a q/v adapter on this random model learns the clips in seconds (at 0.02 LoRA and MoSE alike
    # stall at the targets' unigram loss)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, initializer_range=0.2, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=2, hidden_size=encoder, intermediate_size=2 * encoder, num_heads=2, out_hidden_size=hidden,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                  fullatt_block_indexes=[1])  # fmt: skip
    audio = dict(num_mel_bins=8, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=2 * encoder,
                 d_model=encoder, max_source_positions=32, n_window=16, output_dim=hidden)  # fmt: skip
    return Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        image_token_index=ids["image_token"], video_token_index=ids["video_token"],
        audio_token_index=ids["audio_token"], vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], seconds_per_chunk=1, initializer_range=0.2,
    )  # fmt: skip


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the random thinker (safetensors), its tokenizer, Whisper feature extractor (8 mel bins, 4-second
    window), PIL image processor and video size to ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_thinker_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    size = {"shortest_edge": 8 * 8, "longest_edge": SIZE * SIZE}
    # The image processor and the feature extractor share preprocessor_config.json, as in the released model.
    image = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, size=size).to_dict()
    audio = WhisperFeatureExtractor(feature_size=8, sampling_rate=SAMPLING_RATE, chunk_length=4).to_dict()
    (out_dir / "preprocessor_config.json").write_text(json.dumps({**audio, **image}, indent=2), encoding="utf-8")
    (out_dir / VIDEO_CONFIG).write_text(json.dumps({"size": size}, indent=2), encoding="utf-8")
    return out_dir
