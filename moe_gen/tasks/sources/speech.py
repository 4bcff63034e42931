"""Small, real, offline speech sets for the built-in speech tasks (spoken-word ASR, TTS frames).

Two files are committed under ``moe_gen/tasks/data/``; ``scripts/make_speech_data.py`` made them once
from Debian packages, so loading needs numpy and the standard library only (no audio libraries, no
system packages, no pickles).

``load_spoken_words`` -- SYNTHESISED speech (``speech_words.npz``): the 18 words in `WORDS`
("zero".."nine", "yes", "no", "up", "down", "left", "right", "stop", "go"), each spoken once by 21
voices: 6 from flite (slt, rms, awb, kal16 and two pitch-shifted variants) and 15 from espeak-ng
(English accents x voice variants x speed x pitch). 378 clips, about 166 s.

``load_real_clips`` -- REAL RECORDINGS (``speech_alsa.npz``): the 8 channel-test clips that Debian's
alsa-utils installs ("front center", "front left", ..., "side right"), one human speaker, about 1.3 s
each. Too few to train on; useful to see how a model trained on synthetic words meets a real voice.

Every row is a dict (`SpeechRow`)::

    audio        float32 (samples,)  mono, 16 kHz, in [-1, 1); silence trimmed, peak about 0.89
    sample_rate  int                 16000
    text         str                 what is said, lower case ("seven", "front center")
    speaker      str                 the voice ("flite-slt", "espeak-en-gb-f3", "alsa-utils")
    engine       str                 "flite", "espeak-ng" or "recorded"
    synthetic    bool                False only for the real recordings
    id           str                 "<speaker>/<text>" with spaces as "_", unique within a file

Split rule (spoken words): by speaker, so that test measures generalisation to unheard voices. A
speaker is in ``"test"`` when ``zlib.crc32(speaker.encode()) % 4 == 1``, else in ``"train"``: a fixed
hash, stable when voices are added or removed. It puts flite-rms, flite-awb, espeak-en-rp-m1 and
espeak-en-caribbean-f2-fast (72 clips) in test and the other 17 voices (306 clips) in train; every word
appears in both, and both engines appear in both. The pitch-shifted flite variants stay on their base
voice's side; espeak-ng voices all come from one formant synthesiser, so they resemble one another more
than the flite voices do and test on them is the easier half.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "SPLITS",
    "WORDS",
    "SpeechRow",
    "load_real_clips",
    "load_spoken_words",
    "speaker_split",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
WORDS_FILE = "speech_words.npz"
REAL_FILE = "speech_alsa.npz"
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
SPLITS = ("train", "test", "all")
WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "stop", "go",
)  # fmt: skip


class SpeechRow(TypedDict):
    """One clip; see the module docstring for what each field holds."""

    audio: np.ndarray
    sample_rate: int
    text: str
    speaker: str
    engine: str
    synthetic: bool
    id: str


def speaker_split(speaker: str) -> str:
    """Which split a spoken-word speaker belongs to.

    Args:
        speaker: a speaker name such as "flite-slt".

    Returns:
        "test" or "train", by a fixed CRC-32 hash of the name (see the module docstring).
    """
    # CRC-32 rather than hash(): Python salts str hashes per process, CRC-32 is the same everywhere.
    return "test" if zlib.crc32(speaker.encode("utf-8")) % 4 == 1 else "train"


@functools.cache
def _read(file_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode one committed .npz file (layout in scripts/make_speech_data.py).

    Args:
        file_name: a file under moe_gen/tasks/data/.

    Returns:
        audio_S float32 (S,) all clips end to end, read-only; offsets int64 (N+1,), clip i is
        audio_S[offsets[i]:offsets[i+1]]; text, speaker, engine: str arrays of shape (N,).
    """
    path = DATA_DIR / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it is made by scripts/make_speech_data.py")
    with np.load(path, allow_pickle=False) as z:
        version, rate = int(z["format_version"]), int(z["sample_rate"])
        if version != FORMAT_VERSION or rate != SAMPLE_RATE:
            raise ValueError(
                f"{path}: format {version} at {rate} Hz, this loader reads format {FORMAT_VERSION} "
                f"at {SAMPLE_RATE} Hz; regenerate it with scripts/make_speech_data.py"
            )
        # The file holds the first difference of the int16 PCM, its low and high bytes apart (they
        # deflate better that way). Rejoin the bytes, then undo the difference with a cumulative sum;
        # the encoder let each difference wrap modulo 2**16, so the sum is taken in int64 and cast
        # back to int16, which wraps the same way and returns every sample exactly.
        delta_S = (z["pcm_delta_lo"].astype(np.uint16) | (z["pcm_delta_hi"].astype(np.uint16) << 8)).view(
            np.int16
        )
        pcm_S = np.cumsum(delta_S, dtype=np.int64).astype(np.int16)
        offsets = z["offsets"].astype(np.int64)
        text, speaker, engine = z["text"], z["speaker"], z["engine"]
    if offsets[0] != 0 or offsets[-1] != len(pcm_S) or not len(text) == len(speaker) == len(offsets) - 1:
        raise ValueError(f"{path}: offsets and labels do not match the audio; the file is damaged")
    audio_S = pcm_S.astype(np.float32) / np.float32(32768.0)  # int16 full scale -> [-1, 1)
    audio_S.flags.writeable = False  # cached and shared between calls: rows get copies
    return audio_S, offsets, text, speaker, engine


def _rows(file_name: str, keep: np.ndarray | None = None) -> list[SpeechRow]:
    """Turn the clips of one file into rows, in file order.

    Args:
        file_name: a file under moe_gen/tasks/data/.
        keep: optional bool mask of shape (N,) choosing clips.

    Returns:
        one `SpeechRow` per kept clip, its audio a fresh float32 array of shape (samples,).
    """
    audio_S, offsets, text, speaker, engine = _read(file_name)
    rows: list[SpeechRow] = []
    for i in range(len(text)):
        if keep is not None and not keep[i]:
            continue
        rows.append(
            SpeechRow(
                audio=audio_S[offsets[i] : offsets[i + 1]].copy(),
                sample_rate=SAMPLE_RATE,
                text=str(text[i]),
                speaker=str(speaker[i]),
                engine=str(engine[i]),
                synthetic=str(engine[i]) != "recorded",
                id=f"{speaker[i]}/{text[i]}".replace(" ", "_"),
            )
        )
    return rows


def load_spoken_words(split: str = "train", words: Sequence[str] | None = None) -> list[SpeechRow]:
    """Synthesised spoken words (flite and espeak-ng voices), split by speaker.

    Args:
        split: "train", "test" or "all"; the rule is in the module docstring.
        words: keep only these words (each must be in `WORDS`); None keeps all 18.

    Returns:
        rows ordered by speaker, then by word as in `WORDS`; each audio float32 (samples,) at 16 kHz.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if words is not None:
        unknown = sorted(set(words) - set(WORDS))
        if unknown:
            raise ValueError(f"unknown words {unknown}; known words: {', '.join(WORDS)}")
    _, _, text, speaker, _ = _read(WORDS_FILE)
    keep = np.ones(len(text), dtype=bool)
    if split != "all":
        keep &= np.array([speaker_split(str(s)) == split for s in speaker], dtype=bool)
    if words is not None:
        keep &= np.isin(text, list(words))
    return _rows(WORDS_FILE, keep)


def load_real_clips() -> list[SpeechRow]:
    """Real recordings: the 8 spoken channel names that alsa-utils ships, one human speaker.

    Returns:
        8 rows ("front center", "front left", "front right", "rear center", "rear left",
        "rear right", "side left", "side right"), speaker "alsa-utils", engine "recorded",
        synthetic False; each audio float32 (samples,) at 16 kHz, about 1.3 s.
    """
    return _rows(REAL_FILE)
