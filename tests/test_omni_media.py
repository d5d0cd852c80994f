"""The Qwen2.5-Omni recipe's inputs from raw files: the manifest reader, PyAV decoding (video only, audio only,
both), every bad-media error, and the video/audio layout and token counts against independent computations. The
media are written here with PyAV and soundfile directly, not with the recipe's writer."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import soundfile
import torch
from mosear_recipes.omni.inputs import MediaInput, OmniEncoder, collate
from mosear_recipes.omni.layout import audio_token_count, video_patches, video_placeholders
from mosear_recipes.omni.manifest import read_manifest
from mosear_recipes.omni.media import MediaError, read_audio, read_frames, sample_times
from mosear_recipes.omni.tiny import build_tiny_tokenizer, write_tiny_model
from transformers import Qwen2_5OmniProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from peft_mose import Modality
from peft_mose.modality_tokens import ModalityTokens
from media_clips import RATE, moving_frames, tone, write_mp4

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return types.SimpleNamespace(
        root=root,
        both=write_mp4(root / "both.mp4", moving_frames(20), tone(2.0)),
        silent=write_mp4(root / "silent.mp4", moving_frames(20)),
        wav=root / "voice.wav",
    )


@pytest.fixture(scope="module", autouse=True)
def _wav(media):
    soundfile.write(media.wav, tone(1.5, 22050), 22050)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoConfig

    model_dir = write_tiny_model(tmp_path_factory.mktemp("model"))
    config = AutoConfig.from_pretrained(model_dir)
    return types.SimpleNamespace(dir=model_dir, config=config, encoder=OmniEncoder.from_pretrained(model_dir, config))


# --- the manifest -----------------------------------------------------------------------------------------------


def test_manifest_csv_and_jsonl_resolve_relative_paths(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.csv").write_text(
        "id,video,audio,target,label,subset\nx1,v/x1.mp4,,happy,happy,Video-Aligned\nx2,v/x2.mp4,w/x2.wav,sad,,consistent\n"
    )
    (tmp_path / "clips" / "a.jsonl").write_text(
        json.dumps({"id": "x1", "video": "v/x1.mp4", "target": "happy", "label": "happy", "subset": "video_aligned"})
        + "\n\n" + json.dumps({"id": 7, "audio": "/abs/x2.wav", "target": "sad", "subset": "consistent"}) + "\n"
    )
    csv_clips = read_manifest(tmp_path / "clips" / "a.csv")
    assert [c.video for c in csv_clips] == [tmp_path / "clips/v/x1.mp4", tmp_path / "clips/v/x2.mp4"]
    assert [c.audio for c in csv_clips] == [None, tmp_path / "clips/w/x2.wav"]
    assert [c.subset for c in csv_clips] == ["video_aligned", "consistent"]
    assert (csv_clips[0].label, csv_clips[1].label, csv_clips[1].line) == ("happy", None, 3)
    jsonl = read_manifest(tmp_path / "clips" / "a.jsonl")
    assert [(c.id, c.line) for c in jsonl] == [("x1", 1), ("7", 3)]
    assert jsonl[1].video is None and str(jsonl[1].audio) == "/abs/x2.wav"


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,video,target\na,a.mp4,x\na,b.mp4,y\n", "m.csv:3: duplicate id 'a' (first on line 2)"),
        ("id,video,target\na,a.mp4,\n", "m.csv:2 (id 'a'): no 'target'"),
        ("id,video,audio,target\na,,,x\n", "m.csv:2 (id 'a'): give a 'video' or an 'audio' file"),
        ("id,video,target,mood\na,a.mp4,x,y\n", "the header must name 'id' and only the fields"),
        ("id,video,target,subset\na,a.mp4,x,odd\n", "m.csv:2 (id 'a'): Unknown CA-MER subset 'odd'"),
        ("id,video,target,subset\na,a.mp4,x,consistent\nb,b.mp4,y,\n", "m.csv:3 (id 'b'): some clips have a 'subset'"),
        ("id,video,target\n", "is empty"),
        ("id,video,target\na,a.mp4,happy, then calm\n", "m.csv:2: 1 value(s) more than the header has fields"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / "m.csv")


# --- decoding -----------------------------------------------------------------------------------------------------


def test_sample_times_at_fps_and_bounded():
    assert sample_times(2.0, 2.0, 32).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert sample_times(100.0, 2.0, 4).tolist() == [0.0, 25.0, 50.0, 75.0]
    assert sample_times(0.1, 2.0, 8).tolist() == [0.0]


def test_video_frames_are_the_ones_at_the_sampled_times(media):
    frames = read_frames(media.both, fps=2.0, max_frames=16)
    assert frames.pixels.shape == (4, 32, 32, 3) and frames.pixels.dtype == np.uint8
    assert frames.times == (0.0, 0.5, 1.0, 1.5) and frames.fps == pytest.approx(2.0) and frames.source_frames == 20
    # frame i of the written clip has its bright column at x = i: the sampled frames are 0, 5, 10, 15
    columns = frames.pixels[:, 16, :, 0].astype(int).argmax(axis=1)
    assert columns.tolist() == [0, 5, 10, 15]
    bounded = read_frames(media.both, fps=10.0, max_frames=3)
    assert len(bounded.pixels) == 3 and bounded.fps == pytest.approx(1.5)


def test_video_only_audio_only_and_both(media):
    silent = read_frames(media.silent, 2.0, 8)
    assert len(silent.pixels) == 4
    wav = read_audio(media.wav, RATE, 30.0)
    assert wav.source_rate == 22050 and wav.sampling_rate == RATE
    assert wav.seconds == pytest.approx(1.5, abs=0.01)
    # resampled, the tone keeps its frequency: the spectrum's peak stays at 440 Hz
    spectrum = np.abs(np.fft.rfft(wav.samples))
    assert np.fft.rfftfreq(len(wav.samples), 1 / RATE)[spectrum.argmax()] == pytest.approx(440, abs=2)
    track = read_audio(media.both, RATE, 30.0)
    assert track.seconds == pytest.approx(2.0, abs=0.1)
    cut = read_audio(media.both, RATE, 0.5)
    assert len(cut.samples) == RATE // 2 and cut.cropped_from == pytest.approx(track.seconds)


def test_bad_media_errors_name_the_file(media, tmp_path):
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media.both.read_bytes()[:2000])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a container" * 50)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), RATE)
    slow = tmp_path / "slow.wav"
    soundfile.write(slow, tone(1.0, 2000, 100), 2000)
    cases = [
        (lambda: read_frames(tmp_path / "missing.mp4", 2, 8), tmp_path / "missing.mp4", "no such file"),
        (lambda: read_frames(media.wav, 2, 8), media.wav, "no video stream (streams: audio)"),
        (lambda: read_audio(media.silent, RATE, 30), media.silent, "no audio stream (streams: video)"),
        (lambda: read_frames(truncated, 2, 8), truncated, "not a readable media container"),
        (lambda: read_frames(garbage, 2, 8), garbage, "not a readable media container"),
        (lambda: read_audio(empty, RATE, 30), empty, "zero-length audio"),
        (lambda: read_audio(slow, RATE, 30), slow, "sample rate 2000 Hz cannot be resampled to 16000 Hz"),
    ]
    for call, path, problem in cases:
        with pytest.raises(MediaError) as error:
            call()
        assert error.value.path == path and problem in str(error.value) and str(path) in str(error.value)


def _write_video(path, frames: np.ndarray, first_pts: int = 0, **container) -> Path:
    """MPEG-4 Part 2 at 10 fps, frame i stamped ``first_pts + i`` tenths of a second."""
    import fractions

    import av

    with av.open(str(path), "w", **container) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = first_pts + i, fractions.Fraction(1, 10)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _columns(frames) -> list[int]:
    return frames.pixels[:, 16, :, 0].astype(int).argmax(axis=1).tolist()


@pytest.mark.parametrize("name", ["late.mp4", "late.mkv"])
def test_a_video_whose_stamps_start_late_is_sampled_from_its_first_frame(tmp_path, name):
    frames = read_frames(_write_video(tmp_path / name, moving_frames(20), first_pts=14), fps=2.0, max_frames=16)
    assert _columns(frames) == [0, 5, 10, 15] and frames.times == pytest.approx((0.0, 0.5, 1.0, 1.5))


def test_the_rate_is_the_frames_spacing_and_mpeg_ts_without_an_average_rate_keeps_its_last_frame(tmp_path):
    odd = read_frames(_write_video(tmp_path / "odd.mp4", moving_frames(24)), fps=2.0, max_frames=16)  # 2.4 s
    assert _columns(odd) == [0, 5, 10, 15] and odd.fps == pytest.approx(2.0)  # not 4 frames / 2.4 s
    ts = read_frames(_write_video(tmp_path / "clip.ts", moving_frames(20), format="mpegts"), fps=2.0, max_frames=16)
    assert ts.duration == pytest.approx(2.0) and _columns(ts) == [0, 5, 10, 15] and ts.fps == pytest.approx(2.0)


def test_a_video_cut_short_is_refused(tmp_path):
    whole = _write_video(tmp_path / "whole.mp4", moving_frames(40), options={"movflags": "faststart"})
    assert len(read_frames(whole, fps=2.0, max_frames=16).pixels) == 8
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    with pytest.raises(MediaError, match=r"cut.mp4: the video's frames end at .* of the 4.00 s it declares"):
        read_frames(cut, fps=2.0, max_frames=16)


def test_channels_are_averaged_not_summed(tmp_path):
    left, right = tone(1.0), tone(1.0, hz=220.0)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), RATE)
    audio = read_audio(path, RATE, 30.0)
    np.testing.assert_allclose(audio.samples, (left + right) / 2, atol=1e-4)


def test_audio_too_short_for_one_token_is_refused_naming_the_clip(tiny, tmp_path):
    from mosear_recipes.omni.data import MediaOptions, clip_media
    from mosear_recipes.omni.manifest import ClipRecord

    short = tmp_path / "short.wav"
    soundfile.write(short, tone(0.02), RATE)
    record = ClipRecord("b", None, short, None, None, None, tmp_path / "train.csv", 3)
    with pytest.raises(MediaError, match=r"short.wav: 20 ms of audio is too short .* \[.*train.csv:3 \(id 'b'\)\]"):
        clip_media(record, tiny.encoder, MediaOptions())
    soundfile.write(short, tone(0.2), RATE)
    assert tiny.encoder.audio_tokens(clip_media(record, tiny.encoder, MediaOptions()).audio) > 0


def test_a_processor_refusal_names_the_manifest_line(tiny, tmp_path):
    from mosear_recipes.omni.data import ClipDataset, MediaOptions

    _write_video(tmp_path / "wide.mp4", np.zeros((10, 2, 500, 3), np.uint8))
    (tmp_path / "m.csv").write_text("id,video,target\nw,wide.mp4,happy\n")
    with pytest.raises(ValueError, match=r"m.csv:2 \(id 'w'\): absolute aspect ratio must be smaller than 200"):
        ClipDataset(tmp_path / "m.csv", tiny.encoder, MediaOptions(audio="none"))


# --- layout and token counts --------------------------------------------------------------------------------------


def reference_video_patches(frames: np.ndarray, processor: Qwen2VLImageProcessorPil) -> np.ndarray:
    """``Qwen2VLVideoProcessor.patchify``'s layout written out on frames already at a multiple of the patch grid:
    rescale and normalize, pad with the last frame, then (t, tp, C, h/m, m, p, w/m, m, p) -> (t, h/m, w/m, m, m, C,
    tp, p, p)."""
    p, m, tp = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    x = frames.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    x = (x - np.array(processor.image_mean)[:, None, None]) / np.array(processor.image_std)[:, None, None]
    if pad := -len(x) % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    t, c, h, w = len(x) // tp, 3, x.shape[2], x.shape[3]
    x = x.reshape(t, tp, c, h // p // m, m, p, w // p // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * (h // p) * (w // p), c * tp * p * p)


def test_video_patches_match_the_video_layout_and_the_image_processor():
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2)
    size = {"shortest_edge": 64, "longest_edge": 32 * 32}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 16, 3), dtype=np.uint8)  # odd count: the last frame pads
    pixels, grid = video_patches(frames, processor, size)
    assert grid == (3, 8, 4)
    np.testing.assert_allclose(pixels, reference_video_patches(frames, processor), atol=1e-5)
    # a still clip of two identical frames is one image to the image processor (which repeats it temporally)
    still, still_grid = video_patches(frames[:1].repeat(2, axis=0), processor, size)
    image = processor(images=[frames[0]], size=size, return_tensors="np")
    assert still_grid == tuple(int(v) for v in image["image_grid_thw"][0])
    np.testing.assert_array_equal(still, image["pixel_values"])


def processor_like(tokenizer) -> types.SimpleNamespace:
    """What ``Qwen2_5OmniProcessor.replace_video_with_audio_token`` reads of its processor (the class cannot be
    built without torchvision in transformers 5.24)."""
    return types.SimpleNamespace(
        audio_bos_token=tokenizer.audio_bos_token, audio_eos_token=tokenizer.audio_eos_token,
        video_token=tokenizer.video_token, audio_token=tokenizer.audio_token,
        video_processor=types.SimpleNamespace(merge_size=2),
        get_chunked_index=lambda indices, per_chunk: Qwen2_5OmniProcessor.get_chunked_index(None, indices, per_chunk),
    )  # fmt: skip


@pytest.mark.parametrize("grid, audio, seconds", [((2, 8, 8), 51, 1.0), ((3, 4, 8), 130, 0.5), ((1, 4, 4), 7, 2.0)])
def test_interleaved_placeholders_are_the_processors(grid, audio, seconds):
    tokenizer = build_tiny_tokenizer()
    tokens = {k: getattr(tokenizer, f"{k}_token") for k in ("video", "audio", "audio_bos", "audio_eos")}
    for chunk in (1.0, 2.0):
        ours = video_placeholders(grid, 2, tokens, audio, seconds, 25, chunk)
        theirs = Qwen2_5OmniProcessor.replace_video_with_audio_token(
            processor_like(tokenizer), {"video_grid_thw": [grid], "video_second_per_grid": [seconds]}, 0,
            {"num_audio_tokens": [audio]}, 0, position_id_per_seconds=25, seconds_per_chunk=chunk,
        )  # fmt: skip
        assert ours == theirs
    assert video_placeholders(grid, 2, tokens) == tokens["video"] * (grid[0] * grid[1] * grid[2] // 4)


def test_audio_token_count_is_the_processors():
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    lengths = np.arange(4, 3001)
    assert [audio_token_count(int(n)) for n in lengths] == _get_feat_extract_output_lengths(lengths).tolist()


@pytest.mark.parametrize("interleaved", [False, True])
def test_encoded_clip_counts_and_modality_ids(tiny, media, interleaved):
    encoder = tiny.encoder
    frames = read_frames(media.both, 2.0, 16)
    audio = read_audio(media.both, encoder.sampling_rate, encoder.max_audio_seconds)
    clip = encoder.encode(MediaInput(frames, audio, interleaved), "happy")
    grid = clip.media["video_grid_thw"][0].tolist()
    mel = int(clip.media["feature_attention_mask"].sum())
    assert mel == int(np.ceil(len(audio.samples) / 160)) or mel == len(audio.samples) // 160
    assert clip.visual_tokens == grid[0] * grid[1] * grid[2] // 4 == 32
    assert clip.audio_tokens == audio_token_count(mel)
    ids = clip.input_ids
    config = tiny.config
    assert (ids == config.video_token_index).sum() == clip.visual_tokens
    assert (ids == config.audio_token_index).sum() == clip.audio_tokens
    modality = ModalityTokens.from_config(config).modality_ids(ids[None])[0]
    assert torch.equal(modality == int(Modality.VISUAL), ids == config.video_token_index)
    assert torch.equal(modality == int(Modality.AUDIO), ids == config.audio_token_index)
    video_positions = (ids == config.video_token_index).nonzero().flatten()
    audio_positions = (ids == config.audio_token_index).nonzero().flatten()
    # interleaved: audio tokens sit between the two seconds' video tokens; separate: after every video token
    assert (audio_positions.min() < video_positions.max()) == interleaved
    assert clip.labels[: clip.prompt_length].eq(-100).all()
    assert encoder.tokenizer.decode(ids[clip.prompt_length:]) == "happy <|im_end|>"
    assert clip.use_audio_in_video == interleaved


def test_encoded_clips_run_through_the_thinker(tiny, media):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    encoder = tiny.encoder
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny.dir).eval()
    frames = read_frames(media.silent, 2.0, 8)
    wav = read_audio(media.wav, encoder.sampling_rate, encoder.max_audio_seconds)
    batch = collate([encoder.encode(MediaInput(frames=frames), "sad"),
                     encoder.encode(MediaInput(audio=wav), "happy")], encoder.tokenizer.pad_token_id)  # fmt: skip
    assert "use_audio_in_video" not in batch and batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="mixes clips whose audio is interleaved"):
        both = read_audio(media.both, encoder.sampling_rate, encoder.max_audio_seconds)
        collate([encoder.encode(MediaInput(frames, both, True), "x"), encoder.encode(MediaInput(frames), "y")], 0)
