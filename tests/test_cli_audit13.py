"""``moe-gen eval`` and ``moe-gen infer`` on a model with tasks of its own (trained from Python, not
built in) say so and what to use, instead of "unknown task" (audit 13); the test failed before its fix."""

from __future__ import annotations

import json

import pytest
from helpers import build

from moe_gen.cli import main
from moe_gen.tasks import Task, Tokenizer, load_preset

OWN = "the model's own task 'sentiment' is not built in: the command line reads built-in tasks only"


def _sentiment():
    return Task("sentiment", "[TEXT:s] sentiment? -> [TEXT:y,closed_set]", [{"s": "i love it", "y": "pos"},
                                                                              {"s": "i hate it", "y": "neg"}])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model that knows only its own task, and one that knows a built-in task too."""
    root = tmp_path_factory.mktemp("models")
    build([_sentiment()], Tokenizer.default()).save_pretrained(str(root / "own"))
    build([load_preset("table_species", "train", limit=8), _sentiment()],
          Tokenizer.default()).save_pretrained(str(root / "mixed"))
    return root


@pytest.mark.parametrize("argv", [["eval", "own"], ["eval", "mixed", "--tasks", "sentiment"],
                                  ["infer", "own", "--task", "sentiment", "--rows", "1"]])
def test_the_model_s_own_task_is_refused_with_the_reason(models, capsys, argv):
    """The answer was "unknown task 'sentiment'; known: <the presets>", as if the name were misspelt."""
    argv = [str(models / a) if a in ("own", "mixed") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert OWN in err and "model.infer(Task('sentiment', instruction, rows), rows)" in err
    assert "unknown task" not in err


def test_eval_by_default_scores_the_built_in_tasks_and_names_those_left_out(models, capsys):
    assert main(["eval", str(models / "mixed"), "--limit", "2"]) == 0
    out, err = capsys.readouterr()
    assert "| table_species |" in out and "sentiment" not in out
    assert f"moe-gen eval: warning: evaluating the model's built-in tasks only; {OWN}" in err


def test_a_misspelt_name_is_still_answered_with_the_known_tasks(models, capsys):
    assert main(["infer", str(models / "own"), "--task", "sentimen", "--rows", "1"]) == 2
    assert "unknown task 'sentimen'" in capsys.readouterr().err


def test_a_built_in_task_still_answers(models, capsys):
    assert main(["infer", str(models / "mixed"), "--task", "table_species", "--rows", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["row"] == 0
