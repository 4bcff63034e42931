"""Defects an audit of new tasks on a user's own data found (2026-12-05, ninth session); each test
failed before its fix."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
from PIL import Image

from moe_gen.model.task_setup import _task_features
from moe_gen.tasks import Task, TaskDataError, Tokenizer, collate, load_preset
from moe_gen.tasks.batch import IGNORE_INDEX

WAV = (np.sin(np.arange(3200) / 5) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_an_empty_given_value_takes_no_position(tok):
    """An empty no_loss text before the answer added one position without a label: every later
    label and frame target sat one position off (a lone sample's last frame pointed past the batch;
    in a batch, at the next row's first position)."""
    speech = Task("tts", "[TEXT:text] say it -> [TEXT:speaker,no_loss] [AUDIO:wav]",
                  [{"text": "hi", "speaker": "", "wav": WAV}])
    batch = collate([next(speech.samples(tok))], tok, {"tts": 0})
    (index,) = batch.frame_index.values()
    positions = int((~batch.decoder.padding_mask).sum())
    assert index.tolist() == list(range(positions))  # every position predicts a frame, in order
    text = Task("t", "[TEXT:q] -> [TEXT:hint,no_loss] [TEXT:a]", [{"q": "x", "hint": "", "a": "yes"}])
    batch = collate([next(text.samples(tok))], tok, {"t": 0})
    assert batch.labels.shape[1] == batch.decoder.tokens.shape[1]
    assert batch.labels[batch.labels != IGNORE_INDEX].tolist() == tok.encode("yes") + [tok.eos_id]


def test_tasks_feeding_one_adapter_two_widths_are_refused_by_name(tok):
    rows = [{"doc": "the cat sat on the mat", "topic": "pets"}, {"doc": "stocks fell today", "topic": "money"}]
    small = Task("small", "[TEXT:doc,preprocess=bag_of_words,vocab_size=4] which topic? -> [TEXT:topic,closed_set]",
                 rows)
    big = Task("big", "[TEXT:doc,preprocess=bag_of_words] which topic? -> [TEXT:topic,closed_set]", rows)
    with pytest.raises(ValueError, match=r"feed the 'bag_of_words' adapter features of widths \[4, 2048\]"):
        collate([next(small.samples(tok)), next(big.samples(tok))], tok, {"small": 0, "big": 1})
    with pytest.raises(ValueError, match="tasks 'small' and 'big' feed the 'bag_of_words' adapter"):
        _task_features([small, big], tok, {}, [])  # the model kept the last task's width


def test_negative_pixels_are_refused_not_clipped(tok):
    normalised = (np.random.default_rng(0).random((16, 16, 3)) - 0.485) / 0.229
    task = Task("t", "[IMAGE:img] what? -> [TEXT:cap]", [{"img": normalised.astype(np.float32), "cap": "a"}])
    with pytest.raises(TaskDataError, match="negative pixel values"):
        next(task.samples(tok))


def test_task_arguments_are_checked_when_the_task_is_made():
    with pytest.raises(ValueError, match=r"preprocessor_options names no preprocessor: \['imag'\] "
                                         r"\(did you mean 'image'\?\)"):
        Task("t", "[IMAGE:img] what? -> [TEXT:cap]", [], preprocessor_options={"imag": {"size": 64}})
    assert Task("t", "[TEXT:q] -> [TEXT:a]", [], metrics="accuracy").metrics == ("accuracy",)  # was its letters
    with pytest.raises(ValueError, match=r"unknown metrics \['acuracy'\] \(did you mean 'accuracy'\?\)"):
        Task("t", "[TEXT:q] -> [TEXT:a]", [], metrics=["acuracy"])
    tok = Tokenizer.default()
    sample = next(Task("t", "[TEXT:q] -> [TEXT:a]", [{"q": "x", "a": "y"}]).samples(tok))
    with pytest.raises(ValueError, match="unknown pass 'generativ'; known: generative"):  # was tuple.index's
        collate([sample], tok, {"t": 0}, pass_name="generativ")
    with pytest.raises(ValueError, match="limit must be None or a whole number >= 0, got -1"):
        load_preset("table_species", limit=-1)  # dropped the last row


def test_a_task_level_error_is_raised_even_when_rows_are_skipped(tok):
    """No row held a label of the closed set: with on_error="skip" every row was skipped, each
    re-planning the task (2,000 rows took 4 s; the task trained on nothing)."""
    task = Task("t", "[TEXT:q] -> [TEXT:l,closed_set]", [{"q": "a", "l": None}] * 50, on_error="skip")
    with pytest.raises(TaskDataError, match="none of the 50 rows holds a valid label"):
        list(task.samples(tok))
    partly = Task("t", "[TEXT:q] -> [TEXT:l,closed_set]", [{"q": "a", "l": "yes"}, {"q": "b", "l": None}],
                  on_error="skip")
    assert len(list(partly.samples(tok))) == 1 and partly.skipped == 1  # a row's own error is still skipped


def test_bad_jsonl_lines_are_skipped_and_counted(tok, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    lines = [json.dumps({"img": "ok.png", "cap": "a"}), json.dumps({"img": "missing.png", "cap": "b"}),
             '{"img": "ok.png", "cap": }', json.dumps({"img": "ok.png", "cap": "c"})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    task = Task("t", "[IMAGE:img] what? -> [TEXT:cap]", str(tmp_path / "data.jsonl"), on_error="skip")
    assert len(list(task.samples(tok))) == 2 and task.skipped == 2
    assert any("line 2" in e and "missing.png" in e for e in task.errors) and any("line 3" in e for e in task.errors)
    with pytest.raises(TaskDataError, match="line 2"):
        Task("t", "[IMAGE:img] what? -> [TEXT:cap]", str(tmp_path / "data.jsonl"))


def test_errors_say_what_to_do(tok, tmp_path):
    with pytest.raises(ValueError, match="use a larger patch"):  # a larger stride never helps
        Task("t", "[IMAGE:img] what? -> [TEXT:cap]", [], preprocessor_options={"image": {"size": 1024}}).plan(tok)
    with wave.open(str(tmp_path / "empty.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
    task = Task("asr", "[AUDIO:wav] -> [TEXT:t]", [{"wav": str(tmp_path / "empty.wav"), "t": "x"}])
    with pytest.raises(TaskDataError, match="the WAV file holds no samples"):  # was numpy's reshape error
        next(task.samples(tok))
    table = {"a": list(range(200))}
    with pytest.raises(TaskDataError, match="the table has 200 rows; the table adapter tells 128 apart"):
        next(Task("t", "[STRUCT:t] -> [TEXT:a]", [{"t": table, "a": "x"}]).samples(tok))
    empty = Task("det", "[IMAGE:img] list the digits -> ( [BOX:b] [TEXT:l] )*",
                 [{"img": np.zeros((32, 32, 3), np.uint8), "b": [], "l": []}])
    with pytest.raises(TaskDataError, match="repetition group 0 has no items"):  # nothing was scored
        next(empty.samples(tok))


def test_split_all_of_the_canvas_presets_is_train_and_test():
    for name, train, test in (("digit_detection", 300, 100), ("vqa_digits", 600, 100)):
        assert len(load_preset(name, "all").data) == train + test  # was the test count, from the test seeds
    detection = load_preset("digit_detection", "all").data
    assert detection[300]["image"].tolist() == load_preset("digit_detection", "test").data[0]["image"].tolist()


def test_the_zeros_that_pad_a_stacked_frame_row_are_no_target(tok):
    """Audio stacks 4 frames a row and fills the last row with zeros: the loss regressed those
    zeros and the metric counted them as reference frames (a decoding audit, ninth session)."""
    import torch

    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks.metrics import l1

    task = load_preset("text_to_speech", "train", limit=4)
    samples = list(task.samples(tok))
    chunks = [next(c for c in s.decoder if c.rows is not None) for s in samples]
    assert any(c.padded_values for c in chunks)
    for c in chunks:
        frames = int(c.rows.numel() - c.padded_values) // 80  # 80 filterbank values a frame
        assert c.padded_values == c.rows.numel() - frames * 80 and c.padded_values < c.rows.shape[1]
    batch = collate(samples, tok, {task.name: 0})
    (valid,) = batch.frame_valid.values()
    assert int((~valid).sum()) == sum(c.padded_values for c in chunks)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    objective = GenerativeObjective(model)
    with torch.no_grad():
        before = float(objective(batch)["frame_loss"])
        (name,) = batch.frame_targets
        batch.frame_targets[name][~valid] = 100.0  # what stands in the padding does not matter
        assert float(objective(batch)["frame_loss"]) == pytest.approx(before, rel=1e-6)
    reference = np.array([[1.0, 2.0], [3.0, np.nan]])  # NaN: a value that only pads the row
    assert l1([np.array([[1.0, 2.0], [3.0, 9.0]])], [reference]) == 0.0
    assert l1([np.zeros((2, 2))], [reference]) == pytest.approx(6 / 3)


def test_a_task_weight_of_zero_is_allowed_and_a_closed_set_task_needs_no_rows(tok):
    """(mutation-testing audit r17) Weight 0 leaves a task out of ``mixing="weights"`` sampling (kept for
    evaluation); a closed-set task built with no rows (for inference, its labels from a model's saved
    statistics) has empty label sets instead of failing as if its rows held no label."""
    assert Task("t", "[TEXT:q] -> [TEXT:a]", [], weight=0).weight == 0.0
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -0.5"):
        Task("t", "[TEXT:q] -> [TEXT:a]", [], weight=-0.5)
    empty = Task("t", "[TEXT:q] -> [TEXT:a,closed_set]", [])
    assert empty.closed_sets() == {"a": []} and empty.fit_statistics() == {"closed_sets": {"a": []}}
    plan = empty.plan(tok, {"closed_sets": {"a": ["no", "yes"]}})
    assert plan.closed_sets == {"a": ("no", "yes")}
    with pytest.raises(TaskDataError, match="none of the 1 rows holds a valid label"):
        Task("t", "[TEXT:q] -> [TEXT:a,closed_set]", [{"q": "x", "a": None}]).closed_sets()
