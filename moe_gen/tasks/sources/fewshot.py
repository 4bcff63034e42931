"""Few-shot instruction following over real words, for the ``few_shot_instructions`` preset (in the
manner of Natural Instructions: a task definition, worked examples, then the query).

Seven small text tasks whose answers a function computes exactly: reverse the word order, give the
first word, give the last word, give the first letter of each word, count the words, sort them
alphabetically, give the longest word (queries with a tie for the longest are not drawn); none
changes case, as ``exact_match`` ignores it. A row
holds the task's ``definition``, two worked ``examples`` (``input: ... output: ...`` separated by
`` ; ``), the ``query`` (2-4 distinct words) and its ``answer``.

The words are the lower-case words of 3-8 letters in CPython's ``pydoc_data.topics`` (1,957
words, sorted). Every 5th of them is held out: test queries use held-out words only and train
queries never do, so a test query shares no word with any training query; the worked examples of
both splits use training words. Each block of 7 rows asks every task once, in an order drawn per
block (``order.shuffled_cycle``); row ``k`` is drawn from
``random.Random(seed · 100003 + k + split offset)``: 3,500 train and 350 test rows by default;
``"all"`` is the train rows, then the test rows.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Callable

from moe_gen.tasks.sources.order import shuffled_cycle

__all__ = ["FEW_SHOT_TASKS", "few_shot_rows", "task_words", "SPLITS"]

SPLITS = ("train", "test", "all")
SHOTS = 2


def _reverse(words: list[str]) -> str:
    return " ".join(reversed(words))


def _first(words: list[str]) -> str:
    return words[0]


def _last(words: list[str]) -> str:
    return words[-1]


def _initials(words: list[str]) -> str:
    return " ".join(w[0] for w in words)


def _count(words: list[str]) -> str:
    return str(len(words))


def _sort(words: list[str]) -> str:
    return " ".join(sorted(words))


def _longest(words: list[str]) -> str:
    return max(words, key=len)


# (key, definition, answer function): the family of tasks, in the order rows cycle through them.
FEW_SHOT_TASKS: tuple[tuple[str, str, Callable[[list[str]], str]], ...] = (
    ("reverse", "write the words of the input in reverse order.", _reverse),
    ("first", "give the first word of the input.", _first),
    ("last", "give the last word of the input.", _last),
    ("initials", "give the first letter of each word of the input.", _initials),
    ("count", "how many words does the input have? answer with a number.", _count),
    ("sort", "write the words of the input in alphabetical order.", _sort),
    ("longest", "give the longest word of the input.", _longest),
)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(sorted({w for text in topics.values() for w in re.findall(r"[A-Za-z]+", text)
                         if w.islower() and 3 <= len(w) <= 8}))


def task_words(split: str) -> tuple[str, ...]:
    """The words queries of ``split`` are made of (``test``: every 5th word of the vocabulary)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} of query words; known: train, test")
    return tuple(w for i, w in enumerate(_vocabulary()) if (i % 5 == 0) == (split == "test"))


def _draw(words: tuple[str, ...], key: str, rng: random.Random) -> list[str]:
    while True:
        drawn = rng.sample(words, rng.randint(2, 4))
        lengths = sorted((len(w) for w in drawn), reverse=True)
        if key != "longest" or lengths[0] > lengths[1]:  # one longest word, so one answer
            return drawn


def few_shot_rows(split: str = "train", count: int | None = None, seed: int = 0) -> list[dict]:
    """Rows ``{"definition", "examples", "query", "answer", "task", "id"}``; ``count`` defaults to
    3,500 (train) or 350 (test); ``"all"``: the train rows, then the test rows (``count`` of each when
    given). See the module docstring."""
    if split not in SPLITS:  # ("known: train, test" before the thirteenth audit, though "all" loaded)
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "all":
        return few_shot_rows("train", count, seed) + few_shot_rows("test", count, seed)
    query_words = task_words(split)
    shot_words = task_words("train")
    count = count if count is not None else (3500 if split == "train" else 350)
    rows = []
    for k in range(count):
        key, definition, answer = FEW_SHOT_TASKS[shuffled_cycle(k, len(FEW_SHOT_TASKS), f"fewshot/{split}/{seed}")]
        rng = random.Random(seed * 100003 + k + (0 if split == "train" else 50000))
        shots = [_draw(shot_words, key, rng) for _ in range(SHOTS)]
        query = _draw(query_words, key, rng)
        examples = " ; ".join(f"input: {' '.join(s)} output: {answer(s)}" for s in shots)
        rows.append({"definition": definition, "examples": examples, "query": " ".join(query),
                     "answer": answer(query), "task": key, "id": f"fewshot/{split}/{k}"})
    return rows
