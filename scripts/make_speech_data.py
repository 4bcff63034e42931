"""Generate the small offline speech data sets shipped in ``moe_gen/tasks/data/``.

Run once by hand (the outputs are committed, so tests never need these system packages):

Usage:
    apt-get install -y flite espeak-ng alsa-utils      # Debian bookworm: flite 2.2, espeak-ng 1.51
    .venv/bin/python scripts/make_speech_data.py       # writes speech_words.npz and speech_alsa.npz
    .venv/bin/python scripts/make_speech_data.py --check   # rebuild in a temp dir, compare byte for byte

Outputs (both read by ``moe_gen.tasks.sources.speech`` with numpy alone, no pickles):

    speech_words.npz   synthesised: 18 words ("zero".."nine", "yes", "no", "up", "down", "left",
                       "right", "stop", "go") spoken by 21 voices: 6 from flite (its four 16 kHz
                       voices, plus two pitch-shifted variants) and 15 from espeak-ng (its English
                       accents x voice variants x speed x pitch). 378 clips, 166 s, 3.75 MB.
    speech_alsa.npz    real recordings: the 8 spoken channel-test clips that alsa-utils installs
                       under /usr/share/sounds/alsa ("Front Center", ...), one human speaker.
                       8 clips, 11 s, 0.21 MB.
                       Note: alsa-utils is GPL-2; these clips are kept in their own file so that a
                       redistribution that cannot carry them can drop the file.

Processing of every clip: read the 16-bit WAV, resample to 16 kHz with a polyphase filter
(espeak-ng writes 22050 Hz, alsa-utils 48 kHz, flite's voices are 16 kHz already), trim leading and
trailing silence (frames more than 40 dB below the clip's loudest 10 ms frame), fade 5 ms in and out so
the cut does not click, peak-normalise to 0.89 (about -1 dBFS), round to int16.

File layout (keys of each .npz; N clips, S samples in all):
    format_version  int64 ()       1
    sample_rate     int64 ()       16000
    offsets         int64 (N+1)    clip i is samples offsets[i]:offsets[i+1] of the decoded PCM
    pcm_delta_lo    uint8 (S)      low bytes of the first difference of the int16 PCM (wrapping)
    pcm_delta_hi    uint8 (S)      high bytes of the same
    text            <U (N)         the words spoken, lower case
    speaker         <U (N)         the voice, e.g. "flite-slt", "espeak-en-gb-f3", "alsa-utils"
    engine          <U (N)         "flite", "espeak-ng" or "recorded"
Why delta + split bytes: speech is smooth at 16 kHz, so the first difference is small, and storing its
high and low bytes in separate arrays lets deflate see long runs of near-constant high bytes. That is
lossless and makes the file about 17 % smaller than deflating the raw int16; decoding is a cumulative
sum (see the loader). The 4 MB budget for both files is what bounds the number of voices: each voice
adds about 0.18 MB, and tempo-only variants of one timbre were the first to go.

Determinism: flite and espeak-ng are deterministic synthesisers, resampling is pure arithmetic, and the
archive is written with fixed member timestamps and order (``np.savez_compressed`` stamps the current
time), so two runs on the same machine give identical bytes. Other versions of flite, espeak-ng or zlib
may change the bytes (not the format); ``--check`` tells.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from moe_gen.tasks.sources.npz import write_npz

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "moe_gen" / "tasks" / "data"
SAMPLE_RATE = 16000
FORMAT_VERSION = 1

WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "stop", "go",
)  # fmt: skip

ALSA_DIR = Path("/usr/share/sounds/alsa")
# File stem -> what the speaker says. Noise.wav is pink noise, not speech, so it is left out.
ALSA_CLIPS = {
    "Front_Center": "front center",
    "Front_Left": "front left",
    "Front_Right": "front right",
    "Rear_Center": "rear center",
    "Rear_Left": "rear left",
    "Rear_Right": "rear right",
    "Side_Left": "side left",
    "Side_Right": "side right",
}

TRIM_DB = -40.0  # frames quieter than this, relative to the loudest frame, count as silence
FRAME = SAMPLE_RATE // 100  # 10 ms analysis frames for trimming
MARGIN_FRAMES = 2  # keep 20 ms of context around the speech so onsets and final stops survive
FADE = SAMPLE_RATE // 200  # 5 ms raised-cosine fade at both ends
PEAK = 0.89  # about -1 dBFS: headroom so int16 rounding never clips


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: a name and the command-line options that make it.

    Attributes:
        name: the speaker label stored with every clip.
        engine: "flite" or "espeak-ng".
        options: extra arguments placed before the text on the engine's command line.
    """

    name: str
    engine: str
    options: tuple[str, ...]


def _flite(name: str, voice: str, stretch: float = 1.0, f0_mean: int | None = None) -> Voice:
    # duration_stretch changes the tempo for every voice; int_f0_target_mean moves the pitch only for
    # slt and kal16 (rms and awb ignore it in flite 2.2, measured), so only those two get variants.
    options = ["-voice", voice]
    if stretch != 1.0:
        options += ["--setf", f"duration_stretch={stretch}"]
    if f0_mean is not None:
        options += ["--setf", f"int_f0_target_mean={f0_mean}"]
    return Voice(name, "flite", tuple(options))


def _espeak(name: str, voice: str, speed: int = 175, pitch: int = 50) -> Voice:
    # espeak-ng defaults: -s 175 words per minute, -p 50 (pitch on a 0..99 scale).
    return Voice(name, "espeak-ng", ("-v", voice, "-s", str(speed), "-p", str(pitch)))


VOICES = (
    # flite's four 16 kHz voices (kal is 8 kHz and awb_time only speaks clock times: both left out).
    _flite("flite-slt", "slt"),
    _flite("flite-rms", "rms"),
    _flite("flite-awb", "awb"),
    _flite("flite-kal16", "kal16"),
    _flite("flite-slt-low", "slt", stretch=1.1, f0_mean=140),
    _flite("flite-kal16-high", "kal16", f0_mean=145),
    # espeak-ng: its English accents crossed with voice variants (+m* male, +f* female, klatt, whisper).
    _espeak("espeak-en-us", "en-us"),
    _espeak("espeak-en-us-f2-high", "en-us+f2", speed=170, pitch=70),
    _espeak("espeak-en-us-m3-slow", "en-us+m3", speed=140, pitch=40),
    _espeak("espeak-en-us-klatt", "en-us+klatt", speed=160),
    _espeak("espeak-en-us-whisper", "en-us+whisperf", speed=150),
    _espeak("espeak-en-gb", "en-gb"),
    _espeak("espeak-en-gb-f3", "en-gb+f3", speed=150, pitch=55),
    _espeak("espeak-en-gb-m7-low", "en-gb+m7", speed=165, pitch=25),
    _espeak("espeak-en-scotland", "en-gb-scotland", speed=160, pitch=45),
    _espeak("espeak-en-scotland-f5", "en-gb-scotland+f5", speed=180, pitch=60),
    _espeak("espeak-en-rp-m1", "en-gb-x-rp+m1", speed=150, pitch=35),
    _espeak("espeak-en-lancaster-f1", "en-gb-x-gbclan+f1", speed=170, pitch=55),
    _espeak("espeak-en-westmidlands-m5", "en-gb-x-gbcwmd+m5", speed=155, pitch=45),
    _espeak("espeak-en-caribbean-f2-fast", "en-029+f2", speed=200, pitch=65),
    _espeak("espeak-en-nyc", "en-us-nyc"),
)


def read_wav(path: Path) -> np.ndarray:
    """Read a 16-bit PCM WAV file and resample it to 16 kHz mono.

    Args:
        path: the WAV file.

    Returns:
        float64 array of shape (samples,), nominally in [-1, 1].
    """
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * wav.getsampwidth()}-bit")
        rate, channels = wav.getframerate(), wav.getnchannels()
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    x = raw.reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != SAMPLE_RATE:
        # Polyphase resampling by the reduced ratio (22050 -> 16000 is 320/441) applies an
        # anti-aliasing low-pass at the lower of the two Nyquist rates.
        g = np.gcd(rate, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g)
    return x


def clean(x: np.ndarray) -> np.ndarray:
    """Trim silence, fade the ends, peak-normalise and quantise one clip.

    Args:
        x: float array of shape (samples,) at 16 kHz.

    Returns:
        int16 array of shape (kept_samples,).
    """
    n_frames = len(x) // FRAME
    if n_frames == 0:
        raise ValueError("clip shorter than one 10 ms frame")
    rms_F = np.sqrt(np.mean(x[: n_frames * FRAME].reshape(n_frames, FRAME) ** 2, axis=1))
    level_db_F = 20.0 * np.log10(np.maximum(rms_F, 1e-10) / max(rms_F.max(), 1e-10))
    loud = np.flatnonzero(level_db_F > TRIM_DB)
    start = max(0, (loud[0] - MARGIN_FRAMES) * FRAME)
    stop = min(len(x), (loud[-1] + 1 + MARGIN_FRAMES) * FRAME)
    y = x[start:stop].copy()
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, FADE))
    y[:FADE] *= ramp
    y[-FADE:] *= ramp[::-1]
    y *= PEAK / np.abs(y).max()
    return np.round(y * 32767.0).astype(np.int16)


def synthesise(voice: Voice, word: str, workdir: Path) -> np.ndarray:
    """Speak one word with one voice and return the cleaned clip.

    Args:
        voice: the synthetic speaker.
        word: the text to speak.
        workdir: a scratch directory for the WAV file.

    Returns:
        int16 array of shape (samples,) at 16 kHz.
    """
    out = workdir / "clip.wav"
    if voice.engine == "flite":
        cmd = ["flite", *voice.options, "-t", word, "-o", str(out)]
    else:
        cmd = ["espeak-ng", *voice.options, "-w", str(out), word]
    subprocess.run(cmd, check=True, capture_output=True)
    return clean(read_wav(out))


def pack(clips: list[np.ndarray], text: list[str], speaker: list[str], engine: list[str]) -> dict:
    """Lay clips out as the arrays stored in one .npz file (see the module docstring).

    Args:
        clips: N int16 arrays, each of shape (samples_i,).
        text, speaker, engine: N labels each.

    Returns:
        name -> array, ready for `write_npz`.
    """
    pcm_S = np.concatenate(clips)
    # First difference with int16 wrap-around: every step fits in 16 bits, and a cumulative sum
    # taken modulo 2**16 gives the samples back exactly.
    delta_S = np.diff(pcm_S, prepend=np.int16(0)).astype(np.int16)
    bytes_S2 = delta_S.astype("<i2").view(np.uint8).reshape(-1, 2)
    offsets = np.zeros(len(clips) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in clips])
    return {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "sample_rate": np.array(SAMPLE_RATE, dtype=np.int64),
        "offsets": offsets,
        "pcm_delta_lo": np.ascontiguousarray(bytes_S2[:, 0]),
        "pcm_delta_hi": np.ascontiguousarray(bytes_S2[:, 1]),
        "text": np.array(text, dtype=str),
        "speaker": np.array(speaker, dtype=str),
        "engine": np.array(engine, dtype=str),
    }


def build(out_dir: Path) -> list[Path]:
    """Synthesise the word set and convert the alsa-utils clips into `out_dir`.

    Args:
        out_dir: where speech_words.npz and speech_alsa.npz go.

    Returns:
        the two paths written.
    """
    for tool in ("flite", "espeak-ng"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y flite espeak-ng alsa-utils")
    missing = [s for s in ALSA_CLIPS if not (ALSA_DIR / f"{s}.wav").is_file()]
    if missing:
        raise SystemExit(f"alsa-utils clips missing under {ALSA_DIR}: {missing}")

    out_dir.mkdir(parents=True, exist_ok=True)
    clips, text, speaker, engine = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for voice in VOICES:
            for word in WORDS:
                clips.append(synthesise(voice, word, Path(tmp)))
                text.append(word)
                speaker.append(voice.name)
                engine.append(voice.engine)
    words_path = out_dir / "speech_words.npz"
    write_npz(words_path, pack(clips, text, speaker, engine), file_mode=None)

    real = [clean(read_wav(ALSA_DIR / f"{stem}.wav")) for stem in ALSA_CLIPS]
    n = len(real)
    alsa_path = out_dir / "speech_alsa.npz"
    write_npz(alsa_path, pack(real, list(ALSA_CLIPS.values()), ["alsa-utils"] * n, ["recorded"] * n), file_mode=None)

    for path, n_clips, samples in ((words_path, len(clips), clips), (alsa_path, n, real)):
        seconds = sum(len(c) for c in samples) / SAMPLE_RATE
        print(f"{path.name}: {n_clips} clips, {seconds:.1f} s, {path.stat().st_size / 1e6:.2f} MB")
    return [words_path, alsa_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temp dir and compare with the files in --out"
    )
    args = parser.parse_args()
    if not args.check:
        build(args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        differ = [p.name for p in fresh if (args.out / p.name).read_bytes() != p.read_bytes()]
    if differ:
        print(f"differ from {args.out}: {differ}")
        sys.exit(1)
    print(f"identical to the files in {args.out}")


if __name__ == "__main__":
    main()
