"""Settings refused when they are read, naming the setting (audit 13); each test failed before its fix."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moe_gen.cli import load_run_config, main
from moe_gen.model import GeneralistModel, ModelConfig, MoELayers, flavour
from moe_gen.objectives import MaskedObjective
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("name", ["masked_alpha", "masked_target_alpha"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_an_infinite_alpha_inside_a_mapping_is_refused(name, value):
    """It passed the check, then the first masked batch failed with "cannot convert float NaN to integer"."""
    with pytest.raises(ValueError, match=rf"TrainConfig.{name}\['IMAGE'\] must be a finite number >= 0, got"):
        TrainConfig(**{name: {"IMAGE": value, "TEXT": 0.5}})


def test_the_masked_objective_refuses_an_infinite_alpha():
    tasks = [load_preset("digit_masked_modeling", "train", limit=2)]
    model = GeneralistModel.build(flavour("debug", predict_all_features=True), tasks, Tokenizer.default())
    with pytest.raises(ValueError, match=r"masked_alpha\['IMAGE'\] must be a finite number >= 0, got inf"):
        MaskedObjective(model, alpha={"IMAGE": math.inf})


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig.from_dict({1: 2, "stpes": 3}), "TrainConfig keys must be names (strings), got 1"),
    (lambda: ModelConfig.from_dict({"moe": {"num_expert": 2, 3: 4}}), "MoELayers keys must be names (strings), got 3"),
    (lambda: ModelConfig(moe={"num_expert": 2, 3: 4}), "ModelConfig.moe keys must be names (strings), got 3"),
    (lambda: MoELayers(decoder_router={1: "hybrid"}), "MoELayers.decoder_router keys must be names (strings), got 1"),
    (lambda: flavour(["tiny"]), "a model flavour is a name (debug, tiny, small, base), got ['tiny']"),
])
def test_a_key_or_flavour_that_is_not_a_name_is_refused(build, message):
    """Each failed with a bare TypeError (sorting an int beside names, hashing a list)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("text, message", [
    ("recipe: debug\nmodel: {1: x, flavor: tiny}\n", "model keys must be names (strings), got 1"),
    ("recipe: debug\n1: x\ntask: [a]\n", "run configuration keys must be names (strings), got 1"),
    ("recipe: debug\ntrain: {1: 2, stpes: 3}\n", "TrainConfig keys must be names (strings), got 1"),
])
def test_a_run_file_key_that_is_not_a_name_is_refused(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(str(path))


@pytest.mark.parametrize("flags, message", [
    (["--model.flavour", "[tiny]"], "a model flavour is a name"),
    (["--model.moe.decoder_router", "{1: hybrid}"], "MoELayers.decoder_router keys must be names (strings), got 1"),
    (["--model", "null", "--model.init", "hf:minilm", "--model.upcycle", "{num_experts: 4, 2: x}"],
     "model.upcycle keys must be names (strings), got 2"),
])
def test_a_flag_with_a_key_or_flavour_that_is_not_a_name_exits_2(tmp_path, capsys, flags, message):
    """``moe-gen`` printed a traceback and exited 1."""
    code = main(["pretrain", "--config", "debug", "--tasks", "table_species", "--output", str(tmp_path / "run"),
                 "--train.steps", "1", *flags])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    ({"objective": "maskd"}, "task 'typo': unknown objective 'maskd' (did you mean 'masked'?); known: contrastive"),
    ({"objective": ["masked"]}, "task 'typo': unknown objective ['masked']"),
    ({"weight": math.nan}, "task 'typo': weight must be a finite number >= 0, got nan"),
    ({"weight": math.inf}, "task 'typo': weight must be a finite number >= 0, got inf"),
    ({"weight": -1}, "task 'typo': weight must be a finite number >= 0, got -1"),
    ({"weight": "2"}, "task 'typo': weight must be a finite number >= 0, got '2'"),
])
def test_a_task_checks_its_objective_and_weight(settings, message):
    """A misspelt objective was run by infer and evaluation as a generative task without a word."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Task("typo", "[TEXT:x] -> [TEXT:y]", [{"x": "a", "y": "b"}], **settings)


def test_the_trainer_refuses_an_unknown_objective_before_the_model_changes(tmp_path):
    """The Trainer refused it only after adding the task to the model."""
    torch.manual_seed(0)
    train = load_preset("table_species", "train", limit=4)
    model = GeneralistModel.build(flavour("debug"), [train], Tokenizer.default())
    new = Task("new_task", "[TEXT:x] -> [TEXT:y]", [{"x": "a", "y": "b"}])
    new.objective = "maskd"  # changed after Task checked it
    with pytest.raises(ValueError, match="task 'new_task': unknown objective 'maskd'"):
        Trainer(model, [train, new], TrainConfig(steps=1, progress=False, tensorboard=False),
                output_dir=str(tmp_path / "run"))
    assert model.config.tasks == ("table_species",)


def test_a_decoder_router_with_a_sequence_round_trips_through_json():
    """A tuple stayed a tuple through to_dict, came back from config.json as a list, and the configs
    differed; the same settings given as a RouterConfig stored lists."""
    import json

    from moe_gen.config import RouterConfig

    config = ModelConfig(moe=MoELayers(decoder_router={"balance_loss_groups": ("task",)}))
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig(moe=MoELayers(decoder_router=RouterConfig(balance_loss_groups=("task",)))) == config
    assert config.moe.router_for("decoder").balance_loss_groups == ("task",)
