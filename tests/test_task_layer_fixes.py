"""Task-layer defects found by an audit (2026-12-05, seventh session); each test failed before its fix."""

import collections
import types
import warnings

import numpy as np
import pytest

from moe_gen.tasks import Task, Tokenizer, collate, load_preset
from moe_gen.tasks.metrics import accuracy, exact_match, iou_accuracy


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_closed_set_labels_given_as_bytes_are_the_text_the_target_trains(tok):
    """The label set held "b'cat'" while the target trained "cat": no allowed token was the target."""
    task = Task("t", "[TEXT:x] -> [TEXT:y,closed_set]", [{"x": "a", "y": b"cat"}, {"x": "b", "y": b"dog"}])
    assert task.closed_sets() == {"y": ["cat", "dog"]}
    batch = collate([task.encode(0, tok)], tok, {"t": 0})
    targets = batch.labels.view(-1)[batch.allowed_index].tolist()
    assert all(t in row for t, row in zip(targets, batch.allowed_tokens.tolist()))
    assert accuracy(["cat"], [b"cat"]) == 1.0 and exact_match(["Cat"], [b"cat"]) == 1.0


def test_every_text_metric_reads_bytes_as_the_text_and_takes_arrays():
    """BLEU, chrF, ROUGE-L, SQL execution and detection labels read b"the cat" as "b'the cat'" (a
    perfect answer scored BLEU 50.8, execution and detection 0) where accuracy read the text; and a
    numpy array of references (sklearn's predictions, stacked frames) had no truth value."""
    import numpy as np

    from moe_gen.tasks.metrics import METRICS

    answer, reference = ["the cat sat on the mat"], [b"the cat sat on the mat"]
    for name in ("bleu", "chrf", "rouge_l"):
        assert METRICS.get(name)(answer, reference) == pytest.approx(100.0), name
    query = "SELECT COUNT(*) FROM flowers"
    assert METRICS.get("execution_accuracy")([query], [query.encode()]) == 1.0
    box = [0, 0, 4, 4]
    assert METRICS.get("detection_f1")([[(box, "cat")]], [[(box, b"cat")]]) == 1.0
    labels = np.array(["cat", "dog", "cat"])
    assert accuracy(labels, np.array(["cat", "dog", "dog"])) == pytest.approx(2 / 3)
    frames = np.ones((2, 3, 4), np.float32)
    assert METRICS.get("l1")(frames, frames) == 0.0
    with pytest.raises(ValueError, match="a metric needs at least one reference"):
        accuracy(np.array([]), np.array([]))


def test_a_label_that_is_not_utf8_is_refused_by_its_row(tok):
    task = Task("t", "[TEXT:x] -> [TEXT:y,closed_set]", [{"x": "a", "y": b"cat"}, {"x": "b", "y": b"\xff"}])
    assert task.closed_sets() == {"y": ["cat"]}
    with pytest.raises(Exception, match=r"task 't'.*row 1.*not in the closed set"):
        task.encode(1, tok)


def test_rows_that_are_mappings_but_not_dicts_give_their_labels(tok):
    rows = [types.MappingProxyType({"x": "a b", "y": "yes"}), collections.UserDict({"x": "c d", "y": "no"})]
    task = Task("closed", "[TEXT:x] -> [TEXT:y,closed_set]", rows)
    assert task.closed_sets() == {"y": ["no", "yes"]}
    assert [len(s.decoder) for s in task.samples(tok)] == [2, 2]


def test_attributes_no_preprocessor_applies_warn_or_are_refused(tok):
    rows = [{"text": "hello", "audio": np.zeros(1600, np.float32)}]
    with pytest.warns(UserWarning, match="sets mask_ratio, which moe_gen parses"):
        Task("p", "[PHONE:text,mask_ratio=0.5] -> [AUDIO:audio,adaptor=audio_tgt_fbank]", rows).plan(tok)
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.warns(UserWarning, match="sets length, which moe_gen parses"):
        Task("v", "draw a [TEXT:label] -> [IMAGE:image,preprocess=image_vq,length=64]",
             [{"label": "seven", "image": image}]).plan(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = Task("m", "[IMAGE:image,preprocess=image_vq,mask_ratio=0.5,region=box] what? -> [TEXT:label]",
                    [{"image": image, "box": [0, 0, 8, 8], "label": "x"}])
        with pytest.raises(ValueError, match=r"task 'm'.*image_vq.*does not apply mask_ratio, region"):
            task.plan(tok)


def test_a_missing_box_is_a_miss_for_iou_accuracy():
    box = [0, 0, 10, 10]
    assert iou_accuracy([None, box], [box, box]) == 0.5


def test_every_grounding_query_names_one_digit_on_its_canvas():
    """About 4% of canvases had no digit drawn once; their query named a digit drawn twice."""
    for split, drawn in (("train", 300), ("test", 100)):
        task = load_preset("visual_grounding", split)
        assert 0.9 * drawn < len(task) < drawn
        assert all(row["labels"].count(row["query"]) == 1 for row in task.data)
