"""Faults found by the twenty-seventh session's audit of metrics, evaluation and batch drawing;
each test fails on the code before its fix."""

import collections
import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_gen.model import GeneralistModel, flavour  # noqa: E402
from moe_gen.model.generate import Prediction  # noqa: E402
from moe_gen.tasks import Task, Tokenizer  # noqa: E402
from moe_gen.tasks import metrics as M  # noqa: E402
from moe_gen.tasks.sources.vision import load_digit_images  # noqa: E402
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer  # noqa: E402
from moe_gen.trainer.evaluation import evaluate_task  # noqa: E402
from moe_gen.trainer.sampling import sample_modality_tokens  # noqa: E402

GOLD = "select count(*) from flowers where species = 'setosa'"


@pytest.mark.parametrize("query", [
    # rows (0.6,) and (None,): a number and NULL
    "select max(petal_width) from flowers where species = 'setosa' "
    "union select max(petal_width) from flowers where species = 'rose'",
    # the species' names and a count: text and a number
    "select species from flowers union select count(*) from flowers"])
def test_sql_rows_of_mixed_types_score_zero_instead_of_raising(query):
    assert M.execution_accuracy([query], [GOLD]) == 0.0


def test_sql_results_still_compare_as_multisets():
    rows = "select species from flowers where petal_width > 2.3"
    assert M.execution_accuracy([rows + " order by species desc"], [rows]) == 1.0  # order ignored
    once = "select distinct species from flowers where petal_width > 2.3"
    assert M.execution_accuracy([once], [rows]) == 0.0  # repeats counted


def test_sudoku_metrics_read_bytes_as_text_and_refuse_dicts():
    solution = "1 2 3 4 | 3 4 1 2 | 2 1 4 3 | 4 3 2 1"
    as_bytes = solution.encode()
    assert M.sudoku_valid([as_bytes], [as_bytes]) == 1.0
    assert M.sudoku_cells([as_bytes], [solution]) == 1.0
    for metric in (M.sudoku_valid, M.sudoku_cells):
        with pytest.raises(ValueError, match="a metric of text got a dict"):
            metric([{"grid": solution}], [solution])


@pytest.mark.parametrize("metric", [M.l1, M.mse])
def test_frame_metrics_read_bf16_tensors(metric):
    reference = np.zeros((2, 3))
    assert metric([torch.full((2, 3), 0.5, dtype=torch.bfloat16)], [reference]) == \
        metric([np.full((2, 3), 0.5)], [reference]) > 0


def test_a_single_image_code_target_scores_a_right_answer_as_right():
    """exact_match and accuracy compare the decoded answer with what a right answer decodes to (the
    image tokenizer's reconstruction); before, with the row's raw 8x8 image: never equal."""
    tok = Tokenizer.default()
    rows = [{"label": r["label"], "image": r["image"]} for r in load_digit_images("test")[:3]]
    task = Task("draw", "draw [TEXT:label] -> [IMAGE:image,preprocess=image_vq]", rows,
                metrics=("exact_match", "accuracy", "pixel_mse"))
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    plan = model.plan(task)
    target = next(p for p in plan.templates[0][1] if p.slot.column == "image")

    def right(row):  # the codes training teaches, decoded
        codes = next(c.tokens for c in plan.encode(row, 0, training=True).decoder if c.column == "image")
        return plan.preprocessor(target).to_image([tok.bin_index(t) for t in codes])

    model.infer = lambda t, batch, **kw: [Prediction(image=right(r), targets={"image": right(r)}) for r in batch]
    scores = evaluate_task(model, task)
    assert scores["exact_match"] == scores["accuracy"] == 1.0
    # pixel_mse still compares with the row's own image (the tokenizer's error counts)
    assert scores["pixel_mse"] == M.pixel_mse([right(r) for r in rows], [r["image"] for r in rows]) > 0
    wrong = right(rows[1])
    model.infer = lambda t, batch, **kw: [Prediction(image=wrong, targets={"image": wrong}) for _ in batch]
    assert evaluate_task(model, task)["exact_match"] == pytest.approx(1 / 3)


def test_mixed_batches_fill_up_while_a_task_still_fits():
    """With more tasks than ~3 x batch_size refused by the budget, the draw stopped after 4 x
    batch_size tries and left the batch short, though a row that fits was still open."""
    tok = Tokenizer.default()
    long = [Task(f"long{k}", "[TEXT:a] -> [TEXT:b]", [{"a": "word " * 20, "b": "y"}] * 5) for k in range(9)]
    short = Task("short", "[TEXT:a] -> [TEXT:b]", [{"a": "w", "b": "y"}] * 5)
    size = {t.name: sum(sample_modality_tokens(t.encode(0, tok)).values()) for t in (long[0], short)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = TaskSampler(long + [short], tok, TrainConfig(mixing="uniform", batch_size=2, progress=False,
                                                               max_tokens=size["long0"] + size["short"],
                                                               tensorboard=False))
    sizes = collections.Counter(len(sampler.next_batch(step)) for step in range(200))
    assert sizes == {2: 200}


def test_trainer_evaluate_of_no_tasks_scores_none(tmp_path):
    tok = Tokenizer.default()
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": f"y{i % 3}"} for i in range(6)])
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model, [task], TrainConfig(steps=1, warmup_steps=0, progress=False, tensorboard=False),
                          output_dir=str(tmp_path), overwrite=True)
    assert trainer.evaluate([]) == {}
    assert list(trainer.evaluate()) == ["t"]
