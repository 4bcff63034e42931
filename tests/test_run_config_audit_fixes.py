"""Run-configuration defects found by an audit of instructions, configuration and the command
line (twelfth session); each test failed before its fix."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from moe_gen import cli
from moe_gen.cli import _model_config, load_run_config, yaml_load
from moe_gen.config import MoEConfig
from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_run_file_naming_a_section_twice_is_refused_with_both_lines(tmp_path):
    """(PyYAML kept the second ``train:`` and dropped the first's lr and steps silently.)"""
    path = tmp_path / "run.yaml"
    path.write_text("recipe: debug\ntrain:\n  lr: 1.0e-4\n  steps: 500\ntasks: [table_species]\ntrain:\n"
                    "  batch_size: 4\n")
    with pytest.raises(ValueError, match=r"found the key 'train' a second time \(first at line 2\) at line 6"):
        load_run_config(str(path))


def test_a_repeated_key_in_a_flag_mapping_is_refused_and_a_merge_key_may_be_overridden():
    with pytest.raises(ValueError, match=r"--train: .*found the key 'lr' a second time"):
        load_run_config("debug", ["--train", "{lr: 1.0e-4, lr: 5.0e-2}"])
    assert yaml_load("base: &b {lr: 1, steps: 2}\nrun:\n  <<: *b\n  lr: 3\n")["run"] == {"lr": 3, "steps": 2}


@pytest.mark.parametrize("flag, message", [
    (["--model.moe.capacity_factor", ".inf"], "MoELayers.capacity_factor must be a finite number > 0"),
    (["--model.norm_eps", ".inf"], "ModelConfig.norm_eps must be a finite number > 0, got inf"),
    (["--model.moe.router.weight_scale", ".inf"], "router weight_scale must be a finite number > 0, got inf"),
])
def test_non_finite_model_settings_are_refused_with_the_model_section(flag, message):
    """(inf passed "> 0": capacity_factor raised OverflowError at the first forward, norm_eps trained
    on zeros, weight_scale gave NaN losses whose steps were skipped while the run "succeeded".)"""
    with pytest.raises(ValueError, match=message):
        _model_config(load_run_config("debug", flag).model)


def test_a_moe_layer_refuses_an_infinite_capacity_factor():
    with pytest.raises(ValueError, match="MoEConfig.capacity_factor must be a finite number > 0 or None"):
        MoEConfig(d_model=8, d_hidden=16, num_experts=4, capacity_factor=math.inf)


def _output_dir_or_error(*args) -> str:
    try:
        return load_run_config(*args).output_dir
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("text", ["inf", "-Infinity", "nan", "١٢", "1e-3", "1_000"])
def test_a_flag_value_reads_as_the_same_text_in_a_run_file(tmp_path, text):
    """(Flags tried Python's int() and float() first: ``--output_dir inf`` was the number inf, refused
    as no string, where ``output_dir: inf`` in a file was the folder ``inf``.)"""
    path = tmp_path / "run.yaml"
    path.write_text(f"recipe: debug\noutput_dir: {text}\n", encoding="utf-8")
    assert _output_dir_or_error("debug", ["--output_dir", text]) == _output_dir_or_error(str(path))
    if text[-1].isalpha():
        assert load_run_config("debug", ["--output_dir", text]).output_dir == text


@pytest.mark.parametrize("flag, message", [
    (["--model.moe.experts.kind", "mlpp"],
     r"model.moe.experts.kind: unknown expert kind 'mlpp' \(did you mean 'mlp'\?\); known: glu, linear, mlp"),
    (["--model.moe.experts.activation", "gelo"], "model.moe.experts.activation: unknown expert activation 'gelo'"),
    (["--model.adapters", "{image_patchh: 48}"], "model.adapters: unknown adapter 'image_patchh'"),
])
def test_unknown_expert_and_adapter_names_are_refused_before_any_data_is_read(tmp_path, monkeypatch, capsys, flag,
                                                                               message):
    """(They were looked up when the model was built, after every task's train and test split was read.)"""
    read = []
    monkeypatch.setattr(cli, "_tasks", lambda names, split: read.append(split))
    assert cli.main(["pretrain", "--config", "debug", "--output", str(tmp_path), *flag]) == 2
    assert re.search(message, capsys.readouterr().err) and read == []


def test_masked_alpha_null_is_refused_and_masked_target_alpha_null_follows_masked_alpha():
    """(null emptied any mapping-typed field, masked_alpha's "a number or a mapping" too: {} gave every
    modality the α 1.0 of a modality not named, not the default 0.5.)"""
    with pytest.raises(ValueError, match="TrainConfig.masked_alpha must be a number or a mapping, got None"):
        load_run_config("image_generation", ["--train.masked_alpha", "null"])
    assert TrainConfig(masked_target_alpha=None).masked_target_alpha is None
    assert TrainConfig(modality_budget=None).modality_budget == {}  # (a plain mapping still empties)


@pytest.mark.parametrize("instruction, message", [
    ("[TEXT:q,adaptor=bag_of_words] -> [TEXT:a]",
     r"task 't': slot \[TEXT:q,adaptor=bag_of_words\]: preprocess=text makes tokens.*use preprocess=bag_of_words"),
    ("[IMAGE:img,preprocess=image_vq,adaptor=image_conv] -> [TEXT:a]", "preprocess=image_vq makes tokens"),
    ("[TEXT:q] -> [TEXT:a,adaptor=struct_cells]", r"task 't': slot \[TEXT:a,adaptor=struct_cells\]: preprocess=text"),
])
def test_an_adaptor_on_a_slot_that_makes_tokens_is_refused(instruction, message):
    """(The plan kept the adaptor and the model built no adapter: the slot was read as tokens.)"""
    rows = [{"q": "the cat sat", "a": "cat", "img": np.zeros((32, 32, 3), np.uint8)}]
    with pytest.raises(ValueError, match=message):
        Task("t", instruction, rows).plan(Tokenizer.default())


def test_an_adaptor_on_a_slot_of_feature_rows_still_picks_its_adapter():
    rows = [{"q": "the cat sat", "a": "cat", "img": np.zeros((32, 32, 3), np.uint8)}]
    plan = Task("t", "[IMAGE:img,adaptor=image_conv] -> [TEXT:a]", rows).plan(Tokenizer.default())
    assert plan.encode(rows[0], 0, training=False).encoder[0].adaptor == "image_conv"


def test_a_built_in_name_registered_before_the_tasks_load_is_refused_and_the_tasks_still_load():
    """(register did not load the built-ins first: the user's ``accuracy`` went in, then the built-in's
    registration raised inside ``import moe_gen.tasks``, and every task and metric lookup failed.)
    A fresh interpreter, where ``moe_gen.tasks`` has not loaded."""
    code = ("from moe_gen.registry import METRICS\n"
            "try:\n    METRICS.register('accuracy')(lambda *a, **k: 1.0)\n"
            "except ValueError as exc:\n    print('refused:', exc)\n"
            "from moe_gen.tasks import load_preset\n"
            "print(METRICS.get('accuracy').__module__, len(load_preset('table_species', 'train', limit=2)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    refused, loaded = done.stdout.strip().splitlines()
    assert refused.startswith("refused: metric 'accuracy' is already registered (by <function accuracy")
    assert loaded == "moe_gen.tasks.metrics 2"
