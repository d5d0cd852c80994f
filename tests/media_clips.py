"""Clips the omni tests write themselves with PyAV (H.264 + AAC, not the recipe's own writer): moving frames and a
tone, in the formats a user's camera would give."""

from __future__ import annotations

import av
import numpy as np

RATE = 16000


def write_mp4(path, frames: np.ndarray | None, audio: np.ndarray | None = None, fps: int = 10, rate: int = RATE):
    """An H.264 + AAC .mp4 written with PyAV (the recipe writes MPEG-4 Part 2)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps) if frames is not None else None
        sound = container.add_stream("aac", rate=rate, layout="mono") if audio is not None else None
        if video is not None:
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
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


def moving_frames(count: int = 20, size: int = 32) -> np.ndarray:
    frames = np.zeros((count, size, size, 3), np.uint8)
    for i in range(count):
        frames[i, :, i % size] = (255, 128, 0)
    return frames


def tone(seconds: float, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
