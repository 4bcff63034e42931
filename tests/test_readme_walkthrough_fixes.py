"""Defects found by following the README as a new user (2026-12-05, ninth session); each test
failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import flavour_with

from moe_gen.cli import _model_config, _parser
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_task_layers_registries_are_filled_after_import_moe_gen():
    """``moe_gen.TASKS.list()`` was empty (and ``TASKS.get`` refused every built-in name) until
    something imported ``moe_gen.tasks``; a fresh interpreter shows it."""
    code = ("import moe_gen; print(len(moe_gen.TASKS.list()), len(moe_gen.MODALITIES), "
            "'digit_classification' in moe_gen.TASKS, moe_gen.MODALITIES.get('IMAGE').name, len(moe_gen.METRICS) > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32", "9", "True", "IMAGE", "True"]


def test_a_misspelt_loss_weight_names_the_setting_the_user_set(tmp_path):
    """The objective's own check said ``task_weights`` (a different setting, for mixing)."""
    task = Task("table_species", "[TEXT:a] -> [TEXT:b]", [{"a": "x", "b": "y"}] * 4)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug"), [task], Tokenizer.default())
    config = TrainConfig(steps=1, loss_weights={"table_specis": 2.0}, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"TrainConfig.loss_weights names tasks the model does not know: "
                                         r"\['table_specis'\] \(did you mean 'table_species'\?\)"):
        Trainer(model, [task], config, output_dir=str(tmp_path))


def test_a_misspelt_model_key_is_answered_with_flavour_init_and_upcycle_among_the_known():
    with pytest.raises(ValueError, match=r"unknown model keys \['flavor'\] \(did you mean 'flavour'\?\); "
                                         r"known: .*flavour.*init.*upcycle"):
        _model_config({"flavor": "tiny"})


def test_the_commands_help_prints_one_example_a_line():
    """The examples ran together into one paragraph (argparse refilled the epilog)."""
    lines = _parser().format_help().splitlines()
    assert any(line.strip().startswith("moe-gen presets text_to_sql --json") for line in lines)
    assert sum(line.strip().startswith("moe-gen ") for line in lines) >= 8
