"""AUDIO and MOTION: frame sequences, as inputs and as continuous decoder targets.

Shape legend: S samples of waveform, M=80 mel bins, N rows after stacking, k frames stacked per
row, J motion features per frame.

Audio: waveform (array, HF ``{"array", "sampling_rate"}`` dict, or WAV file/bytes) → mono 16 kHz
(torchaudio resampling) → 80-bin log-mel filterbank (torchaudio's Kaldi-compatible fbank,
25 ms windows every 10 ms) → k=4 consecutive frames stacked per row, which the convolutional
adapter subsamples into one embedding (40 ms a token). Motion: pose frames ``[T, J]`` →
per-task normalised → sub-sampled and windowed → k frames a row for an MLP adapter. On the
decoder side both are regression targets with a stop flag (``frames_per_row`` frames a step).
"""

from __future__ import annotations

import fractions
import io
import math
import numbers
import os
import random
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moe_gen.registry import ADAPTERS, PREPROCESSORS
from moe_gen.tasks.modalities.base import (
    Adapter,
    EncodeContext,
    ModalitySpec,
    Preprocessor,
    SlotEncoding,
    SlotValueError,
    brief,
    register_modality,
    regular_file,
    tensor_to_numpy,
    undecoded_media,
)

__all__ = ["load_waveform", "read_waveform", "resample", "check_sample_rate", "fbank", "motion_frames",
           "AudioPreprocessor", "MotionPreprocessor", "ConvSubsampleAdapter", "FrameMLPAdapter",
           "FedBackFrameAdapter", "SAMPLE_RATE",
           "MEL_BINS", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "WhisperMelPreprocessor", "WhisperStemAdapter"]

SAMPLE_RATE, MEL_BINS = 16000, 80
# Accepted input rates: below 1 kHz is no longer speech (and costly to upsample); 384 kHz is the
# highest rate audio interfaces record.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000

# A frame target (or other decoder-side slot) defaults to its own fed-back adapter, not the input one
# (before the fifteenth audit `-> [AUDIO:clip]` shared audio_conv with every audio input, without the
# pre-net dropout; only the presets, which spell adaptor=audio_tgt_fbank / motion_tgt, had it).
register_modality(ModalitySpec("AUDIO", text_like=False, preprocess="audio_fbank", adaptor="audio_conv",
                               continuous_target=True, target_adaptor="audio_tgt_fbank"))
register_modality(ModalitySpec("MOTION", text_like=False, preprocess="motion", adaptor="motion_mlp",
                               continuous_target=True, target_adaptor="motion_tgt"))


def _read_wav(source) -> tuple[np.ndarray, int]:
    """Mono float samples and the rate of a WAV file: PCM of 8, 16, 24 or 32 bits, IEEE floats,
    and the extensible header that ffmpeg, sox and audio editors write (scipy's reader; the
    standard library's ``wave`` reads 8/16/32-bit PCM only)."""
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # chunks it skips (LIST, cue...)
            rate, data = wavfile.read(source)
    except Exception as exc:  # ValueError of unknown formats, EOFError, OSError, broken headers
        raise SlotValueError(f"cannot read the WAV audio: {exc}") from None
    if len(data) == 0:  # (numpy's reshape error spoke for it)
        raise SlotValueError("the WAV file holds no samples (the waveform is empty)")
    return _pcm_to_float(np.asarray(data)).reshape(len(data), -1).mean(axis=1), int(rate)


def _pcm_to_float(data: np.ndarray) -> np.ndarray:
    """Integer PCM samples scaled to [-1, 1) by their type's range (unsigned 8-bit is centred on
    128); floats as they are."""
    if data.dtype.kind == "u":
        half = float(2 ** (8 * data.dtype.itemsize - 1))
        return (data.astype(np.float32) - half) / half
    if data.dtype.kind == "i":
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data


def _refuse_unscaled_pcm(value: np.ndarray, given: str) -> None:
    """Whole numbers beyond ±1 in a waveform whose type does not give their range (a list, a 64-bit
    integer array) are integer PCM samples of an unknown width: refused rather than guessed."""
    peak = float(np.abs(value).max()) if value.size and np.isfinite(value).all() else 0.0
    if peak > 1.0 and np.array_equal(value, np.round(value)):
        raise SlotValueError(f"the waveform {given} holds whole numbers up to {peak:.0f}: integer PCM samples, "
                             f"whose range its type does not say; give floats in [-1, 1] or a numpy integer "
                             "array (int16, int32, uint8), which is scaled by its type's range")


def check_sample_rate(rate: Any) -> int:
    """A sample rate, rounded to whole samples per second, in [``MIN_SAMPLE_RATE``,
    ``MAX_SAMPLE_RATE``] (None: ``SAMPLE_RATE``).

    A wrong rate is costly rather than merely wrong: a clip declared at 1 Hz is resampled to
    16,000 times its length. Raises ``SlotValueError`` for anything else (text such as ``"16k"``,
    booleans, non-finite or out-of-range numbers).
    """
    if rate is None:
        return SAMPLE_RATE
    value = None
    if isinstance(rate, numbers.Real) and not isinstance(rate, (bool, np.bool_)):
        try:
            value = float(rate)
        except OverflowError:
            pass
    if value is None or not math.isfinite(value) or not MIN_SAMPLE_RATE <= round(value) <= MAX_SAMPLE_RATE:
        raise SlotValueError(f"the sample rate must be a number of samples per second between {MIN_SAMPLE_RATE} "
                             f"and {MAX_SAMPLE_RATE}, got {brief(rate)}")
    return int(round(value))


_MAX_CHANNELS = 8


def read_waveform(value: Any, sample_rate: Any = None) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform ``[S]`` at its own rate, and that rate, from an array or tensor of
    floats ``[S]``, ``[C, S]`` or ``[S, C]`` (channels averaged; at ``sample_rate``, default
    16 kHz), a ``{"array", "sampling_rate"}`` dict, a WAV path or WAV bytes, or a Hugging Face
    ``{"bytes", "path"}`` dict of a WAV file (``Audio(decode=False)``: the bytes, else the path).
    Raises ``SlotValueError`` for anything else, empty or non-finite waveforms and bad sample
    rates."""
    if isinstance(value, Mapping) and "array" in value:  # its own rate, else the one given (the row's)
        value, sample_rate = value["array"], value.get("sampling_rate", value.get("sample_rate", sample_rate))
    elif isinstance(value, Mapping):  # undecoded (before the fifteenth audit "needs ... a dict, got dict")
        value = undecoded_media(value, "an AUDIO slot", "{'array', 'sampling_rate'}")
    if isinstance(value, (str, os.PathLike)):
        value, sample_rate = _read_wav(regular_file(value, "audio"))
    elif isinstance(value, (bytes, bytearray)):
        value, sample_rate = _read_wav(io.BytesIO(value))
    if isinstance(value, (list, tuple)):  # e.g. from JSONL
        try:
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                value = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise SlotValueError("an audio waveform given as a list must be a list of numbers (or of equally long "
                                 "channel lists)") from None
        _refuse_unscaled_pcm(value, "list")  # e.g. int16 samples written to JSONL
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.dtype.itemsize == 8:
        # numpy's default integer (np.array of Python ints): no PCM format has 64-bit samples, so the
        # type's range says nothing of the samples' (int16 samples scaled by 2^63 were silence)
        given, value = f"{value.dtype} array", value.astype(np.float32)
        _refuse_unscaled_pcm(value, given)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "iu":
            value = _pcm_to_float(value)
        elif value.dtype.kind != "f":
            raise SlotValueError(f"an audio array must hold floats or integer PCM samples, got dtype {value.dtype}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2):
        raise SlotValueError(
            f"an AUDIO slot needs a float waveform [S] or [C, S], a {{'array', 'sampling_rate'}} or {{'bytes', "
            f"'path'}} dict, a WAV path or bytes, got "
            f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}"
        )
    wav = value.detach().cpu().float()
    if wav.dim() == 2:  # channels first (torchaudio) or last (soundfile, scipy): the short side, up to 8
        rows, columns = wav.shape
        if rows > _MAX_CHANNELS and columns > _MAX_CHANNELS:
            raise SlotValueError(f"a 2-D waveform must be [C, S] or [S, C] with at most {_MAX_CHANNELS} channels, "
                                 f"got shape {tuple(wav.shape)}")
        wav = wav.mean(0) if rows <= columns else wav.mean(1)
    if wav.numel() == 0 or not torch.isfinite(wav).all():
        raise SlotValueError("the waveform is empty or has non-finite samples")
    return wav, check_sample_rate(sample_rate)


# torchaudio's sinc resampler builds (new × orig) kernel phases for the rates divided by their gcd:
# co-prime rates such as 44101 Hz would take minutes and gigabytes.
_MAX_RESAMPLE_PHASES = 1_000_000


def resample(wav_S: torch.Tensor, rate: int) -> torch.Tensor:
    """The waveform ``[S]`` at ``rate`` Hz resampled to 16 kHz. Rates whose exact ratio to 16 kHz
    needs too large a kernel (co-prime ones) are resampled by the nearest ratio of integers up to
    256 instead: a clip's length and pitch then change by at most 0.2 % (15969 Hz read as 16 kHz)."""
    import torchaudio

    if rate == SAMPLE_RATE:
        return wav_S
    orig, new = rate, SAMPLE_RATE
    gcd = math.gcd(orig, new)
    if (orig // gcd) * (new // gcd) > _MAX_RESAMPLE_PHASES:
        if orig > new:
            ratio = fractions.Fraction(orig, new).limit_denominator(256)
            orig, new = ratio.numerator, ratio.denominator
        else:
            ratio = fractions.Fraction(new, orig).limit_denominator(256)
            orig, new = ratio.denominator, ratio.numerator
        if orig == new:
            return wav_S
    return torchaudio.functional.resample(wav_S, orig, new)


def load_waveform(value: Any, sample_rate: Optional[int] = None) -> torch.Tensor:
    """Mono float32 waveform ``[S]`` at 16 kHz from an array (with ``sample_rate``, default 16 kHz),
    a ``{"array", "sampling_rate"}`` dict, a WAV path or WAV bytes."""
    return resample(*read_waveform(value, sample_rate))


def fbank(wav_S: torch.Tensor) -> torch.Tensor:
    """80-bin log-mel filterbank ``[frames, 80]`` (25 ms window, 10 ms shift), per-utterance
    mean/variance normalised."""
    import torchaudio.compliance.kaldi as kaldi

    min_len = int(0.025 * SAMPLE_RATE)
    if wav_S.numel() < min_len:  # shorter than one window: pad so there is one frame
        wav_S = torch.nn.functional.pad(wav_S, (0, min_len - wav_S.numel()))
    feats = kaldi.fbank(wav_S.unsqueeze(0) * 32768.0, num_mel_bins=MEL_BINS,
                        sample_frequency=SAMPLE_RATE, dither=0.0)
    normalised = (feats - feats.mean(0)) / feats.std(0, unbiased=False).clamp_min(1e-5)
    # a bin constant over the clip (digital silence) is 0: its mean rounds off its float32 values by
    # ~1e-6, which the std floor made about -0.1, a value that changed with the clip's length
    return normalised.masked_fill(feats.amax(0) == feats.amin(0), 0.0)


def _stack(frames_TF: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, F]`` → ``[ceil(T/k), k·F]``, zero-padding the last row."""
    T, F = frames_TF.shape
    rows = -(-T // k)
    padded = torch.zeros(rows * k, F, dtype=frames_TF.dtype)
    padded[:T] = frames_TF
    return padded.reshape(rows, k * F)


def _unstack(rows_NF: torch.Tensor, width: int) -> np.ndarray:
    """``_stack`` undone: rows ``[N, k·width]`` → float32 frames ``[N·k, width]``."""
    return rows_NF.detach().float().cpu().reshape(-1, width).numpy()


def _padded_values(rows: torch.Tensor, frames_TF: torch.Tensor) -> int:
    """Values that only pad the last of ``rows`` (``_stack`` of ``frames_TF``, maybe cut shorter)."""
    return max(0, rows.numel() - frames_TF.numel())


def _frame_positions(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)], -1)


def _slot_waveform(value, slot, ctx: EncodeContext) -> tuple[torch.Tensor, int]:
    """A slot's waveform and rate (the row's ``sample_rate`` or ``sampling_rate`` column when the value has none);
    errors name the task, column and row."""
    try:
        # the row's rate, as moe_gen or Hugging Face datasets name it (unread, an 8 kHz clip was taken as 16 kHz)
        rate = ctx.row.get("sample_rate", ctx.row.get("sampling_rate")) if hasattr(ctx.row, "get") else None
        return read_waveform(value, rate)
    except SlotValueError as exc:
        raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None


@PREPROCESSORS.register("audio_fbank")
class AudioPreprocessor(Preprocessor):
    """Waveform → fbank → ``frames_per_row`` (default 4) frames stacked per row."""

    modality = "AUDIO"

    def __init__(self, frames_per_row: int = 4, augment: bool = True,
                 speeds: tuple[float, ...] = (0.9, 1.0, 1.1)) -> None:
        _check_frames_per_row("audio_fbank", frames_per_row)
        if not speeds or not all(isinstance(f, numbers.Real) and 0.5 <= f <= 2 for f in speeds):
            raise ValueError(f"audio_fbank: speeds must be factors in [0.5, 2], got {speeds!r}")
        self.frames_per_row, self.augment, self.speeds = frames_per_row, augment, tuple(speeds)

    def feature_dim(self) -> int:
        return self.frames_per_row * MEL_BINS

    def rows_to_value(self, rows_NF: torch.Tensor, slot_name: Optional[str]) -> np.ndarray:
        """Generated rows unstacked to log-mel filterbank frames ``[N·k, 80]``, each utterance's
        standardised as ``fbank`` makes them: features, not a waveform (the fbank drops the phase,
        so no waveform can be read back), and an AUDIO input reads waveforms only. The last row's k
        frames are all kept: its padding is not learned, so the model does not mark it."""
        return _unstack(rows_NF, MEL_BINS)

    def _perturb(self, wav: torch.Tensor, ctx: EncodeContext) -> torch.Tensor:
        """Speed perturbation (by default ×0.9, ×1.0, ×1.1 by resampling, Ko et al. 2015): new
        speakers' tempo and pitch; training only, encoder inputs only. A factor that would make
        the clip longer than the slot's cap is not applied (the clip stays as evaluation reads it)."""
        factor = ctx.rng.choice(self.speeds)
        if factor == 1.0 or self._over_cap(wav.numel() / factor / SAMPLE_RATE, ctx):
            return wav
        return resample(wav, int(SAMPLE_RATE * factor))

    def _rows(self, seconds: float) -> int:
        """Positions a clip of ``seconds`` at 16 kHz takes: the filterbank's frames (25 ms windows
        every 10 ms inside the clip; one for a clip under a window), ``frames_per_row`` to a row.
        Exact for a clip at 16 kHz or an integer ratio of it (before 2026-12-06 one frame every
        10 ms of the whole clip: about 1.5 frames more, so a clip that fits could be refused)."""
        samples = math.ceil(seconds * SAMPLE_RATE - 1e-6)  # resampling rounds the length up
        window, shift = int(0.025 * SAMPLE_RATE), int(0.010 * SAMPLE_RATE)
        frames = 1 + max(0, samples - window) // shift
        return math.ceil(frames / self.frames_per_row)

    def _over_cap(self, seconds: float, ctx: EncodeContext) -> bool:
        return ctx.max_positions is not None and self._rows(seconds) > ctx.max_positions

    @staticmethod
    def _spec_augment(feats: torch.Tensor, ctx: EncodeContext) -> torch.Tensor:
        """SpecAugment-style masks (Park et al. 2019): one band of up to 10 mel bins and one span
        of up to 10% of the frames set to the (normalised) mean 0; training only, encoder inputs only."""
        feats = feats.clone()
        width = ctx.rng.randint(0, 10)
        start = ctx.rng.randint(0, MEL_BINS - width)
        feats[:, start:start + width] = 0.0
        span = ctx.rng.randint(0, max(1, feats.shape[0] // 10))
        begin = ctx.rng.randint(0, max(0, feats.shape[0] - span))
        feats[begin:begin + span] = 0.0
        return feats

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        wav, rate = _slot_waveform(value, slot, ctx)
        seconds = wav.numel() / rate
        # One fbank frame every 10 ms: refuse an over-long clip before resampling it.
        rows = self._rows(seconds)
        if self._over_cap(seconds, ctx):
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip is {seconds:.3g} s long (about {rows} "
                                 f"positions), over the cap of {ctx.max_positions} positions per slot; cut it, check "
                                 f"its sample rate ({rate} Hz), or raise Task(max_slot_positions=...)")
        wav = resample(wav, rate)
        # inputs only: a target augmented would be a regression label the text cannot predict
        augment = ctx.training and self.augment and not ctx.target
        if augment:
            wav = self._perturb(wav, ctx)
        feats = fbank(wav)
        if not torch.isfinite(feats).all():  # e.g. samples ~1e20: their energies overflow float32
            raise SlotValueError(f"{ctx.where(slot.column)}: the filterbank of this waveform is not finite (its "
                                 f"largest sample is {float(wav.abs().max()):.3g}; waveforms are expected in [-1, 1])")
        if augment:
            feats = self._spec_augment(feats, ctx)
        max_rows = slot.attrs.get("max_length")
        rows = _stack(feats, self.frames_per_row)
        if max_rows is not None:
            rows = rows[: int(max_rows)]
        if ctx.max_positions is not None and rows.shape[0] > ctx.max_positions:
            # a rate resampled by the nearest ratio (co-prime ones) may lengthen the clip by 0.2%
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip is {seconds:.3g} s long ({rows.shape[0]} "
                                 f"positions after resampling from {rate} Hz), over the cap of {ctx.max_positions} "
                                 "positions per slot; cut it, or raise Task(max_slot_positions=...)")
        return SlotEncoding("AUDIO", features=rows, positions=_frame_positions(rows.shape[0]),
                            meta={"frames": int(feats.shape[0]), "seconds": wav.numel() / SAMPLE_RATE,
                                  "padded_values": _padded_values(rows, feats)})


def _check_frames_per_row(name: str, frames_per_row) -> None:
    if isinstance(frames_per_row, bool) or not isinstance(frames_per_row, int) or frames_per_row < 1:
        raise ValueError(f"{name}: frames_per_row must be a whole number >= 1, got {frames_per_row!r}")


# Standardised MOTION features (frames and pose_summary statistics) are clipped to ±MOTION_Z_CLIP,
# as table numbers are (table.Z_CLIP): a held-out clip far outside the training range (1e5 in an fp16
# model, 1e37 in fp32) overflowed the adapter's activations to inf and gave NaN scores and arbitrary
# answers. The built-in motion data stays within ±9.3 (motion_classification, text_to_motion).
MOTION_Z_CLIP = 10.0


def feature_scale(std, mean) -> np.ndarray:
    """What per-feature standardisation divides by: the standard deviation, or 1 where the feature
    hardly varied in the rows it was fitted on (a constant one would divide a held-out clip's small
    difference by ~0). "Hardly" is relative to the feature's magnitude, its root mean square
    sqrt(mean² + std²): a deviation under 1e-9 of it, as table columns are tested
    (``table._mean_and_scale``). Before the fifteenth audit the test was an absolute std > 1e-6, so
    data in small units (1e-7 m) was taken as constant and fed to the model unscaled, near 0."""
    std = np.asarray(std)
    magnitude = np.hypot(np.asarray(mean, np.float64), std.astype(np.float64))
    return np.where(std > 1e-9 * magnitude, std, 1.0).astype(std.dtype)


def motion_frames(value: Any, dtype=np.float32) -> np.ndarray:
    """Pose frames ``[T, J]`` (T, J ≥ 1) of finite numbers within float32's range, as ``dtype``,
    from an array, a tensor or nested lists. Raises ``SlotValueError`` for anything else."""
    if isinstance(value, torch.Tensor):
        value = tensor_to_numpy(value)
    frames = None
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype.kind in "biufO"):
        try:
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                frames = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError, OverflowError):  # ragged lists, text, ints too large
            frames = None
    if frames is None or frames.ndim != 2 or 0 in frames.shape:
        described = f"shape {frames.shape}" if frames is not None else (
            f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__)
        raise SlotValueError(f"a MOTION slot needs frames [T, J] of numbers, got {described}")
    if not np.isfinite(frames).all() or float(np.abs(frames).max()) > float(np.finfo(np.float32).max):
        raise SlotValueError("motion frames have non-finite values (or values beyond float32's range)")
    return frames


def motion_window(frames: np.ndarray, slot, rng: Optional[random.Random] = None) -> np.ndarray:
    """The frames a MOTION slot reads: every ``sample_rate``-th frame, then at most ``max_length``
    of them (slot attributes): a window drawn by ``rng`` (training), else the first one. With
    ``min_length``, a training window's length is drawn too, uniformly from ``min_length`` up to
    that limit (or the clip), so the model meets shorter stretches of each clip; evaluation reads
    the full first window."""
    frames = frames[:: int(slot.attrs.get("sample_rate", 1))]
    limit = len(frames) if slot.attrs.get("max_length") is None else min(int(slot.attrs["max_length"]), len(frames))
    shortest = min(int(slot.attrs.get("min_length", limit)), limit)
    if rng is not None and shortest < limit:
        limit = rng.randint(shortest, limit)
    if len(frames) > limit:
        start = rng.randrange(len(frames) - limit + 1) if rng is not None else 0
        frames = frames[start:start + limit]
    return frames


@PREPROCESSORS.register("motion")
class MotionPreprocessor(Preprocessor):
    """Pose frames ``[T, J]`` → normalised with the task's per-feature statistics (``meta`` of the
    plan, else the clip's own) and clipped to ±``MOTION_Z_CLIP`` → every ``sample_rate``-th frame →
    at most ``max_length`` frames (a random window in training) → ``frames_per_row`` frames a row."""

    modality = "MOTION"

    def __init__(self, frames_per_row: int = 2, mean=None, std=None, columns=None) -> None:
        _check_frames_per_row("motion", frames_per_row)
        self.frames_per_row = frames_per_row
        self.mean, self.std = mean, std
        # slot name -> {"mean", "std"}: a task's own per MOTION column, or "slot N" for a slot filled
        # by position (EncodeContext.slot_name; these win over mean and std)
        self.columns = {c: (np.asarray(m["mean"], np.float64), np.asarray(m["std"], np.float64))
                        for c, m in dict(columns or {}).items()}
        self.width: Optional[int] = None

    def feature_dim(self) -> Optional[int]:
        return None if self.width is None else self.frames_per_row * self.width

    def rows_to_value(self, rows_NF: torch.Tensor, slot_name: Optional[str]) -> np.ndarray:
        """Generated rows as pose frames ``[N·k, J]`` in the data's own units: unstacked, and the
        standardisation with the task's statistics for ``slot_name`` undone, so another task's
        MOTION input reads them as it reads data. The frames are every ``sample_rate``-th of the
        clip, as the slot trained on them; the last row's k frames are all kept (its padding is not
        learned, so the model does not mark it).

        Raises:
            ValueError: without statistics (a task that had no rows when its model was built, and a
                model that saved none), or with statistics of another width than the rows'.
        """
        mean, std = self.columns.get(slot_name, (self.mean, self.std))
        if mean is None or std is None:
            raise ValueError("its generated frames are standardised, and the task has no motion statistics to undo "
                             "that with (fit on its rows when the model is built, and saved with it)")
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if mean.ndim != 1 or mean.shape != std.shape or rows_NF.shape[1] != self.frames_per_row * mean.size:
            raise ValueError(f"the generated rows have {rows_NF.shape[1]} values, not {self.frames_per_row} frames of "
                             f"the task's motion statistics (mean of shape {mean.shape}, std {std.shape})")
        frames = _unstack(rows_NF, mean.size).astype(np.float64) * feature_scale(std, mean) + mean
        return frames.astype(np.float32)  # (in float64 until then, as the frames were standardised)

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        try:  # float64 until standardised: float32 frames on an offset of 1e6 keep steps of 0.0625
            frames = motion_frames(value, np.float64)
        except SlotValueError as exc:
            raise SlotValueError(f"{ctx.where(slot.column)}: {exc}") from None
        mean, std = self.columns.get(ctx.slot_name, (self.mean, self.std))
        if mean is not None and np.shape(mean) != (frames.shape[1],):
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip has {frames.shape[1]} features a frame, the "
                                 f"task's motion statistics {np.shape(mean)[-1]}")
        mean = np.asarray(mean, np.float64) if mean is not None else frames.mean(0)
        std = np.asarray(std, np.float64) if std is not None else frames.std(0)
        frames = np.clip((frames - mean) / feature_scale(std, mean), -MOTION_Z_CLIP, MOTION_Z_CLIP)
        frames = motion_window(frames, slot, ctx.rng if ctx.training else None)
        self.width = frames.shape[1]
        frames_TF = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        rows = _stack(frames_TF, self.frames_per_row)
        return SlotEncoding("MOTION", features=rows, positions=_frame_positions(rows.shape[0]),
                            meta={"frames": int(len(frames)), "padded_values": _padded_values(rows, frames_TF)})


class ConvSubsampleAdapter(Adapter):
    """Stacked fbank rows ``[N, k·80]`` → a 2-layer 1-D convolution over the k frames of each row
    (stride 2 twice: k=4 frames → 1 vector) → Linear → ``[N, D]``, plus a frame-index embedding."""

    def __init__(self, feature_dim: int, d_model: int, mel_bins: int = MEL_BINS, max_rows: int = 4096) -> None:
        super().__init__(feature_dim, d_model)
        self.mel_bins = mel_bins
        self.frames = feature_dim // mel_bins
        self.conv = nn.Sequential(
            nn.Conv1d(mel_bins, d_model, kernel_size=3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1), nn.GELU(),
        )
        self.proj = nn.Linear(d_model, d_model)
        self.position = nn.Embedding(max_rows, d_model)

    def forward(self, features_NF, positions_N3):
        x = features_NF.view(-1, self.frames, self.mel_bins).transpose(1, 2)  # [N, 80, k]
        h = self.conv(x).mean(-1)  # [N, D]: each row's k frames subsampled to one vector
        return self.proj(h) + self.position(positions_N3[:, 0].clamp_max(self.position.num_embeddings - 1))


class FrameMLPAdapter(Adapter):
    """Frame rows ``[N, F]`` → MLP → ``[N, D]`` plus a frame-index embedding (motion)."""

    def __init__(self, feature_dim: int, d_model: int, max_rows: int = 4096) -> None:
        super().__init__(feature_dim, d_model)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.position = nn.Embedding(max_rows, d_model)

    def forward(self, features_NF, positions_N3):
        return self.mlp(features_NF) + self.position(positions_N3[:, 0].clamp_max(self.position.num_embeddings - 1))


@PREPROCESSORS.register("whisper_mel")
class WhisperMelPreprocessor(Preprocessor):
    """Waveform → Whisper's log-mel spectrogram (``transformers.WhisperFeatureExtractor``: 80
    bins, 16 kHz, 10 ms hop, padded or cut to 30 s = 3000 frames) → two frames a row ``[1500,
    160]``: the positions a Whisper encoder reads after its stride-2 stem. For ``whisper_conv``
    (a pretrained Whisper encoder's stem)."""

    modality = "AUDIO"
    frames, mel_bins = 3000, MEL_BINS

    def __init__(self) -> None:
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor(feature_size=self.mel_bins, sampling_rate=SAMPLE_RATE)

    def feature_dim(self) -> int:
        return 2 * self.mel_bins

    def __call__(self, value, slot, ctx: EncodeContext) -> SlotEncoding:
        wav, rate = _slot_waveform(value, slot, ctx)
        seconds = wav.numel() / rate
        if seconds > 30:
            raise SlotValueError(f"{ctx.where(slot.column)}: the clip is {seconds:.3g} s long; Whisper's encoder "
                                 "reads at most 30 s (cut it)")
        wav = resample(wav, rate)
        mel = self.extractor(wav.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]
        if not torch.isfinite(mel).all():
            raise SlotValueError(f"{ctx.where(slot.column)}: the log-mel spectrogram of this waveform is not finite")
        rows = mel.T.reshape(self.frames // 2, 2 * self.mel_bins)  # row t: frames 2t and 2t+1
        return SlotEncoding("AUDIO", features=rows, positions=_frame_positions(rows.shape[0]),
                            meta={"frames": self.frames, "seconds": wav.numel() / SAMPLE_RATE})


class WhisperStemAdapter(Adapter):
    """Whisper's audio stem on ``whisper_mel`` rows: per clip, the mel frames ``[80, 2n]`` →
    Conv1d(k=3) → GELU → Conv1d(k=3, stride 2) → GELU → ``[n, D]``, plus the encoder's position
    table (sinusoidal in Whisper; loaded from the checkpoint). A clip's rows are consecutive and
    numbered from 0 (``positions[:, 0]``), as the preprocessor makes them."""

    def __init__(self, feature_dim: int, d_model: int, max_rows: int = 1500) -> None:
        super().__init__(feature_dim, d_model)
        self.mel_bins = feature_dim // 2
        self.conv1 = nn.Conv1d(self.mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.position = nn.Embedding(max_rows, d_model)
        with torch.no_grad():  # Whisper's sinusoids until a checkpoint replaces them
            self.position.weight.copy_(_sinusoids(max_rows, d_model))

    def load_checkpoint(self, weights) -> None:
        """Copies a Whisper checkpoint's stem (``encoder.conv1``, ``encoder.conv2``,
        ``encoder.embed_positions``); ``weights(name)`` returns a tensor."""
        pairs = [(getattr(self, conv).weight, f"encoder.{conv}.weight") for conv in ("conv1", "conv2")]
        pairs += [(getattr(self, conv).bias, f"encoder.{conv}.bias") for conv in ("conv1", "conv2")]
        pairs.append((self.position.weight, "encoder.embed_positions.weight"))
        with torch.no_grad():
            for param, name in pairs:
                value = weights(name)
                if value.shape != param.shape:
                    raise ValueError(f"the checkpoint's {name} is {tuple(value.shape)}, the audio stem's "
                                     f"{tuple(param.shape)} (mel bins {self.mel_bins}, width {self.d_model})")
                param.copy_(value)

    def forward(self, features_NF, positions_N3):
        starts = (positions_N3[:, 0] == 0).nonzero().flatten().tolist() + [features_NF.shape[0]]
        if starts[0] != 0:
            raise ValueError("whisper_conv needs whole clips, each numbered from row 0 (whisper_mel's rows); "
                             f"the first row is numbered {int(positions_N3[0, 0])}")
        lengths = [end - begin for begin, end in zip(starts[:-1], starts[1:])]
        # Clips of one length (whisper_mel makes every clip 1,500 rows) run as one batch.
        runs = [features_NF.reshape(len(lengths), lengths[0], -1)] if len(set(lengths)) == 1 else \
            [chunk.unsqueeze(0) for chunk in features_NF.split(lengths)]
        out = []
        for clips in runs:  # [C, n, 2·80] → frames [C, 80, 2n]
            frames = clips.reshape(clips.shape[0], 2 * clips.shape[1], self.mel_bins).transpose(1, 2)
            h = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(frames))))  # [C, D, n]
            out.append(h.transpose(1, 2).reshape(-1, h.shape[1]))
        return torch.cat(out) + self.position(positions_N3[:, 0].clamp_max(self.position.num_embeddings - 1))


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's encoder positions: sin then cos of geometrically spaced timescales (10000 max)."""
    increment = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FedBackFrameAdapter(FrameMLPAdapter):
    """The decoder-side adapter of a continuous target: it reads the previous frame, the true one
    in training (teacher forcing) and the model's own prediction when generating. Its hidden layer
    drops half its units in training (Tacotron 2's pre-net dropout), so the next frame cannot be
    copied from the previous one alone and the decoder leans on the input it is conditioned on.
    Without it the demo's text-to-speech model stopped at the same row for 36 of its 40 held-out
    words, whatever their length; with it the length follows the word (docs/demo.md). Same
    parameters as ``FrameMLPAdapter``; nothing changes at inference."""

    dropout = 0.5

    def forward(self, features_NF, positions_N3):
        first, activation, second = self.mlp
        hidden = nn.functional.dropout(activation(first(features_NF)), p=self.dropout, training=self.training)
        return second(hidden) + self.position(positions_N3[:, 0].clamp_max(self.position.num_embeddings - 1))


ADAPTERS.register("whisper_conv")(WhisperStemAdapter)
ADAPTERS.register("audio_conv")(ConvSubsampleAdapter)
ADAPTERS.register("motion_mlp")(FrameMLPAdapter)
# Decoder-side adapters of continuous targets read the previous frames (teacher forcing).
ADAPTERS.register("audio_tgt_fbank")(FedBackFrameAdapter)
ADAPTERS.register("motion_tgt")(FedBackFrameAdapter)
