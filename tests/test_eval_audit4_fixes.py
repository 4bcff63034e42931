"""Evaluation and metric defects found by an audit (2026-12-06); each test failed before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.model.generate import Prediction
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.metrics import wer
from moe_gen.tasks.modalities.box import dequantize_box, quantize_box
from moe_gen.trainer.evaluation import evaluate_task

WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _model(task, tok):
    return build([task], tok, router=RouterConfig(strategy="attribute"))


def _spied_motion_model(lengths, tok):
    """(a motion task of clips of ``lengths`` frames, its longest reference in rows, an untrained model
    whose ``infer`` records the options it is called with, that record)."""
    task = _motion_task(lengths)
    longest = max(len(next(c for c in task.encode(i, tok, training=False).decoder if c.loss).rows) for i in (0, 1))
    model = _model(task, tok).eval()
    infer, seen = model.infer, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return infer(*args, **kwargs)

    model.infer = spy
    return task, longest, model, seen


def _motion_task(lengths):
    rng = np.random.default_rng(0)
    rows = [{"y": f"move {i}", "x": rng.normal(size=(n, 3)).astype(np.float32)} for i, n in enumerate(lengths)]
    return Task("m", "[TEXT:y] -> [MOTION:x]", rows)


# ---- 1: evaluation decodes as many items and frame rows as the references hold ---------------------

def test_evaluation_decodes_as_many_items_as_the_longest_reference(tok):
    """max_items stayed at infer's default of 8: a perfect answer of 12 items was cut to 8."""
    rows = [{"q": "up", "w": WORDS}, {"q": "down", "w": WORDS[::-1]}, {"q": "few", "w": WORDS[:2]}]
    task = Task("lists", "[TEXT:q] -> ( [TEXT:w,closed_set] )*", rows, metrics=("exact_match",))
    model = _model(task, tok)
    seen = []

    def perfect(task, rows, **kwargs):  # a perfect model, cut where infer would cut it
        seen.append(kwargs)
        cap = kwargs.get("max_items", 8)
        return [Prediction(targets={"w": row["w"][:cap]}, groups=[[{"w": w} for w in row["w"][:cap]]]) for row in rows]

    model.infer = perfect
    assert evaluate_task(model, task) == {"exact_match": 1.0}
    assert seen[0]["max_items"] == 13  # one past the longest reference: an answer running on shows it

    def running_on(task, rows, **kwargs):  # right items, then one too many: cut at the reference's length it
        cap = kwargs.get("max_items", 8)  # would have scored as right
        answers = [list(row["w"]) + [WORDS[0]] for row in rows]
        return [Prediction(targets={"w": a[:cap]}, groups=[[{"w": w} for w in a[:cap]]]) for a in answers]

    model.infer = running_on
    assert evaluate_task(model, task)["exact_match"] == 0.0  # every answer runs on (cut at 12, the long two passed)
    short = Task("short", "[TEXT:q] -> ( [TEXT:w,closed_set] )*", rows[2:] * 2, metrics=("exact_match",))
    seen.clear()
    model.infer = perfect
    evaluate_task(model, short)
    assert "max_items" not in seen[0]  # infer's default where the references fit it


def test_evaluation_decodes_as_many_frames_as_the_longest_reference(tok):
    """max_frames stayed at infer's default of 64 rows, however long the frame targets."""
    task, longest, model, seen = _spied_motion_model([160, 10], tok)
    assert longest > 64
    assert math.isfinite(evaluate_task(model, task)["l1"])
    assert seen[0]["max_frames"] == longest + 8  # room for an answer that runs on to count against it
    seen.clear()
    evaluate_task(model, _motion_task([20, 24]))
    assert "max_frames" not in seen[0]


# ---- 2: a structured answer's box is compared with its reference as the bins decode it -------------

def test_structured_exact_match_compares_boxes_as_they_decode(tok):
    """exact_match compared the decoded (float) box with the row's integer box: a perfect answer
    scored 0."""
    img = np.zeros((32, 24, 3), np.uint8)  # 24 wide, 32 high
    rows = [{"img": img, "box": [4, 4, 20, 24], "label": "cat"}, {"img": img, "box": [0, 0, 16, 16], "label": "dog"}]
    task = Task("loc", "[IMAGE:img] -> [BOX:box] [TEXT:label]", rows)
    model = _model(task, tok)

    def decoded(box):
        return dequantize_box(quantize_box(box, 24, 32, tok.num_bins), 24, 32, tok.num_bins)

    model.infer = lambda task, rows, **kw: [Prediction(targets={"box": decoded(r["box"]), "label": r["label"]})
                                            for r in rows]
    pairs = []
    assert evaluate_task(model, task, pairs=pairs) == {"exact_match": 1.0}
    assert pairs[0][1] == {"box": decoded([4, 4, 20, 24]), "label": "cat"}
    model.infer = lambda task, rows, **kw: [Prediction(targets={"box": decoded([0, 0, 8, 8]), "label": r["label"]})
                                            for r in rows]
    assert evaluate_task(model, task) == {"exact_match": 0.0}  # a wrong box still misses


# ---- 3: a bf16 model's frame answers can be scored --------------------------------------------------

def test_a_bf16_model_evaluates_frame_targets(tok):
    """prediction.frames.numpy() refused the bf16 frames of a bf16 model."""
    task = _motion_task([6, 5])
    model = _model(task, tok).to(torch.bfloat16).eval()
    assert math.isfinite(evaluate_task(model, task)["l1"])


# ---- 4: WER counts an empty reference's predicted words as insertions ------------------------------

def test_wer_counts_real_reference_words_only():
    """An empty reference stood for the word "<empty>": one more word in the count, an insertion
    scored as a substitution, and the prediction "<empty>" scored perfect."""
    assert wer(["", "hello there"], ["", "hello world"]) == pytest.approx(0.5)  # 1 error / 2 words
    assert wer(["x y", "hello world"], ["", "hello world"]) == pytest.approx(1.0)  # 2 insertions / 2 words
    assert wer(["<empty>", "a b"], ["", "a b"]) == pytest.approx(0.5)
    assert wer(["Hello  World", "a"], ["hello world", "a b c"]) == pytest.approx(2 / 5)  # folded; 2 deletions
    assert wer(["", ""], ["", ""]) == 0.0  # nothing to say, nothing said
    assert wer(["<empty>"], [""]) == math.inf  # words where none were due


# ---- mutation-testing audit (r15): spacing, the frame budget's margin, padded frames, skipped targets -------

def test_spaced_indices_spread_over_every_row():
    from moe_gen.trainer.evaluation import spaced_indices

    assert spaced_indices(10, 4) == [0, 2, 5, 7]
    assert spaced_indices(350, 100)[-1] == 346  # (3.5 apart: not 3, which stopped at row 297)
    assert spaced_indices(7, 7) == list(range(7))


def test_frame_budget_leaves_room_past_a_reference_just_under_the_default(tok):
    """A frame reference of 57-64 rows fits infer's 64, but an answer running on past it would be cut
    there: the budget is the longest reference plus 8 as soon as that passes 64."""
    task, longest, model, seen = _spied_motion_model([120, 10], tok)
    assert 56 < longest <= 64
    evaluate_task(model, task)
    assert seen[0]["max_frames"] == longest + 8


def test_a_frame_reference_leaves_out_the_values_that_only_pad_its_last_row():
    from moe_gen.tasks.plan import TARGET, Chunk
    from moe_gen.tasks.sample import Sample
    from moe_gen.trainer.evaluation import _frame_reference

    rows = torch.arange(12.0).reshape(3, 4)
    target = Chunk("MOTION", TARGET, True, rows=rows, positions=torch.zeros(3, 3, dtype=torch.long), padded_values=3)
    reference = _frame_reference(Sample("m", 0, encoder=[], decoder=[target], task_modalities=("MOTION",)))
    assert np.isnan(reference[-1, 1:]).all() and not np.isnan(reference[:-1]).any() and reference[-1, 0] == 8.0
    assert rows[-1, -1] == 11.0  # (a copy: the sample's own rows keep their values)


def test_rows_whose_frame_targets_fail_to_encode_are_counted_as_skipped(tok):
    rng = np.random.default_rng(0)
    rows = [{"y": f"move {i}", "x": rng.normal(size=(n, 3)).astype(np.float32)} for i, n in enumerate([12, 10])]
    rows.append({"y": "bad", "x": np.full((5, 3), np.nan, dtype=np.float32)})  # refused when encoded
    task = Task("m", "[TEXT:y] -> [MOTION:x]", rows, on_error="skip")
    results = evaluate_task(_model(task, tok).eval(), task)
    assert results["skipped"] == 1 and math.isfinite(results["l1"])
