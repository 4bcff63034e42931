"""Public entry points given the wrong kind of argument, twenty-sixth audit: each refuses it with a
ValueError naming what it takes (raw TypeErrors, AttributeErrors and IndexErrors from inside, or a
silently wrong result, before)."""

from __future__ import annotations

import pytest
import torch
from helpers import build, quiet

from moe_gen import merge_for_inference
from moe_gen.analysis import report
from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import GenerativeObjective
from moe_gen.tasks import Task, Tokenizer, collate
from moe_gen.trainer import Trainer
from moe_gen.trainer.evaluation import evaluate

ROWS = [{"q": f"question {i}", "a": "yes" if i % 2 else "no"} for i in range(6)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def task() -> Task:
    return Task("t", "[TEXT:q] -> [TEXT:a,closed_set]", ROWS)


@pytest.fixture(scope="module")
def model(task, tok):
    return build([task], tok)


@pytest.mark.parametrize("tasks, said", [
    (None, "takes a list of Task objects, got NoneType"),
    ("t", "takes a list of Task objects, got str"),
    (["t"], r"takes a list of Task objects; item 0 is a str \(a preset name: load_preset"),
])
def test_every_entry_point_taking_tasks_says_it_takes_a_list_of_tasks(task, tok, model, tmp_path, tasks, said):
    with pytest.raises(ValueError, match=rf"GeneralistModel.build {said}"):
        GeneralistModel.build(flavour("debug"), tasks, tok)
    with pytest.raises(ValueError, match=rf"Trainer {said}"):
        Trainer(model, tasks, quiet(steps=1), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"evaluate {said}"):
        evaluate(model, tasks)
    with pytest.raises(ValueError, match=rf"analyze {said}"):
        report.analyze(model, tasks)


def test_one_task_where_a_list_is_taken_is_told_to_pass_a_list(task, model):
    with pytest.raises(ValueError, match=r"got Task \(one task: pass \[task\]\)"):
        evaluate(model, task)


def test_a_build_or_trainer_given_the_wrong_object_names_what_it_takes(task, tok, model, tmp_path):
    with pytest.raises(ValueError, match="build takes a ModelConfig"):
        GeneralistModel.build({"d_model": 64}, [task], tok)
    with pytest.raises(ValueError, match="build takes a Tokenizer"):
        GeneralistModel.build(flavour("debug"), [task], None)
    with pytest.raises(ValueError, match="Trainer takes a TrainConfig"):
        Trainer(model, [task], {"steps": 1}, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="Trainer trains a GeneralistModel, got NoneType"):
        Trainer(None, [task], quiet(steps=1), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="merge_for_inference takes a model"):
        merge_for_inference("model")
    with pytest.raises(ValueError, match="analyze: no tasks given"):
        report.analyze(model, [])


@pytest.mark.parametrize("limit, batch_size", [("2", 64), (2.5, 64), (True, 64), (None, 1.5), (None, "4"), (None, 0)])
def test_evaluate_refuses_a_limit_or_batch_size_that_is_no_whole_number(task, model, limit, batch_size):
    with pytest.raises(ValueError, match=rf"task 't': evaluation needs limit >= 1 .* whole numbers; got "
                                         rf"limit={limit!r}, batch_size={batch_size!r}"):
        evaluate(model, [task], limit=limit, batch_size=batch_size)


def test_a_row_past_the_end_is_named_with_the_tasks_row_count(task, tok):
    with pytest.raises(IndexError, match=r"task 't' has 6 rows; there is no row 9"):
        task.encode(9, tok)


def test_collate_refuses_what_is_no_list_of_samples_or_no_task_vocabulary(task, tok, model):
    samples = [task.encode(i, tok) for i in range(2)]
    with pytest.raises(ValueError, match="collate takes a list of samples"):
        collate(samples[0], tok, model.task_ids)
    with pytest.raises(ValueError, match=r"item 1 is NoneType, not a sample"):
        collate([samples[0], None], tok, model.task_ids)
    with pytest.raises(ValueError, match="task_ids maps task names to ids"):
        collate(samples, tok, ["t"])
    with pytest.raises(ValueError, match=r"gives task 't' the id '0'"):
        collate(samples, tok, {"t": "0"})
    with pytest.raises(ValueError, match=r"gives task 't' the id -1"):
        collate(samples, tok, {"t": -1})
    with pytest.raises(ValueError, match="collate takes the model's tokenizer"):
        collate(samples, None, model.task_ids)
    with pytest.raises(ValueError, match="max_length must be a whole number"):
        collate(samples, tok, model.task_ids, pack=True, max_length="8")


def test_a_batch_collated_with_other_task_ids_than_the_models_is_refused_by_the_loss(task, tok, model):
    batch = collate([task.encode(i, tok) for i in range(2)], tok, {"t": 5})
    with pytest.raises(ValueError, match=r"task id 5, which the model does not have \(its tasks: 0: t\)"):
        GenerativeObjective(model)(batch)
    assert torch.isfinite(GenerativeObjective(model)(collate([task.encode(0, tok)], tok, model.task_ids))["loss"])


def test_saving_and_loading_need_a_folders_path(model, tmp_path):
    for bad in (None, 5):
        with pytest.raises(ValueError, match="save_pretrained takes a folder's path"):
            model.save_pretrained(bad)
        with pytest.raises(ValueError, match="from_pretrained takes a folder's path"):
            GeneralistModel.from_pretrained(bad)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        model.save_pretrained(str(tmp_path / "file"))


def test_a_seed_or_a_fraction_of_the_wrong_kind_is_named(task, model):
    import numpy as np

    with pytest.raises(ValueError, match=r"infer: seed must be a whole number, got 'a'"):
        model.infer(task, ROWS[:1], temperature=1.0, seed="a")
    assert len(model.infer(task, ROWS[:1], temperature=1.0, seed=np.int64(3))) == 1  # a numpy int is a whole number
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got '0.1'"):
        task.split_off("0.1")


def test_tags_built_by_hand_refuse_a_task_id_or_shape_of_the_wrong_kind():
    from moe_gen.routing.tags import TokenTags

    for task in ("t", 0.5, -1, True):
        with pytest.raises(ValueError, match="TokenTags.constant: task is a task id"):
            TokenTags.constant(3, task=task)
    with pytest.raises(ValueError, match=r"shape takes token counts >= 0, got \(2, -5\)"):
        TokenTags.constant((2, -5))
    assert TokenTags.constant((2, 3), task=2).task.tolist() == [[2, 2, 2], [2, 2, 2]]


def test_router_task_words_of_the_wrong_kind_are_named():
    from moe_gen.config import RouterConfig

    with pytest.raises(ValueError, match="router task_words lists each task's words"):
        RouterConfig(strategy="instruction", task_words=5)
    with pytest.raises(ValueError, match="router task_words lists each task's words"):
        RouterConfig(strategy="instruction", task_words=[5])


def test_a_missing_jsonl_file_names_its_task(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        Task("from_file", "[TEXT:q] -> [TEXT:a]", str(tmp_path / "missing.jsonl"))
    assert any("task 'from_file'" in note for note in getattr(error.value, "__notes__", []))


def test_candidates_outside_a_closed_set_are_refused_naming_them(task, model):
    with pytest.raises(ValueError, match=r"candidates \['zzz'\] are not labels of the closed set .*'no', 'yes'"):
        model.infer(task, ROWS[:1], candidates=["yes", "zzz"])
    assert model.infer(task, ROWS[:1], candidates=["yes", "no"])[0].text in ("yes", "no")
