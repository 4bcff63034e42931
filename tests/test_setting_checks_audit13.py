"""Settings refused when they are read, naming the setting (audit 13); each test failed before its fix."""

from __future__ import annotations

import math

import pytest

from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import MaskedObjective
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig


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
