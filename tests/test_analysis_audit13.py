"""Defects a thirteenth audit found in the routing-analysis report (2026-12-06): the held-out loss of a
model trained with label smoothing, and models sharded over processes (FSDP, expert parallelism)."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_gen.analysis import report
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, load_preset


def test_the_held_out_loss_is_the_plain_cross_entropy_whatever_the_label_smoothing():
    """The loss read ``model.config.label_smoothing``: the same weights reported 0.1's smoothed loss,
    a training setting, as their held-out loss."""
    tasks = [load_preset("table_species", "test"), load_preset("digit_classification", "test")]
    torch.manual_seed(0)
    plain = GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default())
    smoothed = copy.deepcopy(plain)
    smoothed.config = smoothed.config.replace(label_smoothing=0.1)
    losses = [report.analyze(m, tasks, limit=8, interference_rows=0).evaluation for m in (plain, smoothed)]
    for task in tasks:
        assert losses[1][task.name]["loss"] == pytest.approx(losses[0][task.name]["loss"], rel=1e-6), task.name
    assert smoothed.config.label_smoothing == 0.1  # put back


@pytest.mark.distributed
def test_a_model_sharded_over_processes_is_refused_with_the_whole_model_to_pass(tmp_path):
    """On FSDP shards, analyze failed with PyTorch's DTensor errors (gradients and similarities mixed
    DTensors with plain tensors); with experts spread over processes it ran and silently left every
    layer out of the expert similarity."""
    from distributed_scenarios import Launch

    for _, info in Launch("analyze_sharded", tmp_path).results():
        for name in ("analyze", "expert_similarity", "task_gradients"):
            experts, fsdp = info[f"experts/{name}"], info[f"fsdp/{name}"]
            assert experts is not None and experts.startswith(f"{name}: the model's experts are spread over processes")
            assert "layers decoder.blocks.0.ffn" in experts and "GeneralistModel.from_pretrained" in experts
            assert fsdp is not None and fsdp.startswith(f"{name}: the model's parameters are FSDP shards")
            assert "trainer.trained_model() or moe_gen.fsdp.unsharded_copy(model)" in fsdp
        assert info["copy_loss"] == pytest.approx(info["whole_loss"], rel=1e-5)  # the copy it points to is the model
