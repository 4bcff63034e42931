"""Fuzzing ``Task.encode``: random values of every Python and NumPy kind, in every modality's slot
(encoder, decoder and repetition-group sides), come out as a clean sample or a ``TaskDataError``
naming the task, nothing else (issue 13).

The default run draws a fixed set of examples (conftest's ``ci`` profile is derandomized), a few
per instruction; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones, 15 times as many. To count cases
and time them, run this file as a script (one case is one row encoded):

    HYPOTHESIS_PROFILE=explore HF_HUB_OFFLINE=1 .venv/bin/python tests/test_fuzz_encode.py --examples 150

which prints ``N cases (clean encodes, TaskDataErrors), 0 other exceptions, slowest X s`` and exits
non-zero when another exception came out or a case took longer than ``--max-seconds`` (2).
"""

from __future__ import annotations

import functools
import io
import os
import re
import sys
import time
import wave
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as nps
from PIL import Image

from moe_gen.registry import MODALITIES
from moe_gen.tasks import Sample, Task, TaskDataError, Tokenizer
from moe_gen.tasks.modalities.base import brief
from moe_gen.tasks.plan import MAX_SLOT_POSITIONS

# Strategies holding media blobs and arrays have long reprs, which hypothesis warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
EXAMPLES = 150 if EXPLORE else 10  # per instruction, each of 1 to 3 rows

# Every registered modality as an encoder input, a decoder target and a repetition group's item;
# then the attributes and preprocessors that take other paths.
INSTRUCTIONS = [form.format(m) for m in MODALITIES.list()
                for form in ("[IMAGE:img] [{}:x] -> [TEXT:y]", "[IMAGE:img] -> [{}:x]",
                             "[IMAGE:img] -> ( [{}:x] [TEXT:y] )*")] + [
    "[TEXT:x,max_length=8,mask_ratio=0.5,noise_ratio=0.3,uncased,no_punctuation] -> [TEXT:y]",
    "[TEXT:y] -> [TEXT:x,closed_set]",
    "[STRUCT:x,preprocess=struct_text] -> [TEXT:y]",
    "[TEXT:x,preprocess=bag_of_words,vocab_size=16] -> [TEXT:y]",
    "[IMAGE:x,mask_ratio=0.5] -> [TEXT:y]",
    "[MOTION:x,sample_rate=2,max_length=4] -> [TEXT:y]",
    "[MOTION:x,preprocess=pose_summary,sample_rate=2,max_length=4] -> [TEXT:y]",
    "[TEXT:y] -> [AUDIO:x,adaptor=audio_tgt_fbank]",
]
GOOD_IMAGE = np.full((8, 8, 3), 128, np.uint8)


def _png(size=(4, 4), mode="RGB", fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 7).save(out, format=fmt)
    return out.getvalue()


def _wav(seconds=0.05, rate=8000, width=2, channels=1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(bytes(int(seconds * rate) * width * channels))
    return out.getvalue()


def _mp4() -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


MEDIA = [_png(), _png((1, 1), "L"), _png((3, 2), "RGBA"), _png(fmt="JPEG"), _png(fmt="GIF", mode="P"), _wav(),
         _wav(width=1, channels=2), _wav(rate=1), _wav(rate=44101, width=4), _wav(seconds=0), _mp4()]

# ---- values of every kind ---------------------------------------------------------------------------

# 10**5000 has too many digits for str() (and for hypothesis to print it): built, not listed
HUGE_INTS = st.one_of(st.sampled_from([2**63, -(2**64), 10**400]), st.integers(4400, 5000).map(lambda n: -(10**n)))
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=30),  # lone surrogates included
    st.sampled_from(["", " ", "a\ud800b", "\udfff", "\x00", "nan", "inf", "-1e400", "16k", "1234", "0,0,4,4",
                     ".", "/", "x" * 3000, "word " * 900]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), st.floats(width=32), st.complex_numbers(),
    TEXT, st.binary(max_size=40), st.sampled_from(MEDIA),
    st.builds(lambda blob, cut: blob[:cut], st.sampled_from(MEDIA), st.integers(0, 200)),  # truncated media
    nps.from_dtype(np.dtype("float64")), nps.from_dtype(np.dtype("int8")), nps.from_dtype(np.dtype("uint64")),
    nps.from_dtype(np.dtype("bool")), nps.from_dtype(np.dtype("U5")), nps.from_dtype(np.dtype("S5")),
    nps.from_dtype(np.dtype("datetime64[s]")), nps.from_dtype(np.dtype("complex64")),
    st.sampled_from([object(), Ellipsis, range(4), {1, 2, 3, 4}, frozenset(), type, np.float64, print]),
)
KEYS = st.one_of(st.text(max_size=4), st.integers(-3, 3), st.none(), st.booleans(), HUGE_INTS, st.floats())
NESTED = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.tuples(inner, inner),
    st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)

DTYPES = st.one_of(nps.scalar_dtypes(), nps.unicode_string_dtypes(max_len=4), nps.byte_string_dtypes(max_len=4),
                   st.just(np.dtype(object)), st.just(np.dtype("float16")))


def _arrays(shape, dtypes=DTYPES):
    return dtypes.flatmap(lambda dtype: nps.arrays(
        dtype, shape, elements=SCALARS if dtype == np.dtype(object) else None))


FLOATS = st.sampled_from([np.float16, np.float32, np.float64])
ARRAYS = st.one_of(
    _arrays(nps.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    # media-shaped: images, videos, waveforms, motion clips, with any numbers in them
    _arrays(st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 3, 4])),
            st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.float16])),
    _arrays(st.tuples(st.integers(0, 4), st.integers(0, 12), st.integers(0, 12), st.just(3)),
            st.sampled_from([np.uint8, np.float32, np.int16])),
    _arrays(st.tuples(st.integers(0, 3000)), FLOATS),
    _arrays(st.tuples(st.integers(1, 3), st.integers(0, 800)), FLOATS),
    _arrays(st.tuples(st.integers(0, 12), st.integers(0, 6)), FLOATS),
    st.builds(lambda n, scale: (np.sin(np.arange(n) / 3.0) * scale).astype(np.float32),
              st.integers(0, 3000), st.sampled_from([0.0, 1e-30, 1.0, 3e4, 1e20, 3e38])),
)
TENSORS = st.builds(
    lambda array, dtype: torch.from_numpy(np.ascontiguousarray(array)).to(dtype),
    _arrays(nps.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=8), st.just(np.float32)),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8,
                     torch.bool, torch.complex64]))
PIL_IMAGES = st.builds(Image.new, st.sampled_from(["RGB", "L", "1", "P", "RGBA", "I", "F", "I;16", "CMYK", "LA"]),
                       st.tuples(st.integers(0, 20), st.integers(0, 20)))
# The forms slots are documented to take, with random contents: HF audio dicts, tables, boxes.
SHAPED = st.one_of(
    st.fixed_dictionaries({"array": st.one_of(ARRAYS, NESTED)},
                          optional={"sampling_rate": st.one_of(SCALARS, st.integers(1, 400_000))}),
    st.lists(st.dictionaries(KEYS, SCALARS, max_size=4), max_size=4),  # a table of rows
    st.dictionaries(st.text(max_size=3), st.one_of(st.lists(SCALARS, max_size=3), ARRAYS), max_size=4),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=5),  # a one-row table
    st.lists(st.one_of(st.integers(-5, 50), st.floats(), HUGE_INTS), min_size=3, max_size=5),  # box-like
)
# Values each modality takes, so that about half the cases go past the checks into the preprocessing.
UNIT = st.floats(-1, 1, width=32)
CELLS = st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none(), st.booleans())
TEXTS = st.one_of(st.text(max_size=40), st.integers(-100, 100), st.floats(-10, 10))
FITTING = {
    "TEXT": TEXTS, "CATEGORY": TEXTS, "PHONE": TEXTS,
    "BOX": st.lists(st.one_of(st.integers(-2, 10), st.floats(-2, 10)), min_size=4, max_size=4),  # 8x8 images
    "IMAGE": st.one_of(
        nps.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]))),
        nps.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.floats(0, 1, width=32)),
        st.sampled_from(MEDIA[:5])),
    "VIDEO": st.one_of(
        nps.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12), st.just(3))),
        st.just(MEDIA[-1])),
    "AUDIO": st.one_of(
        nps.arrays(np.float32, st.integers(1, 3000), elements=UNIT), st.lists(UNIT, min_size=1, max_size=400),
        nps.arrays(np.float64, st.tuples(st.integers(1, 2), st.integers(1, 800)), elements=UNIT),
        st.fixed_dictionaries({"array": nps.arrays(np.float32, st.integers(1, 1000), elements=UNIT),
                               "sampling_rate": st.one_of(st.integers(1000, 384_000), st.sampled_from([8000, 44100]))}),
        st.sampled_from(MEDIA[5:10])),
    "MOTION": nps.arrays(np.float64, st.tuples(st.integers(1, 12), st.just(3)), elements=st.floats(-1e3, 1e3)),
    "STRUCT": st.one_of(
        st.lists(st.dictionaries(st.sampled_from("abc"), CELLS, max_size=3), min_size=1, max_size=4),
        st.integers(1, 4).flatmap(lambda n: st.dictionaries(
            st.sampled_from("abc"), st.lists(CELLS, min_size=n, max_size=n), min_size=1)),
        st.dictionaries(st.sampled_from("abc"), CELLS, min_size=1)),
}
VALUES = st.one_of(SCALARS, NESTED, ARRAYS, TENSORS, PIL_IMAGES, SHAPED)
SAMPLE_RATES = st.one_of(st.integers(1000, 384_000), st.sampled_from([8000, 16000, 22050, 44100]), VALUES)
OPTIONAL = {"sample_rate": SAMPLE_RATES, "width": st.one_of(st.integers(1, 20), VALUES),
            "height": st.one_of(st.integers(1, 20), VALUES)}


@functools.cache
def rows_for(instruction: str):
    """Lists of 1 to 3 rows for ``instruction``: column x holds a value its slot takes or anything
    (a list of them in a repetition group), the other columns good values."""
    modality = re.search(r"\[(\w+):x", instruction).group(1)
    value = st.one_of(FITTING.get(modality, VALUES), VALUES)
    if "( [" in instruction:
        value = st.one_of(st.lists(value, max_size=3), VALUES)
    row = st.fixed_dictionaries({"x": value, "y": st.just("a caption"), "img": st.just(GOOD_IMAGE)},
                                optional=OPTIONAL)
    return st.lists(row, min_size=1, max_size=3)


# Rows with every column fuzzed, and rows that are not dicts.
WILD_ROWS = st.fixed_dictionaries({"x": VALUES, "y": VALUES, "img": VALUES}, optional=OPTIONAL)

# ---- one case: a row encoded ------------------------------------------------------------------------

OUTCOMES: Counter = Counter()
MESSAGES: Counter = Counter()  # what the TaskDataErrors say, without task, column and row
SLOWEST: list = [0.0, ""]


def check_task(instruction: str, rows: list, training: bool, on_error: str, tok: Tokenizer) -> None:
    """Encodes every row of a task over ``rows``: each gives a clean sample or a ``TaskDataError``
    naming the task (any other exception propagates and fails the test)."""
    task = Task("fuzz", instruction, rows, on_error=on_error)
    for i in range(len(rows)):
        start = time.perf_counter()
        try:
            sample = task.encode(i, tok, training=training)
        except TaskDataError as exc:
            assert str(exc).startswith("task 'fuzz'"), str(exc)
            OUTCOMES["TaskDataError"] += 1
            MESSAGES[str(exc).split(": ", 1)[-1][:50]] += 1
        else:
            if sample is None:
                assert on_error == "skip" and task.errors[-1].startswith("task 'fuzz'")
                OUTCOMES["TaskDataError"] += 1
            else:
                assert isinstance(sample, Sample)
                for chunk in sample.encoder + sample.decoder:
                    assert len(chunk) <= MAX_SLOT_POSITIONS or chunk.column is None
                    assert chunk.rows is None or bool(torch.isfinite(chunk.rows).all())
                OUTCOMES["clean"] += 1
        elapsed = time.perf_counter() - start
        if elapsed > SLOWEST[0]:
            SLOWEST[:] = [elapsed, f"{instruction} | row {i} | x = {_describe(rows[i])}"]


def _describe(row) -> str:
    if not isinstance(row, dict):
        return brief(row, 120)
    x = row.get("x")
    shape = f" {getattr(x, 'dtype', '')}{tuple(getattr(x, 'shape', ()))}" if hasattr(x, "shape") else ""
    return f"{type(x).__name__}{shape} {brief(x, 80)}" + (
        f", sample_rate {brief(row['sample_rate'])}" if "sample_rate" in row else "")


FUZZ = settings(max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tok = Tokenizer.default()
    Task("warm", "[PHONE:x] -> [TEXT:y]", [{"x": "warm up", "y": "a"}]).encode(0, tok)  # loads the CMU dictionary
    return tok


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
@FUZZ
@given(data=st.data(), training=st.booleans(), on_error=st.sampled_from(["raise", "skip"]))
def test_every_value_in_every_slot_encodes_or_is_a_task_data_error(instruction, data, training, on_error, tok):
    check_task(instruction, data.draw(rows_for(instruction), label="rows"), training, on_error, tok)


ROW_INSTRUCTIONS = ["[IMAGE] [TEXT] -> [TEXT]", "[IMAGE:img] [AUDIO:x] -> [TEXT:y]", "[IMAGE:img] -> [BOX:x]",
                    "[TEXT:y] -> [CATEGORY:x]"]
ANY_ROWS = st.lists(st.one_of(VALUES, WILD_ROWS), min_size=1, max_size=3)


@pytest.mark.parametrize("instruction", ROW_INSTRUCTIONS)
@FUZZ
@given(rows=ANY_ROWS, training=st.booleans())
def test_rows_of_any_kind_encode_or_are_task_data_errors(instruction, rows, training, tok):
    """Whole rows of any kind: dicts by column, sequences for slots without columns, and neither."""
    check_task(instruction, rows, training, "raise", tok)


def _fuzz(instruction, tok):
    @given(rows=rows_for(instruction), training=st.booleans(), on_error=st.sampled_from(["raise", "skip"]))
    def fuzz(rows, training, on_error):
        check_task(instruction, rows, training, on_error, tok)

    return fuzz


def _fuzz_rows(instruction, tok):
    @given(rows=ANY_ROWS, training=st.booleans())
    def fuzz(rows, training):
        check_task(instruction, rows, training, "raise", tok)

    return fuzz


def main(argv=None) -> int:
    """Runs the fuzz tests with ``--examples`` per instruction and prints the counts."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=EXAMPLES, help="examples per instruction")
    parser.add_argument("--messages", type=int, default=0, help="print the N most common TaskDataError messages")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="the longest one case may take")
    args = parser.parse_args(argv)
    tok = Tokenizer.default()
    Task("warm", "[PHONE:x] -> [TEXT:y]", [{"x": "warm up", "y": "a"}]).encode(0, tok)
    run = settings(max_examples=args.examples, suppress_health_check=list(HealthCheck), deadline=None,
                   derandomize=not EXPLORE)
    start = time.perf_counter()
    failures = 0
    cases = [(i, _fuzz(i, tok)) for i in INSTRUCTIONS] + [(i, _fuzz_rows(i, tok)) for i in ROW_INSTRUCTIONS]
    for instruction, test in cases:
        try:
            run(test)()
        except Exception as exc:  # hypothesis stops an instruction at its first other exception, shrunk
            failures += 1
            notes = "\n".join(getattr(exc, "__notes__", ()))
            print(f"FAILED {instruction}: {type(exc).__name__}: {exc}\n{notes}", file=sys.stderr)
        print(f"{instruction}: {sum(OUTCOMES.values())} cases so far", file=sys.stderr)
    total = sum(OUTCOMES.values())
    print(f"{total} cases ({OUTCOMES['clean']} clean encodes, {OUTCOMES['TaskDataError']} TaskDataErrors), "
          f"{failures} other exceptions, slowest {SLOWEST[0]:.2f} s ({SLOWEST[1]}); "
          f"{len(cases)} instructions x {args.examples} examples in {time.perf_counter() - start:.0f} s "
          f"({'explore: fresh examples' if EXPLORE else 'derandomized'})")
    for message, count in MESSAGES.most_common(args.messages):
        print(f"{count:6d}  {message}")
    return 1 if failures or SLOWEST[0] > args.max_seconds else 0


if __name__ == "__main__":
    sys.exit(main())
