"""Reference predictors for the demo's text-to-speech task, scored like the model.

The demo scores ``text_to_speech`` by the L1 distance between predicted and true target frames (the
encoded fbank frames; a missing or extra frame counts against the zero frame) on 40 held-out rows,
evenly spaced over the test split (4 voices the training split does not have). This prints what
simple predictors built from the training voices reach on the same rows, so the model's L1 can be
read against them:

- ``zeros``: all-zero frames;
- ``mean frame``: the mean training frame, repeated;
- ``one voice``: the same word spoken by the first training voice that has it;
- ``word average``: the same word averaged over the training voices (each resampled in time to
  their median length).

Usage: ``python scripts/tts_baselines.py [--rows 40]``; prints a Markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_gen.tasks import Tokenizer, load_preset  # noqa: E402
from moe_gen.tasks.metrics import l1  # noqa: E402
from moe_gen.trainer.evaluation import spaced_indices  # noqa: E402


def _frames(task, index: int, tokenizer, statistics) -> np.ndarray:
    sample = task.encode(index, tokenizer, training=False, statistics=statistics)
    return next(c.rows for c in sample.decoder if c.loss and c.rows is not None).numpy()


def _resample(frames: np.ndarray, length: int) -> np.ndarray:
    """``frames`` [T, F] linearly interpolated in time to ``length`` frames."""
    grid = np.linspace(0, len(frames) - 1, length)
    return np.stack([np.interp(grid, np.arange(len(frames)), frames[:, f]) for f in range(frames.shape[1])], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40, help="held-out rows, evenly spaced (the demo's eval_limit)")
    args = parser.parse_args()
    tokenizer = Tokenizer.default()
    train, test = load_preset("text_to_speech", "train"), load_preset("text_to_speech", "test")
    statistics = train.fit_statistics()  # what the model saves and evaluates with
    training = [(row["text"], _frames(train, i, tokenizer, statistics)) for i, row in enumerate(train.data)]
    indices = spaced_indices(len(test), min(args.rows, len(test)))
    held_out = [(test.data[i]["text"], _frames(test, i, tokenizer, statistics)) for i in indices]
    references = [frames for _, frames in held_out]
    mean = np.concatenate([frames for _, frames in training]).mean(0)
    by_word: dict[str, list[np.ndarray]] = {}
    for word, frames in training:
        by_word.setdefault(word, []).append(frames)

    def word_average(word: str, length: int) -> np.ndarray:
        voices = by_word.get(word)
        if not voices:
            return np.tile(mean, (length, 1))
        median = int(np.median([len(v) for v in voices]))
        return np.mean([_resample(v, median) for v in voices], 0)

    predictors = {
        "zeros": [np.zeros_like(r) for r in references],
        "mean frame": [np.tile(mean, (len(r), 1)) for r in references],
        "one voice": [by_word[w][0] if w in by_word else np.tile(mean, (len(r), 1)) for w, r in held_out],
        "word average": [word_average(w, len(r)) for w, r in held_out],
    }
    scores = {name: l1(predictions, references) for name, predictions in predictors.items()}
    print(f"text_to_speech, {len(held_out)} held-out rows: L1 of encoded fbank frames (lower is better)\n")
    print("| predictor | L1 |\n|---|---:|")
    for name, value in scores.items():
        print(f"| {name} | {value:.3f} |")
    print(json.dumps({"task": "text_to_speech", "rows": len(held_out), "l1": scores}))


if __name__ == "__main__":
    main()
