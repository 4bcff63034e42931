"""The docstring_summary preset: standard-library docstrings whose first line summarises the rest,
scored by ROUGE-L, BLEU and chrF."""

import difflib
import glob
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset, preset_info
from moe_gen.tasks.metrics import compute
from moe_gen.tasks.sources import docstrings
from moe_gen.tasks.sources.docstrings import docstring_rows, split_docstring


def test_rows_are_docstrings_split_at_their_summary_line():
    rows = {r["name"]: r for r in docstring_rows("all")}
    head, _, rest = inspect.getdoc(glob.glob).partition("\n\n")
    assert rows["glob.glob"]["summary"] == head == "Return a list of paths matching a pathname pattern."
    assert rows["glob.glob"]["document"] == " ".join(rest.split())
    assert rows["glob.glob"]["document"].startswith("The pattern may contain simple shell-style wildcards")
    # str, bytes and bytearray share a docstring but for the type's name: one row of them (the first seen)
    assert "builtins.bytearray.removesuffix" in rows and "builtins.str.removesuffix" not in rows
    assert len({r["document"] for r in rows.values()}) == len(rows)
    if sys.version_info[:2] == (3, 11):  # the rows follow the interpreter's docstrings
        assert len(rows) == 625 and len(docstring_rows("train")) == 500 and len(docstring_rows("test")) == 125
        # and the preset's description and the source's docstring say so (they said 682, a count from
        # before a docstring met on another object or string type was left out, then 652, from before
        # a near copy was, then 643, from before near copies were also compared word by word)
        assert "625 rows on CPython 3.11" in preset_info("docstring_summary").source
        assert "CPython 3.11: 625 rows, 500 train / 125 test" in docstrings.__doc__


def test_splits_are_disjoint_and_deterministic():
    train, test = docstring_rows("train"), docstring_rows("test")
    assert docstring_rows("test") == test and len(test) == (len(train) + len(test) + 4) // 5
    assert not {r["summary"] for r in train} & {r["summary"] for r in test}
    assert not {r["document"] for r in train} & {r["document"] for r in test}  # 5 shared before 2026-12-05
    assert not {r["name"] for r in train} & {r["name"] for r in test}
    for row in train + test:
        assert row["summary"][0].isupper() and row["summary"].endswith(".") and len(row["document"].split()) >= 10
    with pytest.raises(ValueError, match="unknown split"):
        docstring_rows("dev")


def test_no_held_out_document_is_a_near_copy_of_a_training_one():
    """bytes.removeprefix ("a bytes object") was held out beside bytearray.removeprefix ("a
    bytearray"), and mimetypes.guess_type beside mimetypes.MimeTypes.guess_type (99.5% alike)."""
    type_words = re.compile(r"\b(?:str|strings?|bytes|bytearray|unicode)(?:\s+objects?)?\b")
    train, test = [[type_words.sub("T", r["document"].lower()) for r in docstring_rows(split)]
                   for split in ("train", "test")]
    for document in test:
        for other in train:
            if 2 * min(len(document), len(other)) < 0.98 * (len(document) + len(other)):
                continue  # (difflib's ratio is at most this)
            assert difflib.SequenceMatcher(None, other, document, autojunk=False).ratio() < 0.98, (document, other)
    names = {r["name"] for r in docstring_rows("test")}
    assert not {"builtins.bytes.removeprefix", "mimetypes.guess_type"} & names
    # word by word too: a name swapped stayed under 98% letter by letter (PurePosixPath beside
    # PureWindowsPath, 0.962; bz2.open beside gzip.open, 0.974; fourteenth session's split audit)
    train_words = [d.split() for d in train]
    for document in test:
        words = document.split()
        for other in train_words:
            if 2 * min(len(words), len(other)) >= 0.9 * (len(words) + len(other)):
                assert difflib.SequenceMatcher(None, other, words, autojunk=False).ratio() < 0.9, (document, other)
    pairs = [("pathlib.PurePosixPath", "pathlib.PureWindowsPath"), ("bz2.open", "gzip.open"),
             ("builtins.bytearray.hex", "builtins.memoryview.hex")]
    every = {r["name"] for r in docstring_rows("all")}
    assert not [pair for pair in pairs if set(pair) <= every]  # one of each pair at most, in either split


def test_only_docstrings_that_open_with_a_summary_line_count():
    assert split_docstring("Do a thing well.\n\n" + "word " * 12) == ("Do a thing well.", ("word " * 12).strip())
    assert split_docstring("Do a thing well.") is None  # nothing to summarise
    assert split_docstring("f(x, y)\n\n" + "word " * 12) is None  # a signature, not a sentence
    assert split_docstring("Two lines of\nsummary.\n\n" + "word " * 12) is None
    assert split_docstring(None) is None


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    scores = compute(("rouge_l",), ["the cat sat on the mat", "", "Return a list."],
                     ["the cat was on the mat", "anything", "return a LIST"])
    assert scores["rouge_l"] == pytest.approx(100 * (5 / 6 + 0 + 1) / 3)  # LCS 5 of 6 and 6 words; empty: 0


def test_rouge_l_weighs_precision_and_recall_alike():
    # LCS 2 of a 2-word and a 6-word text: P = 1, R = 1/3 (or the other way round), F1 = 2·2 / (2 + 6)
    short, long = "The cat", "the cat sat on the mat"
    assert compute(("rouge_l",), [short], [long])["rouge_l"] == pytest.approx(50.0)
    assert compute(("rouge_l",), [long], [short])["rouge_l"] == pytest.approx(50.0)


def test_the_preset_encodes_and_bad_rows_are_task_data_errors():
    info = preset_info("docstring_summary")
    assert info.metrics == ("rouge_l", "bleu", "chrf") and "3.11" in info.source and "PSF" in info.licence
    tok = Tokenizer.default()
    task = load_preset("docstring_summary", "test", limit=3)
    assert task.encode(0, tok) is not None
    bad = Task("docstring_summary", info.instruction, [{"document": ["not", "text"], "summary": "A summary."}])
    with pytest.raises(TaskDataError, match="document"):
        bad.encode(0, tok)


def test_rows_are_the_same_on_every_call_and_every_hash_seed():
    script = "import json; from moe_gen.tasks.sources.docstrings import _rows; print(json.dumps(_rows()))"
    env = {**os.environ, "PYTHONHASHSEED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == [list(row) for row in docstrings._rows.__wrapped__()]


def test_a_summary_line_has_three_to_twenty_words():
    rest = "\n\n" + "word " * 12
    for n, kept in ((2, False), (3, True), (20, True), (21, False)):
        head = " ".join(["Do"] + ["thing"] * (n - 2) + ["well."])
        assert (split_docstring(head + rest) is not None) == kept, n
    assert split_docstring("Do a thing well.\n\n" + "word " * 9) is None  # a document of 10 words at least


def test_a_near_copy_is_at_least_as_alike_as_the_bounds():
    """98% alike letter by letter (49 of 50 letters) or 90% word by word (9 of 10 words) is a near copy."""
    assert docstrings._near_copy("x" * 49 + "a", ["x" * 49 + "b"])
    assert not docstrings._near_copy("x" * 48 + "aa", ["x" * 48 + "bb"])
    words = "one two three four five six seven eight nine ten".split()
    assert docstrings._near_copy(" ".join(words), [" ".join(words[:9] + ["elephantine"])])  # letters: 0.90
    assert not docstrings._near_copy(" ".join(words), [" ".join(words[:8] + ["elephantine", "hippopotamus"])])


def test_the_test_split_is_every_fifth_row_from_the_first_and_all_is_in_walking_order():
    every = docstring_rows("all")
    assert [r["id"] for r in every] == [f"docstring/{i}" for i in range(len(every))]
    assert docstring_rows("test") == every[::5]
    assert docstring_rows("train") == [r for i, r in enumerate(every) if i % 5]
