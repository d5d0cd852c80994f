"""The clips of a manifest as a dataset: every clip decoded and encoded once when the dataset is opened (so a bad
file is an error naming it before any training step), its visual and audio token counts logged; items are decoded
again when read (nothing large is held in memory)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .inputs import EncodedClip, MediaInput, OmniEncoder
from .manifest import ClipRecord, read_manifest
from .media import MediaError, has_audio_stream, read_audio, read_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaOptions:
    """How clips are read: frame rate and bound, pixel bound (in the encoder), audio bound and mode."""

    fps: float = 2.0
    max_frames: int = 32
    max_audio_seconds: float | None = None
    audio: str = "required"
    use_audio_in_video: bool = True


def clip_media(record: ClipRecord, encoder: OmniEncoder, options: MediaOptions) -> MediaInput:
    """Decode one clip: frames of its video, audio from its ``audio`` file or else its video's track (per
    ``options.audio``); errors name the file and the manifest line."""
    try:
        frames = read_frames(record.video, options.fps, options.max_frames) if record.video else None
        audio = None
        limit = min(options.max_audio_seconds or encoder.max_audio_seconds, encoder.max_audio_seconds)
        if options.audio != "none":
            source = record.audio or record.video
            if record.audio is None and not has_audio_stream(record.video):
                if options.audio == "required":
                    raise MediaError(record.video, "no audio stream, and no 'audio' file in the manifest (give one, "
                                     "or run with --audio optional / --audio none)")  # fmt: skip
                source = None
            if source is not None:
                audio = read_audio(source, encoder.sampling_rate, limit)
                if encoder.audio_tokens(audio) == 0:
                    raise MediaError(source, f"{1000 * audio.seconds:.0f} ms of audio is too short to give the model "
                                             "a single audio token")
    except MediaError as error:
        raise MediaError(error.path, f"{error.problem} [{record.where}]") from None
    if frames is None and audio is None:
        raise MediaError(record.audio or record.video, f"nothing to show the model with --audio none [{record.where}]")
    return MediaInput(frames, audio, options.use_audio_in_video and frames is not None and audio is not None)


class ClipDataset(Dataset):
    """The clips of ``manifest``, checked and counted at construction (``counts``: visual and audio tokens per clip id;
    ``interleaved``: whether its audio is interleaved with its video); items are :class:`EncodedClip`."""

    def __init__(self, manifest: str | Path, encoder: OmniEncoder, options: MediaOptions, need_target: bool = True):
        self.records = read_manifest(manifest, need_target)
        self.encoder = encoder
        self.options = options
        self.counts: dict[str, tuple[int, int]] = {}
        self.interleaved: dict[str, bool] = {}
        without_audio = 0
        for record in self.records:
            clip = self._encode(record)
            self.counts[record.id] = (clip.visual_tokens, clip.audio_tokens)
            self.interleaved[record.id] = clip.use_audio_in_video
            without_audio += clip.audio_tokens == 0
            logger.info("clip %s: %d visual and %d audio tokens (%s)", record.id, clip.visual_tokens, clip.audio_tokens,
                        ratio(clip.visual_tokens, clip.audio_tokens))  # fmt: skip
        visual = sum(v for v, _ in self.counts.values())
        audio = sum(a for _, a in self.counts.values())
        logger.info("%s: %d clips, %d visual and %d audio tokens in all (%s)%s.", manifest, len(self.records), visual,
                    audio, ratio(visual, audio),
                    f"; {without_audio} without audio" if without_audio else "")  # fmt: skip

    def _encode(self, record: ClipRecord) -> EncodedClip:
        media = clip_media(record, self.encoder, self.options)
        try:
            return self.encoder.encode(media, record.target)
        except ValueError as error:  # the processors' refusals (e.g. a frame's aspect ratio) name no file
            raise ValueError(f"{record.where}: {error}") from error

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedClip:
        return self._encode(self.records[index])


def ratio(visual: int, audio: int) -> str:
    """``"visual:audio = 259.0:1"``, or ``"no audio"``."""
    return f"visual:audio = {visual / audio:.1f}:1" if audio else "no audio"
