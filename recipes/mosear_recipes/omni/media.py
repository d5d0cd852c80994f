"""Decoding raw clips with PyAV: frames sampled at a frame rate (at most ``max_frames``, spread over the clip), audio
decoded, mixed to mono and resampled to the feature extractor's rate (at most ``max_audio_seconds``). Every problem
with a file is a :class:`MediaError` naming it, raised while the data is checked, before any training step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MIN_SAMPLE_RATE = 4000
"""Source audio below this rate (Hz) is refused: it holds nothing a 16 kHz speech feature extractor can use, and
resampling it up would only invent samples."""
TRUNCATION_TOLERANCE = (0.5, 0.1)
"""A video stream whose frames end more than this many seconds, or this share, before its declared duration is
refused as truncated."""


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _av():
    try:
        import av
    except ImportError as error:  # the media extra is not installed
        raise ImportError("Reading .mp4/.wav files needs PyAV: pip install 'peft_mose[media]'.") from error
    return av


@dataclass(frozen=True)
class Frames:
    """Frames sampled from a video: ``[T, H, W, 3]`` uint8 RGB, their times (s, from the stream's first frame) and
    the rate they were sampled at (one over their spacing)."""

    pixels: np.ndarray
    times: tuple[float, ...]
    fps: float
    duration: float
    source_frames: int


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples at ``sampling_rate``; ``cropped_from``: the decoded length (s) when it was cut."""

    samples: np.ndarray
    sampling_rate: int
    source_rate: int
    cropped_from: float | None = None

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate


def _open(path: Path):
    av = _av()
    if not path.is_file():
        raise MediaError(path, "no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise MediaError(path, f"not a readable media container (corrupt or truncated?): {error}") from None


def sample_times(duration: float, fps: float, max_frames: int) -> np.ndarray:
    """The times (s) at which to take frames: every ``1 / fps`` from 0, or ``max_frames`` spread evenly over
    ``duration`` when that would be more."""
    count = max(1, int(np.floor(duration * fps + 1e-9)))
    if count > max_frames:
        return np.arange(max_frames) * (duration / max_frames)
    return np.arange(count) / fps


def read_frames(path: str | Path, fps: float, max_frames: int) -> Frames:
    """Decode the first video stream of ``path`` and keep, for each time of :func:`sample_times`, the first frame at or
    after it (the last frame for times past the end)."""
    av = _av()
    path = Path(path)
    with _open(path) as container:
        stream = _first_stream(container, "video", path)
        try:
            stamps = [packet.pts * packet.time_base for packet in container.demux(stream) if packet.pts is not None]
        except av.FFmpegError as error:
            raise MediaError(path, f"corrupt video stream: {error}") from None
        if not stamps:
            raise MediaError(path, "the video stream holds no frames")
        start = float(min(stamps))
        step = _frame_step(stream, sorted(stamps))
        duration = float(max(stamps)) - start + step
        _check_complete(path, stream, start + duration)
        wanted = sample_times(duration, fps, max_frames)
        container.seek(0)
        kept: list[np.ndarray] = []
        kept_times: list[float] = []
        count, last, time = 0, None, 0.0
        try:
            for frame in container.decode(stream):
                count += 1
                time = (float(frame.time) - start) if frame.time is not None else (count - 1) * step
                while len(kept) < len(wanted) and time + 1e-6 >= wanted[len(kept)]:
                    kept.append(frame.to_ndarray(format="rgb24"))
                    kept_times.append(time)
                last = frame
        except av.FFmpegError as error:
            raise MediaError(path, f"corrupt video stream after {count} frames: {error}") from None
        if last is None:
            raise MediaError(path, "no video frame could be decoded (truncated file?)")
        while len(kept) < len(wanted):  # times past the last decoded frame
            kept.append(last.to_ndarray(format="rgb24"))
            kept_times.append(time)
    rate = 1 / float(wanted[1] - wanted[0]) if len(wanted) > 1 else fps
    return Frames(np.stack(kept), tuple(kept_times), rate, duration, count)


def _frame_step(stream, stamps: list) -> float:
    """Seconds per frame: from the stream's frame rate, else (MPEG-TS has no average) the median gap of its stamps."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(1 / rate)
    gaps = np.diff(np.array(stamps, dtype=np.float64))
    return float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 0.0


def _check_complete(path: Path, stream, end: float) -> None:
    """:class:`MediaError` when the frames end (``end``, s on the stream's clock) well before the duration the video
    stream declares (a file cut short: a partial download or copy). A container's own duration is not used: it is
    its longest stream's, and an audio track may outlast the video."""
    if stream.duration is None or stream.time_base is None:
        return
    declared = float(stream.duration * stream.time_base)
    seconds, share = TRUNCATION_TOLERANCE
    if declared - end > max(seconds, share * declared):
        raise MediaError(path, f"the video's frames end at {end:.2f} s of the {declared:.2f} s it declares "
                               "(truncated file?)")


def _first_stream(container, kind: str, path: Path):
    """The first ``kind`` ("video" or "audio") stream of an open container, or a :class:`MediaError` naming the
    streams it has."""
    streams = getattr(container.streams, kind)
    if not streams:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise MediaError(path, f"no {kind} stream (streams: {kinds})")
    return streams[0]


def has_audio_stream(path: str | Path) -> bool:
    """Whether the container ``path`` has an audio stream."""
    with _open(Path(path)) as container:
        return bool(container.streams.audio)


def read_audio(path: str | Path, sampling_rate: int, max_seconds: float) -> Audio:
    """Decode the first audio stream of ``path`` (a .wav, or a video's track), resampled to ``sampling_rate`` by
    FFmpeg's resampler and mixed to mono as the mean of its channels (as transformers' ``load_audio`` does: FFmpeg's
    own mono downmix adds them up); longer than ``max_seconds``: cut there (logged)."""
    av = _av()
    path = Path(path)
    with _open(path) as container:
        stream = _first_stream(container, "audio", path)
        source_rate = int(stream.rate or 0)
        if source_rate < MIN_SAMPLE_RATE:
            raise MediaError(
                path, f"sample rate {source_rate} Hz cannot be resampled to {sampling_rate} Hz usefully (at least "
                f"{MIN_SAMPLE_RATE} Hz is needed)"
            )  # fmt: skip
        resampler = av.AudioResampler(format="fltp", rate=sampling_rate)  # planar: [channels, samples]
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]
        except av.FFmpegError as error:
            raise MediaError(path, f"audio cannot be decoded or resampled to {sampling_rate} Hz: {error}") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise MediaError(path, "zero-length audio (no samples decoded)")
    if not np.isfinite(samples).all():
        raise MediaError(path, "the audio holds NaN or infinite samples")
    limit = int(max_seconds * sampling_rate)
    cropped = None
    if len(samples) > limit:
        cropped = len(samples) / sampling_rate
        logger.info("%s: audio cut from %.2f s to --max_audio_seconds %g s.", path, cropped, max_seconds)
        samples = samples[:limit]
    return Audio(samples, sampling_rate, source_rate, cropped)
