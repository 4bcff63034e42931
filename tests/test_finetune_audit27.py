"""Fine-tuning settings, twenty-seventh audit: ``trainable="routers"`` with fixed (hash) gates and
``lr_scales`` naming frozen parameters. Each test fails on the code before its fix."""

from __future__ import annotations

import pytest
from helpers import build, quiet

from moe_gen.config import RouterConfig
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import Trainer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def task():
    return load_preset("table_species", "train", limit=8)


def test_trainable_routers_with_fixed_gates_is_refused(tok, task, tmp_path):
    """A hash gate learns nothing: the run trained nothing, step after step, without a word."""
    model = build([task], tok, router=RouterConfig(strategy="attribute", gate="hash"))
    with pytest.raises(ValueError, match=r"trainable='routers' leaves nothing to train \(every router's gate is "
                                         r"fixed: hash\)"):
        Trainer(model, [task], quiet(steps=2, warmup_steps=0, trainable="routers"), output_dir=str(tmp_path))


def test_trainable_routers_trains_the_learned_gates(tok, task, tmp_path):
    model = build([task], tok, router=RouterConfig(strategy="attribute"))
    trainer = Trainer(model, [task], quiet(steps=1, warmup_steps=0, trainable="routers"), output_dir=str(tmp_path))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".router." in name for name in trained)
    trainer.close()


def test_lr_scales_naming_only_frozen_parameters_warns(tok, task, tmp_path):
    model = build([task], tok, router=RouterConfig(strategy="attribute"))
    with pytest.warns(UserWarning, match="lr_scales: 'adapters.' names only frozen parameters"):
        trainer = Trainer(model, [task], quiet(steps=1, warmup_steps=0, trainable="experts",
                                               lr_scales={"adapters.": 10.0}), output_dir=str(tmp_path))
    trainer.close()
