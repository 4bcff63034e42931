"""Documents with their one-line summaries from the Python standard library's docstrings, for the
``docstring_summary`` preset (summarisation / headline generation).

A fixed list of 102 stdlib modules (``MODULES``) is imported and walked in sorted order: each public
function, class and method defined in the module (and each of its classes' public methods, C
functions included). A docstring gives a row when it follows the convention of PEP 257: a first
line that summarises (one line, 3-20 words, capitalised, ending in a full stop), a blank line, then
the rest (at least 10 words), which is the ``document`` (white space collapsed); the first line is
its ``summary``. A docstring whose summary or document was seen before (type names aside: ``str``,
``bytes``, ``bytearray``), or whose document is at least 98% like one seen before letter by letter
or 90% word by word, is skipped, so every summary is in one row only and no held-out document is a
near copy of a training one.

The rows come from the running interpreter's own docstrings, so they depend on the Python version
(the counts in the docs are for CPython 3.11: 625 rows, 500 train / 125 test); modules whose
contents depend on the platform (``os``, ``signal``, ``ssl``) are left out, and so is ``sys``, whose
hooks programs replace at run time (pytest replaces ``sys.unraisablehook``). Every 5th row in walking order is ``test``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import warnings

__all__ = ["MODULES", "docstring_rows", "split_docstring", "SPLITS"]

SPLITS = ("train", "test", "all")
MODULES = tuple("""abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar cmath codecs
collections colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis email.message
enum filecmp fnmatch fractions ftplib functools gettext glob gzip hashlib heapq hmac html html.parser
http.client http.cookies imaplib inspect io ipaddress itertools json logging lzma mailbox math mimetypes netrc
numbers operator optparse pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re
sched secrets shelve shlex shutil smtplib socket sqlite3 statistics string struct subprocess tarfile
tempfile textwrap threading time timeit tokenize trace traceback types typing unittest urllib.parse
urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo""".split())


def split_docstring(doc) -> tuple[str, str] | None:
    """``(summary, document)`` of a docstring that opens with a one-line summary, else None."""
    if not isinstance(doc, str):
        return None
    head, sep, rest = inspect.cleandoc(doc).partition("\n\n")
    words = head.split()
    document = " ".join(rest.split())
    if not sep or "\n" in head or not 3 <= len(words) <= 20 or len(document.split()) < 10:
        return None
    if not (head[0].isupper() and head.endswith(".")):
        return None
    return head, document


def _members(module):
    """``(qualified name, object)`` of the module's public functions, classes and their methods."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        owner = getattr(obj, "__module__", None)
        if owner != module.__name__ and not (inspect.isbuiltin(obj) and owner is None):
            continue  # imported from elsewhere
        if inspect.isroutine(obj) or inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, method in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isroutine(method):
                    yield f"{module.__name__}.{name}.{attr}", method


# str, bytes and bytearray methods share their docstrings but for the type's name ("a bytes object"
# where bytearray's says "a bytearray")
_TYPE_WORDS = re.compile(r"\b(?:str|strings?|bytes|bytearray|unicode)(?:\s+objects?)?\b")
NEAR_COPY = 0.98  # a document at least this similar (difflib's ratio, type names aside) to a kept one is left out
NEAR_COPY_WORDS = 0.90  # ... or with at least this share of its words in common, in order (a name swapped)


def _typeless(text: str) -> str:
    return _TYPE_WORDS.sub("T", text.lower())


def _near_copy(text: str, kept: list[str]) -> bool:
    """Whether ``text`` is a near copy of a ``kept`` document: at least ``NEAR_COPY`` similar letter
    by letter, or ``NEAR_COPY_WORDS`` word by word (before the fourteenth audit letters only, and
    documents with a short name swapped stayed under 98%: ``PurePosixPath`` beside
    ``PureWindowsPath``, ``bz2.open`` beside ``gzip.open``, 0.96-0.97). difflib's own upper bounds
    (``real_quick_ratio``: lengths, ``quick_ratio``: counts) pass over the documents that cannot
    be, so the full ratio is computed for the few alike in size and make-up only."""
    letters, words = (difflib.SequenceMatcher(None, autojunk=False) for _ in range(2))
    letters.set_seq2(text)  # (the side difflib indexes, once for every kept document)
    words.set_seq2(text.split())
    for document in kept:
        for matcher, seq, bound in ((letters, document, NEAR_COPY), (words, document.split(), NEAR_COPY_WORDS)):
            matcher.set_seq1(seq)
            if matcher.real_quick_ratio() >= bound and matcher.quick_ratio() >= bound and matcher.ratio() >= bound:
                return True
    return False


@functools.lru_cache(maxsize=1)
def _rows() -> tuple[tuple[str, str, str], ...]:
    """One row per docstring: a summary or a document met before (the same docstring on another
    object, or on another string type's method), or a document at least ``NEAR_COPY`` similar to
    one met before, is left out, so no held-out document is a (near) copy of a training one. Before
    2026-12-05's eighth session only summaries were compared: 5 of 137 held-out documents were
    training documents word for word, ``bytes.splitlines`` beside ``str.splitlines``; before the
    thirteenth audit documents were compared as written: ``bytes.removeprefix`` ("a bytes object")
    was held out beside ``bytearray.removeprefix`` ("a bytearray"), and ``mimetypes.guess_type``
    beside ``mimetypes.MimeTypes.guess_type``, 99.5% alike."""
    seen, kept, out = set(), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading some members (typing.io, ...) warns of deprecation
        for module_name in MODULES:
            for qualname, obj in _members(importlib.import_module(module_name)):
                parts = split_docstring(getattr(obj, "__doc__", None))
                if not parts:
                    continue
                document = _typeless(parts[1])
                keys = {("summary", parts[0]), ("document", document), ("typeless", _typeless(parts[0]))}
                if not keys & seen and not _near_copy(document, kept):
                    seen |= keys
                    kept.append(document)
                    out.append((qualname, *parts))
    return tuple(out)


def docstring_rows(split: str = "train") -> list[dict]:
    """Rows ``{"document", "summary", "name", "id"}`` (``name``: the documented object, e.g.
    ``glob.glob``); every 5th is ``test``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return [{"document": document, "summary": summary, "name": name, "id": f"docstring/{i}"}
            for i, (name, summary, document) in enumerate(_rows())
            if split == "all" or (i % 5 == 0) == (split == "test")]
