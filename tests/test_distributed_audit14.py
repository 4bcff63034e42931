"""What the fourteenth audit found in training on several processes, each pinned: a checkpoint write
that fails on one process under FSDP ends in ``CheckpointError`` on every process and training goes
on (the processes no longer part in FSDP's gathers and wait for the timeout), and the expert-shard
helpers refuse a wrapper's state_dict given with the plan. The launch machinery is
``distributed_scenarios`` (a hang fails within its collective timeout)."""

from __future__ import annotations

import re

import pytest
from distributed_scenarios import Launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("settings, where", [
    ({"sharding": "fsdp"}, "dense"),
    ({"sharding": "fsdp"}, "makedirs"),
    ({"sharding": "fsdp", "expert_parallel": 2}, "experts"),
], ids=["fsdp-dense-file", "fsdp-folder", "ep-fsdp-expert-file"])
def test_a_checkpoint_write_failing_on_one_process_under_fsdp_lets_every_process_train_on(tmp_path, settings,
                                                                                          where):
    """The failing process skipped FSDP's gathers of the weights and AdamW moments that the others
    went on into: both waited until the process group's timeout, then crashed with gloo's error."""
    (_, info0), (_, info1) = Launch("checkpoint_write_fails", tmp_path, settings, where).results()
    assert info0["error"] is None and info1["error"] is None, (info0, info1)
    assert info0["failed"] or info1["failed"]  # the simulated failure happened
    for info in (info0, info1):
        assert (info["step"], info["checkpoint_step"], info["failed_checkpoints"]) == (2, 1, 1), info
    assert info0["entries"] == ["latest", "step-0000001"]  # nothing half-written is left


def test_expert_shard_helpers_given_the_plan_refuse_a_wrappers_keys(tmp_path):
    """Keys such as ``model.ffn.experts.w_in`` missed the plan's names, so each rank's expert slice
    passed for a dense tensor: rank 0 saved its 2 experts as the whole 4-expert layer, and loading
    gave rank 1 rank 0's experts, without an error."""
    (_, info0), (_, info1) = Launch("wrapper_keys_with_plan", tmp_path).results()
    for info in (info0, info1):
        save, load = info["errors"]["save_shards"], info["errors"]["load_shards"]
        assert save is not None and "save_shards got 'model.ffn.experts.w_in'" in save, save
        assert "ends with its expert parameter 'ffn.experts.w_in'" in save
        assert "pass the sharded model's own state_dict()" in save
        assert load is not None and re.search(r"hold 'model\.(\w+)\.experts\.(\w+)'.* ends with its expert "
                                              r"parameter '\1\.experts\.\2'", load), load
        assert "save them from the sharded model's own state_dict()" in load
    assert not (tmp_path / "saved").exists()  # refused before anything was written
