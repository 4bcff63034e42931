"""Video and audio inputs, twenty-seventh audit: a video file's display rotation and transparency,
a file without a video stream, the video preprocessor's size and patch, and digital silence. Each
test fails on the code before its fix."""

import io
import wave

import av
import numpy as np
import pytest
import torch

from moe_gen.tasks import Task, TaskDataError, Tokenizer
from moe_gen.tasks.modalities.signals import fbank
from moe_gen.tasks.modalities.visual import load_video_frames


def _write(path, frames, codec, pix_fmt, source_format, rotation=None, options=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=source_format)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_video_file_is_read_as_its_display_rotation_shows_it(tmp_path):
    frames = np.zeros((3, 48, 64, 3), np.uint8)
    frames[:, :24, :, 0] = 255  # red top half, blue left half: landscape
    frames[:, :, :32, 2] = 255
    path = tmp_path / "portrait.mp4"
    _write(path, frames, "libx264", "yuv444p", "rgb24", rotation=90, options={"crf": "0"})
    read = load_video_frames(str(path)).astype(np.float64)
    shown = np.rot90(frames, 1, axes=(1, 2))  # as players show it: 48 wide, 64 high
    assert read.shape == shown.shape == (3, 64, 48, 3)
    assert np.abs(read - shown).mean() < 2


def test_a_video_files_transparency_is_composited_onto_white_as_an_images_is(tmp_path):
    frames = np.zeros((2, 16, 16, 4), np.uint8)  # black strokes on transparent black
    frames[:, 4:12, 6:9] = (0, 0, 0, 255)
    on_white = np.where(frames[..., 3:] == 255, frames[..., :3], 255).astype(np.uint8)
    path = tmp_path / "alpha.mov"
    _write(path, frames, "png", "rgba", "rgba")
    np.testing.assert_array_equal(load_video_frames(str(path)), on_white)
    np.testing.assert_array_equal(load_video_frames(frames), on_white)  # (a [T, H, W, 4] array was refused)


def test_a_file_without_a_video_stream_says_so(tmp_path):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(np.zeros(800, np.int16).tobytes())
    path = tmp_path / "speech.wav"
    path.write_bytes(buffer.getvalue())
    task = Task("vid", "[VIDEO:v] what? -> [TEXT:label,closed_set]", [{"v": str(path), "label": "a"}])
    with pytest.raises(TaskDataError, match=r"row 0: the file has no video stream \(it holds audio\)"):
        task.encode(0, Tokenizer.default(), training=False)


@pytest.mark.parametrize("options", [{"patch": 0}, {"size": 0}, {"size": -8}, {"size": 4}, {"size": 16.0}])
def test_the_video_preprocessor_refuses_a_size_or_patch_that_cannot_tile(options):
    """(patch 0 raised a ZeroDivisionError; size 0 or -8 failed every row in PIL's resize.)"""
    task = Task("t", "[VIDEO:v] what? -> [TEXT:label,closed_set]",
                [{"v": np.zeros((3, 8, 8, 3), np.uint8), "label": "a"}], preprocessor_options={"video": options})
    with pytest.raises(ValueError, match="video: size and patch must be whole numbers with 0 < patch <= size"):
        task.encode(0, Tokenizer.default(), training=False)


@pytest.mark.parametrize("samples", [8000, 16000, 48000])
def test_digital_silence_gives_zero_features_whatever_its_length(samples):
    assert torch.equal(fbank(torch.zeros(samples)), torch.zeros_like(fbank(torch.zeros(samples))))


def test_audio_features_are_unchanged_where_no_bin_is_constant():
    import torchaudio.compliance.kaldi as kaldi

    noise = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    wave_S = torch.sin(torch.arange(16000) * 0.05) + 0.1 * noise
    feats = kaldi.fbank(wave_S.unsqueeze(0) * 32768.0, num_mel_bins=80, sample_frequency=16000, dither=0.0)
    expected = (feats - feats.mean(0)) / feats.std(0, unbiased=False).clamp_min(1e-5)
    assert torch.equal(fbank(wave_S), expected)
