"""Real dialog text from ``chatterbot-corpus`` (a dependency of moe_gen; BSD-3-Clause), for two presets.

``reply_matching`` (GLUE-like pair classification) reads the English part: 21 YAML files under
``chatterbot_corpus/data/english``, 2,025 dialogs of two or more turns (greetings, trivia, technical
support, ...). Every two consecutive turns ``(A, B)`` of a dialog are a pair whose ``B`` answers
``A``; repeated pairs count once (1,176 distinct pairs, 1,015 distinct first turns).
Each pair gives two rows with the same first sentence: the real reply (``answer`` "yes") and a reply
taken from another pair of the same split that is not a reply to that first sentence anywhere in
the corpus ("no"), chosen by ``random.Random(seed + pair index)``. The first sentence alone therefore
never tells the answer. Splits go by first sentence: the pairs of every 5th distinct first sentence
(in file order) are ``test``, so a test question was never seen in training, and negatives are drawn
within each split.

``language_identification`` reads the turns of ten languages written in the Latin alphabet
(``LANGUAGES``; the corpus's dialogs are largely translations of one another, so the languages talk
about the same things): per language its first ``PER_LANGUAGE`` distinct turns in file order, leaving
out turns that occur in another language's dialogs too (names, numbers, "AI"). Every 5th of those
(in that order) is ``test``; a test turn never occurs in training. Labels are the corpus's folder
names.
"""

from __future__ import annotations

import functools
import random
import re
import types
import unicodedata
from pathlib import Path
from typing import Mapping

__all__ = ["dialog_pairs", "reply_rows", "language_turns", "language_rows", "LANGUAGES", "PER_LANGUAGE", "SPLITS"]

SPLITS = ("train", "test", "all")
_INSTALL = "pip install chatterbot-corpus==1.3.3"


LANGUAGES = ("dutch", "english", "french", "german", "indonesian", "italian", "portuguese", "spanish", "swedish",
             "turkish")
PER_LANGUAGE = 300  # turns kept per language (French has 138 distinct ones in all)


def _corpus_dir(language: str = "english") -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise ModuleNotFoundError(f"the reply_matching and language_identification presets read the "
                                  f"chatterbot-corpus package; install it with `{_INSTALL}`") from None
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / language


@functools.cache
def _dialogs(language: str) -> tuple[tuple[str, ...], ...]:
    """Every dialog (its turns as one-line strings) of one language folder, in file order."""
    import yaml

    files = sorted(_corpus_dir(language).glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no dialogs under {_corpus_dir(language)}; reinstall with `{_INSTALL}`")
    dialogs = []
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for dialog in data.get("conversations") or []:
            if isinstance(dialog, list):  # one entry of trivia.yml is a lone string, not a dialog
                dialogs.append(tuple(_turns(dialog)))
    return tuple(dialogs)


def _turns(dialog) -> list[str]:
    """A dialog's turns as one-line strings (YAML may read a turn as a number: kept as its text)."""
    return [" ".join(str(turn).split()) for turn in dialog if turn is not None and str(turn).strip()]


@functools.lru_cache(maxsize=1)
def dialog_pairs() -> tuple[tuple[str, str], ...]:
    """Distinct ``(turn, next turn)`` pairs of the English dialogs, in file and dialog order."""
    pairs: dict[tuple[str, str], None] = {}
    for turns in _dialogs("english"):
        pairs.update(dict.fromkeys(zip(turns, turns[1:])))
    return tuple(pairs)


def reply_rows(split: str = "train", seed: int = 0) -> list[dict]:
    """Rows ``{"first", "second", "answer", "id"}``: two per pair (``answer`` "yes" for the real
    reply, then "no" for a reply drawn from another pair of the split); see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    pairs = dialog_pairs()
    firsts = list(dict.fromkeys(turn_key(first) for first, _ in pairs))  # "Yes." and "Yes?" on one side
    test_firsts = set(firsts[::5])
    replies_of: dict[str, set[str]] = {}
    for first, second in pairs:
        replies_of.setdefault(first, set()).add(second)
    rows = []
    for part in ("train", "test") if split == "all" else (split,):
        kept = [(i, first, second) for i, (first, second) in enumerate(pairs)
                if (turn_key(first) in test_firsts) == (part == "test")]
        pool = sorted({second for _, _, second in kept})
        for i, first, second in kept:
            rng = random.Random(seed * 100003 + i)
            other = rng.choice(pool)
            while other in replies_of[first]:
                other = rng.choice(pool)
            rows += [{"first": first, "second": second, "answer": "yes", "id": f"dialog/{i}/yes"},
                     {"first": first, "second": other, "answer": "no", "id": f"dialog/{i}/no"}]
    return rows


def turn_key(text: str) -> str:
    """What turns that are "the same" share: case, punctuation, apostrophes' shape and spacing
    aside ("Comment vas-tu ?" and "Comment vas-tu?", "Hola!" and "Hola"): splits and languages are
    kept apart by it (before 2026-12-05's eighth session by the exact text: 12 of 500 held-out
    language-identification turns were training turns but for such marks)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def unaccented_key(text: str) -> str:
    """``turn_key`` with accents aside too ("Voie Lactee" and "Voie Lactée"): turns of one language
    typed with and without accents are one turn (two held-out language-identification turns were
    training turns typed without accents before the fourteenth audit). Languages are still told
    apart by ``turn_key``, where an accent may be what differs ("Sì" and "Si")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return turn_key("".join(c for c in decomposed if not unicodedata.combining(c)))


def _first_of_each(turns, key=turn_key) -> list[str]:
    """The first of each set of turns alike (``key``), in order."""
    first: dict[str, str] = {}
    for turn in turns:
        first.setdefault(key(turn), turn)
    return list(first.values())


@functools.lru_cache(maxsize=1)
def language_turns() -> Mapping[str, tuple[str, ...]]:
    """Per language of ``LANGUAGES`` (a read-only mapping): its first ``PER_LANGUAGE`` distinct turns
    in file order that no other language's dialogs contain."""
    distinct = {lang: _first_of_each((t for dialog in _dialogs(lang) for t in dialog), unaccented_key)
                for lang in LANGUAGES}
    seen_in: dict[str, set[str]] = {}
    for lang, turns in distinct.items():
        for turn in turns:
            seen_in.setdefault(turn_key(turn), set()).add(lang)
    kept = {lang: tuple([t for t in turns if len(seen_in[turn_key(t)]) == 1][:PER_LANGUAGE])
            for lang, turns in distinct.items()}
    return types.MappingProxyType(kept)


def language_rows(split: str = "train") -> list[dict]:
    """Rows ``{"text", "language", "id"}``: every 5th kept turn of each language is ``test`` (see
    the module docstring); languages in ``LANGUAGES`` order, turns in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rows = []
    for lang, turns in language_turns().items():
        rows += [{"text": turn, "language": lang, "id": f"{lang}/{i}"} for i, turn in enumerate(turns)
                 if split == "all" or (i % 5 == 0) == (split == "test")]
    return rows
