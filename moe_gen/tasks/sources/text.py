"""Text from data that ships with Python and scikit-learn.

- ``load_doc_paragraphs``: paragraphs of CPython's ``pydoc_data.topics`` (the help() texts of the
  language reference) with the topic they come from, for infilling and topic naming.
- ``load_iris_tables``: scikit-learn's iris measurements as one-row tables (STRUCT) with the
  species and a sentence describing them, for table-to-text and table QA.

Splits are deterministic (every 5th item is "test"; for the paragraphs, every 5th of each topic).
"""

from __future__ import annotations

import functools

__all__ = ["load_doc_paragraphs", "load_iris_tables"]


def _split_keep(i: int, split: str) -> bool:
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; known: train, test, all")
    return split == "all" or (i % 5 == 0) == (split == "test")


@functools.lru_cache(maxsize=1)
def _paragraphs() -> list[tuple[str, str, bool]]:
    """``(topic, text, held_out)`` of every distinct prose paragraph, ordered by topic.

    Broad topics repeat their sub-topics' text word for word ("compound" holds the paragraphs of
    "if", "while", "try"...), so the same paragraph would name several topics, and a positional
    split put it in both splits under different labels (80 of 245 test rows, before 2026-12-05).
    Each distinct paragraph is kept once, under the most specific topic it appears in (the one
    with the fewest paragraphs; ties alphabetically), and the split is made within each topic
    (its 5th, 10th... paragraph held out), so every held-out topic has training paragraphs."""
    from pydoc_data.topics import topics

    found: dict[str, list[str]] = {}
    for topic in sorted(topics):
        for block in topics[topic].split("\n\n"):
            text = " ".join(block.split())
            # prose only: skip code, grammar rules and very short lines
            if 12 <= len(text.split()) <= 60 and not text.startswith((">>>", "::")) and "::=" not in text:
                found.setdefault(topic, []).append(text)
    size = {topic: len(texts) for topic, texts in found.items()}
    owner: dict[str, str] = {}
    for topic, texts in found.items():
        for text in texts:
            if text not in owner or (size[topic], topic) < (size[owner[text]], owner[text]):
                owner[text] = topic
    out, seen = [], set()
    for topic, texts in found.items():
        kept = []
        for text in texts:
            if owner[text] == topic and text not in seen:
                seen.add(text)
                kept.append(text)
        out.extend((topic, text, i % 5 == 4) for i, text in enumerate(kept))
    return out


def load_doc_paragraphs(split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows ``{"text", "topic", "id"}`` of distinct prose paragraphs (12–60 words) from pydoc's
    topics, each under one topic; the test split holds every 5th paragraph of each topic."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; known: train, test, all")
    rows = [{"text": text, "topic": topic, "id": f"pydoc/{i}"}
            for i, (topic, text, held_out) in enumerate(_paragraphs())
            if split == "all" or held_out == (split == "test")]
    return rows[:limit] if limit is not None else rows


_FEATURES = ("sepal length", "sepal width", "petal length", "petal width")


def load_iris_tables(split: str = "train") -> list[dict]:
    """Rows ``{"table", "species", "description", "longer", "id"}``: each table is one iris
    flower's four measurements in cm as a one-row table ``{"sepal length": 5.1, "sepal width": 3.5,
    ...}`` (one column per measure, so each column's statistics describe one measure);
    ``longer`` names the longer of its sepal width and petal length (table QA: comparing two cells;
    the longest measure would always be the sepal length, a question with one answer)."""
    from sklearn.datasets import load_iris

    data = load_iris()
    rows = []
    for i, (values, target) in enumerate(zip(data.data, data.target)):
        if not _split_keep(i, split):
            continue
        species = str(data.target_names[target])
        table = {f: round(float(v), 1) for f, v in zip(_FEATURES, values)}
        longer = "sepal width" if values[1] > values[2] else "petal length"
        description = (f"an iris {species} flower with petals {values[2]:.1f} cm long and "
                       f"{values[3]:.1f} cm wide")
        rows.append({"table": table, "species": species, "description": description,
                     "longer": longer, "id": f"iris/{i}"})
    return rows
