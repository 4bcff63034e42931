"""Media from files and other containers: WAV audio, encoded video, HF-style datasets, OFASys presets."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from moe_gen.tasks import Task, TaskDataError, TaskPlan, Tokenizer, load_preset

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


# ---- rates, filterbank, SpecAugment (pinned by the sixteenth round of mutation checks) -----------------


def test_sample_rates_at_either_end_of_the_accepted_range_are_accepted():
    from moe_gen.tasks.modalities.base import SlotValueError
    from moe_gen.tasks.modalities.signals import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, check_sample_rate

    assert (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE) == (1000, 384_000)
    assert check_sample_rate(1000) == 1000 and check_sample_rate(384_000) == 384_000
    assert check_sample_rate(999.6) == 1000  # rounded to whole samples per second
    for rate in (999, 384_001):
        with pytest.raises(SlotValueError, match="between 1000 and 384000"):
            check_sample_rate(rate)


def test_a_co_prime_rate_is_resampled_by_a_near_ratio_keeping_the_length_within_a_tenth_of_a_percent():
    from moe_gen.tasks.modalities.signals import resample

    second = torch.randn(44101) * 0.1  # one second at 44101 Hz: co-prime with 16 kHz
    assert abs(resample(second, 44101).numel() - 16000) <= 16


def test_the_filterbank_is_standardised_per_mel_bin_and_a_clip_shorter_than_a_window_gives_one_frame():
    from moe_gen.tasks.modalities.signals import fbank

    torch.manual_seed(0)
    t = torch.arange(8000) / 16000
    feats = fbank(0.3 * torch.sin(2 * torch.pi * 440 * t) * torch.linspace(0, 1, 8000) + 0.01 * torch.randn(8000))
    assert feats.shape == (48, 80)  # (8000 - 400) // 160 + 1 frames of 25 ms every 10 ms
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    assert fbank(0.1 * torch.randn(200)).shape == (1, 80)  # 12.5 ms, padded to one 25 ms window


def test_spec_augment_masks_one_band_of_mel_bins_and_one_span_of_frames():
    """Up to 10 whole mel bins (columns) and up to a tenth of the frames (rows), each one contiguous
    run; nothing else changes (Park et al. 2019)."""
    import random

    from moe_gen.tasks.modalities.base import EncodeContext
    from moe_gen.tasks.modalities.signals import AudioPreprocessor

    feats = torch.ones(200, 80)
    banded = 0
    for seed in range(12):
        out = AudioPreprocessor._spec_augment(feats, EncodeContext(Tokenizer.default(), random.Random(seed)))
        zero = out == 0
        columns = zero.all(0).nonzero().flatten().tolist()
        rows = zero.all(1).nonzero().flatten().tolist()
        assert len(columns) <= 10 and columns == list(range(min(columns, default=0), max(columns, default=-1) + 1))
        assert len(rows) <= 20 and rows == list(range(min(rows, default=0), max(rows, default=-1) + 1))
        expected = torch.ones(200, 80)
        expected[:, columns] = 0
        expected[rows] = 0
        assert torch.equal(out, expected)
        banded += bool(columns)
    assert banded >= 6
    assert torch.equal(feats, torch.ones(200, 80))  # the input is left alone


def test_padded_values_count_the_zeros_of_the_last_row_and_none_once_max_length_cuts_it():
    """One second: 98 fbank frames, stacked 4 a row into 25 rows whose last holds 2 frames of
    padding (2 · 80 values); cut to 3 rows by max_length, no row is padding."""
    import random
    from types import SimpleNamespace

    from moe_gen.tasks.modalities.base import EncodeContext
    from moe_gen.tasks.modalities.signals import AudioPreprocessor

    wav = 0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    ctx = EncodeContext(Tokenizer.default(), random.Random(0), training=False)
    whole = AudioPreprocessor()(wav, SimpleNamespace(attrs={}, column="a"), ctx)
    assert whole.features.shape == (25, 320) and whole.meta["frames"] == 98 and whole.meta["padded_values"] == 160
    cut = AudioPreprocessor()(wav, SimpleNamespace(attrs={"max_length": 3}, column="a"), ctx)
    assert cut.features.shape == (3, 320) and cut.meta["padded_values"] == 0


def test_the_position_estimate_of_a_clip_never_undercounts_its_stacked_rows():
    """The cap is checked before resampling and speed perturbation from the clip's length: the estimate
    (one frame every 10 ms, k a row, rounded up) is never below the rows the filterbank then gives."""
    from moe_gen.tasks.modalities.signals import AudioPreprocessor, fbank

    preprocessor = AudioPreprocessor()
    for samples in range(4800, 9600, 160 + 37):
        rows = -(-fbank(0.1 * torch.randn(samples)).shape[0] // 4)
        assert preprocessor._rows(samples / 16000) >= rows, samples


def test_a_clip_that_fits_the_position_cap_is_accepted_and_one_over_it_refused_by_its_rows():
    """0.41 s at 16 kHz gives 40 filterbank frames, 10 rows of 4: it fits a cap of 10 (until
    2026-12-06 the estimate of one frame every 10 ms said 11 and refused it). The rows the
    filterbank gives are checked too, so a clip the estimate misjudges cannot pass the cap."""
    import random
    from types import SimpleNamespace

    from moe_gen.tasks.modalities.base import EncodeContext, SlotValueError
    from moe_gen.tasks.modalities.signals import AudioPreprocessor

    slot = SimpleNamespace(attrs={}, column="a")
    wav = 0.1 * torch.randn(6560, generator=torch.Generator().manual_seed(0))
    ctx = EncodeContext(Tokenizer.default(), random.Random(0), training=False, max_positions=10)
    assert AudioPreprocessor()(wav, slot, ctx).features.shape == (10, 320)
    with pytest.raises(SlotValueError, match=r"0.425 s long \(about 11 positions\), over the cap of 10"):
        AudioPreprocessor()(0.1 * torch.randn(6800), slot, ctx)
    misjudged = AudioPreprocessor()
    misjudged._rows = lambda seconds: 1
    with pytest.raises(SlotValueError, match=r"\(11 positions after resampling from 16000 Hz\), over the cap of 10"):
        misjudged(0.1 * torch.randn(6800), slot, ctx)


def test_an_audio_target_is_never_perturbed_or_masked_in_training():
    """Speed perturbation and SpecAugment apply to inputs: a target is the regression label, encoded
    in training exactly as in evaluation."""
    tok = Tokenizer.default()
    task = load_preset("text_to_speech", "train", limit=1)
    plain = next(c for c in task.encode(0, tok, training=False).decoder if c.rows is not None).rows
    for seed in range(4):
        trained = next(c for c in task.encode(0, tok, seed=seed, training=True).decoder if c.rows is not None).rows
        assert torch.equal(trained, plain), seed


def test_generated_motion_rows_read_back_in_the_datas_units_a_constant_feature_unscaled():
    """Rows are standardised frames: read back they are row · scale + mean, the scale being the std,
    or 1 for a feature that did not vary (as it was standardised)."""
    from moe_gen.tasks.modalities.signals import MotionPreprocessor

    preprocessor = MotionPreprocessor(frames_per_row=2, mean=[1.0, 5.0], std=[2.0, 0.0])
    rows = torch.tensor([[0.5, -1.0, 1.5, 2.0]])  # two frames of two features
    assert preprocessor.rows_to_value(rows, None).tolist() == [[2.0, 4.0], [4.0, 7.0]]


def test_a_dict_waveform_may_name_its_rate_sample_rate():
    from moe_gen.tasks.modalities.signals import read_waveform

    wav, rate = read_waveform({"array": np.zeros(800, np.float32), "sample_rate": 8000})
    assert rate == 8000 and wav.shape == (800,)
    assert read_waveform({"array": np.zeros(800, np.float32), "sampling_rate": 22050, "sample_rate": 8000})[1] == 22050


@pytest.mark.parametrize("speeds", [(0.4,), (0.9, 2.5), ()])
def test_speed_factors_outside_half_to_double_are_refused(speeds):
    from moe_gen.tasks.modalities.signals import AudioPreprocessor

    with pytest.raises(ValueError, match=r"speeds must be factors in \[0.5, 2\]"):
        AudioPreprocessor(speeds=speeds)
    assert AudioPreprocessor(speeds=(0.5, 2)).speeds == (0.5, 2)


def test_a_clip_of_another_width_than_the_tasks_motion_statistics_is_refused_by_name():
    import random
    from types import SimpleNamespace

    from moe_gen.tasks.modalities.base import EncodeContext, SlotValueError
    from moe_gen.tasks.modalities.signals import MotionPreprocessor

    preprocessor = MotionPreprocessor(mean=[0.0, 0.0], std=[1.0, 1.0])
    ctx = EncodeContext(Tokenizer.default(), random.Random(0), training=False)
    with pytest.raises(SlotValueError, match="the clip has 3 features a frame, the task's motion statistics 2"):
        preprocessor(np.zeros((4, 3)), SimpleNamespace(attrs={}, column="pose"), ctx)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_waveform_with_a_non_finite_sample_is_refused(bad):
    from moe_gen.tasks.modalities.base import SlotValueError
    from moe_gen.tasks.modalities.signals import read_waveform

    with pytest.raises(SlotValueError, match="non-finite samples"):
        read_waveform(np.array([0.0, bad, 0.1], np.float32))
