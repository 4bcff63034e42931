"""Audit 15 of the objectives: what an objective cannot train, or the answer infer cannot decode, is
refused when the ``Trainer`` is built (``Objective.check_task``), and the objectives' own settings,
given from Python, are checked as ``TrainConfig`` checks them. Each test of a defect failed before its
fix; the preset and suite tests show that the new layout check refuses none of the built-in tasks."""

import math

import numpy as np
import pytest
from helpers import build

from moe_gen import TASKS
from moe_gen.model.grammar import check_answer_layout
from moe_gen.objectives import ContrastiveObjective, GenerativeObjective
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _trainer(model, tasks, tmp_path, **overrides):
    config = TrainConfig(**{"steps": 2, "batch_size": 2, "warmup_steps": 0, "progress": False, "tensorboard": False,
                            "checkpoint_every": 0, **overrides})
    return Trainer(model, tasks, config, output_dir=str(tmp_path / "run"))


def test_a_contrastive_task_without_a_token_target_is_refused_when_the_trainer_is_built(tok, tmp_path):
    """The contrastive objective had no check_task: a task whose answer is motion frames was
    refused only when a step first drew one of its rows, after the steps before it had trained."""
    base = load_preset("text_to_motion", "train", limit=4)
    motion = Task("motion_retrieval", base.instruction, base.data, objective="contrastive")
    model = build([motion], tok)
    with pytest.raises(ValueError, match=r"task 'motion_retrieval': the contrastive objective needs a token "
                                         r"target \(text\).*its answer has only \['MOTION:motion'\]"):
        _trainer(model, [motion], tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"task_weights": {"digit_classification": -1.0}},
     r"GenerativeObjective.task_weights\['digit_classification'\] must be a finite number >= 0, got -1.0"),
    ({"task_weights": {"digit_classification": math.nan}},
     r"GenerativeObjective.task_weights\['digit_classification'\] must be a finite number >= 0, got nan"),
    ({"label_smoothing": 1.5}, r"GenerativeObjective: label_smoothing must be None .* in \[0, 1\).*got 1.5"),
    ({"label_smoothing": -0.5}, r"GenerativeObjective: label_smoothing must be None .*got -0.5"),
    ({"frame_weight": -1.0}, r"GenerativeObjective: frame_weight must be a finite number >= 0, got -1.0"),
    ({"frame_weight": math.inf}, r"GenerativeObjective: frame_weight must be a finite number >= 0, got inf"),
])
def test_the_generative_objective_refuses_settings_train_config_refuses(tok, kwargs, message):
    """Built from Python, as the README shows, the objective took negative or NaN task weights,
    label smoothing outside [0, 1) and a negative frame weight, and trained on the losses they made
    (a negative weight: a loss of -0.75 for a task it taught to answer wrongly)."""
    model = build([load_preset("digit_classification", "train", limit=6)], tok)
    with pytest.raises(ValueError, match=message):
        GenerativeObjective(model, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_weight": -2.0}, r"ContrastiveObjective: caption_weight must be a finite number >= 0, got -2.0"),
    ({"contrastive_weight": math.nan}, r"ContrastiveObjective: contrastive_weight must be a finite number >= 0"),
    ({"contrastive_weight": math.inf}, r"ContrastiveObjective: contrastive_weight must be a finite number >= 0"),
    ({"frame_weight": -1.0}, r"ContrastiveObjective: frame_weight must be a finite number >= 0, got -1.0"),
    ({"task_weights": {"digit_classification": -1.0}}, r"ContrastiveObjective.task_weights\['digit_classification'\]"),
])
def test_the_contrastive_objective_refuses_settings_train_config_refuses(tok, kwargs, message):
    model = build([load_preset("digit_classification", "train", limit=6)], tok)
    with pytest.raises(ValueError, match=message):
        ContrastiveObjective(model, **kwargs)


def test_objective_settings_within_range_are_kept(tok):
    model = build([load_preset("digit_classification", "train", limit=6)], tok)
    generative = GenerativeObjective(model, frame_weight=0, task_weights={"digit_classification": 0},
                                     label_smoothing=0.0)
    contrastive = ContrastiveObjective(model, caption_weight=0.0, contrastive_weight=3)
    assert generative.frame_weight == 0 and generative.task_weights == {"digit_classification": 0}
    assert (contrastive.caption_weight, contrastive.contrastive_weight) == (0.0, 3)


@pytest.mark.parametrize("instruction", ["[TEXT:a] -> just text", "[TEXT:a] -> [TEXT:b,no_loss]",
                                         "[TEXT:a] -> [TEXT:b] ||| [TEXT:a] again -> [TEXT:b,no_loss]"])
def test_a_task_with_no_scored_decoder_slot_is_refused_when_the_trainer_is_built(tok, tmp_path, instruction):
    """Such a task trained on the routing loss alone, without a word; infer and evaluation refused
    it only after the run."""
    task = Task("t", instruction, [{"a": "hello there", "b": "x y"}, {"a": "foo bar", "b": "z"}])
    model = build([task], tok)
    with pytest.raises(ValueError, match=r"^task 't' has no scored decoder slot to decode$"):
        _trainer(model, [task], tmp_path)


def test_a_masked_task_with_no_scored_decoder_slot_is_refused_by_name(tok, tmp_path):
    """check_masked_answer indexed the first target: the Trainer, and infer, failed with a bare
    IndexError."""
    rows = [{"q": "hello there", "p": "x y"}, {"q": "foo bar", "p": "z"}]
    task = Task("given_only", "[TEXT:q] -> [TEXT:p,no_loss] done", rows, objective="masked")
    model = build([task], tok, predict_all_features=True)
    with pytest.raises(ValueError, match=r"^task 'given_only' has no scored decoder slot to decode$"):
        _trainer(model, [task], tmp_path)
    with pytest.raises(ValueError, match=r"^task 'given_only' has no scored decoder slot to decode$"):
        model.infer(task, rows[:1])


@pytest.mark.parametrize("instruction, message", [
    ("[TEXT:w] say it, then name it -> [AUDIO:clip] [TEXT:label]",
     r"task 'x': frames \(\[AUDIO:clip\]\) decode only as the single target"),
    ("[TEXT:w] describe it as a table -> [STRUCT:table]",
     r"task 'x': target \[STRUCT:table\] is feature rows of the 'struct' preprocessor, which cannot be generated"),
    ("[TEXT:w] -> [TEXT:label] ||| [TEXT:w] say it -> [AUDIO:clip] [TEXT:label]",
     r"task 'x': frames \(\[AUDIO:clip\]\) decode only as the single target"),
    ("[TEXT:w] -> ( [TEXT:label] )* [TEXT:w2]", r"task 'x': after \[TEXT:label\] two free-text slots may start"),
])
def test_a_task_whose_answer_infer_cannot_decode_is_refused_when_the_trainer_is_built(tok, tmp_path, instruction,
                                                                                    message):
    """A frame target beside another target, or a STRUCT target of the default cell encoding, passed
    Task, build, Trainer and fit, and failed only afterwards, in infer and evaluate."""
    rng = np.random.default_rng(0)
    rows = [{"w": w, "w2": w + "!", "clip": (0.1 * rng.standard_normal(4800)).astype(np.float32),
             "label": [w + " tone"] if "(" in instruction else w + " tone",
             "table": {"freq": f, "loud": i}} for i, (w, f) in enumerate([("low", 300), ("high", 2000)] * 2)]
    task = Task("x", instruction, rows)
    model = build([task], tok)
    with pytest.raises(ValueError, match=message):
        _trainer(model, [task], tmp_path)


def _every_template_decodes(task, tok):
    plan = task.plan(tok)
    for template in range(len(plan.templates)):
        check_answer_layout(plan, template)


@pytest.mark.parametrize("name", TASKS.list())
def test_every_preset_passes_the_answer_layout_check(tok, name):
    """What the Trainer now checks when it is built (besides each objective's own checks, which
    were there before) holds for every template of every built-in task."""
    _every_template_decodes(load_preset(name, "train", limit=4), tok)


def test_every_suite_task_passes_the_answer_layout_check(tok):
    from moe_gen.quality.suite import EXTRA, SUITE, suite_tasks

    variants = [suite_tasks(["doc_topic", "spoken_word_classification"], pretrained_inputs=True),
                suite_tasks(["doc_topic"], bag_of_words=True),
                suite_tasks(["motion_classification"], pose_summary=True)]
    for suite_task in [*SUITE, *EXTRA, *(t for tasks in variants for t in tasks)]:
        _every_template_decodes(suite_task.build("train"), tok)
