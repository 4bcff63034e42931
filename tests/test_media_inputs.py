"""Media from files and other containers: WAV audio, encoded video, HF-style datasets, OFASys presets."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from moe_gen.tasks import Task, TaskDataError, TaskPlan, Tokenizer

OFASYS_PRESETS = [
    "[IMAGE:img] what does the image describe? -> [TEXT:cap]",
    '[IMAGE:img] which region does the text " [TEXT:cap] " describe? -> [BOX:patch_boxes]',
    'is the sentiment of text " [TEXT:sentence] " positive or negative? -> is the sentiment of text " '
    '[TEXT:sentence,no_loss] " positive or negative? [TEXT:label,closed_set]',
    'what is the complete text of " [TEXT:text,mask_ratio=0.3] "? -> [TEXT:text]',
    "[AUDIO:wav] what is the text corresponding to the voice? -> [TEXT:text,preprocess=text_phone]",
    "[PHONE:text] -> [AUDIO:fbank,adaptor=audio_tgt_fbank]",
    "[IMAGE:image,adaptor=image_vit] what does the image describe? -> [TEXT:caption]",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.mark.parametrize("instruction", OFASYS_PRESETS)
def test_ofasys_presets_parse_and_plan_unchanged(instruction, tok):
    plan = TaskPlan("preset", instruction, tok, closed_sets={"label": ["negative", "positive"]})
    assert plan.templates and plan.instruction.templates[0].decoder


def test_wav_file_and_bytes(tok, tmp_path):
    t = np.arange(8000) / 8000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)  # resampled to 16 kHz
        f.writeframes(pcm.tobytes())
    task = Task("asr", "[AUDIO:wav] -> [TEXT:text]",
                [{"wav": str(path), "text": "a"}, {"wav": path.read_bytes(), "text": "b"},
                 {"wav": {"array": pcm.astype(np.float32) / 32768, "sampling_rate": 8000}, "text": "c"},
                 {"wav": b"RIFF nonsense", "text": "d"}])
    rows = [task.encode(i, tok, training=False).encoder[0].rows for i in range(3)]
    assert rows[0].shape == (25, 320)  # 1 s: 98 fbank frames -> 25 rows of 4
    torch.testing.assert_close(rows[0], rows[1])
    torch.testing.assert_close(rows[0], rows[2], atol=1e-3, rtol=1e-3)
    with pytest.raises(TaskDataError, match="task 'asr', column 'wav', row 3: cannot read the WAV audio"):
        task.encode(3, tok)


def test_video_file_decoded_with_pyav(tok, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = np.full((32, 32, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    task = Task("vid", "[VIDEO:v] -> [TEXT:t]", [{"v": str(path), "t": "x"}, {"v": b"not a video", "t": "y"}])
    chunk = task.encode(0, tok, training=False).encoder[0]
    assert chunk.rows.shape == (4 * 16, 192) and chunk.positions[:, 0].unique().tolist() == [0, 1, 2, 3]
    with pytest.raises(TaskDataError, match="cannot decode the video"):
        task.encode(1, tok)


class TinyDataset:
    """Duck-typed like a Hugging Face dataset: len, integer indexing to dicts, column_names."""

    column_names = ["image", "label"]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"image": np.full((8, 8), i * 10, dtype=np.uint8), "label": str(i % 2)}


def test_dataset_objects_are_accepted(tok):
    task = Task("parity", "[IMAGE:image] odd? -> [TEXT:label,closed_set]", TinyDataset(6))
    assert task.closed_sets() == {"label": ["0", "1"]}
    assert len(list(task.samples(tok))) == 6
    with pytest.raises(ValueError, match="data must be a list of rows"):
        Task("bad", "[IMAGE:image] -> [TEXT:label]", 42)


def test_speed_perturbation_changes_duration_in_training_only(tok):
    wav = (0.2 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    slow = Task("asr", "[AUDIO:wav] -> [TEXT:text]", [{"wav": wav, "text": "a"}],
                preprocessor_options={"audio_fbank": {"speeds": (0.5,)}})
    trained = slow.encode(0, tok, training=True).encoder[0].rows.shape[0]
    evaluated = slow.encode(0, tok, training=False).encoder[0].rows.shape[0]
    assert evaluated == 25 and 48 <= trained <= 51  # half speed: twice as long


def test_stereo_clips_read_the_same_with_channels_first_or_last(tok):
    """soundfile and scipy give a clip as [S, C]; it was averaged over its samples into a
    two-sample waveform (one row of features) without a word."""
    t = torch.arange(16000) / 16000
    stereo_CS = torch.stack([torch.sin(2 * torch.pi * 440 * t), 0.5 * torch.sin(2 * torch.pi * 660 * t)])
    task = Task("listen", "[AUDIO:clip] what is it? -> [TEXT:label]", [
        {"clip": stereo_CS, "label": "a"}, {"clip": stereo_CS.T.numpy(), "label": "a"},
        {"clip": stereo_CS.mean(0), "label": "a"}, {"clip": torch.zeros(16, 16000), "label": "b"}])
    rows = [task.encode(i, tok, training=False).encoder[0].rows for i in range(3)]
    assert rows[0].shape[0] > 20
    torch.testing.assert_close(rows[1], rows[0])
    torch.testing.assert_close(rows[2], rows[0])
    with pytest.raises(TaskDataError, match=r"row 3.*\[C, S\] or \[S, C\] with at most 8 channels"):
        task.encode(3, tok)


def test_a_row_may_name_its_audio_rate_as_hugging_face_datasets_do(tok):
    """A ``sampling_rate`` column was ignored: an 8 kHz clip was read as 16 kHz (half as long)."""
    clip = torch.sin(torch.arange(8000) / 8000 * 2 * torch.pi * 300)
    rows = [{"clip": clip, "sample_rate": 8000, "t": "a"}, {"clip": clip, "sampling_rate": 8000, "t": "a"},
            {"clip": clip, "t": "a"}]
    task = Task("rates", "[AUDIO:clip] -> [TEXT:t]", rows)
    lengths = [task.encode(i, tok, training=False).encoder[0].rows.shape[0] for i in range(3)]
    assert lengths[0] == lengths[1] > lengths[2]
