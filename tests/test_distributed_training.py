"""The trainer under torchrun: 2 gloo processes with expert parallelism (and/or FSDP2 for the dense
parameters; DDP for replicated ones) write sharded checkpoints, a full model, logs; the shards load
on one process; a run resumed from a checkpoint after SIGKILL logs the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed_scenarios import _free_port

from moe_gen import distributed
from moe_gen.model import GeneralistModel

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STEPS = 12


def _torchrun_command(out, sharding, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            os.path.join(ROOT, "scripts", "pretrain.py"), "--config", "debug", "--output", str(out),
            "--train.sharding", sharding, "--train.steps", str(STEPS), "--train.checkpoint_every", "3",
            "--train.eval_limit", "4", "--train.log_every", "1", *extra]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# What gloo prints when a process ends while one of its threads still runs (a C++ std::terminate). Seen
# once in about 120 torchrun runs of these tests on this machine (tenth session), the cause not found:
# a scenario that hits it is run once more from scratch, with a warning; any other failure fails.
GLOO_ABORT = "terminate called without an active exception"


class _GlooAbort(Exception):
    pass


def _torchrun(command) -> subprocess.CompletedProcess:
    """Runs a torchrun command to its end; asserts it succeeded (raises ``_GlooAbort`` for gloo's abort)."""
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and GLOO_ABORT in done.stderr:
        raise _GlooAbort(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _once_more_after_a_gloo_abort(scenario, tmp_path) -> None:
    """``scenario(folder)``, and once more in a new folder if gloo aborted a process the first time."""
    import warnings

    try:
        scenario(tmp_path / "first")
    except _GlooAbort as abort:
        warnings.warn(f"gloo aborted a torchrun process; the scenario runs once more:\n{abort}", stacklevel=2)
        scenario(tmp_path / "second")


def test_torchrun_expert_parallel_pretraining_saves_shards_that_load_on_one_process(tmp_path):
    def scenario(folder):
        out = folder / "ep2"
        _torchrun([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   os.path.join(ROOT, "scripts", "pretrain.py"), "--config", "debug", "--output", str(out),
                   "--train.expert_parallel", "2", "--train.steps", "6", "--train.checkpoint_every", "3",
                   "--train.eval_limit", "4", "--train.log_every", "1"])
        checkpoint = out / "checkpoints" / "step-0000006"
        expert_files = sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("model-experts"))
        assert len(expert_files) == 2  # one shard per process
        assert (checkpoint / "rank-00000.json").exists() and (checkpoint / "rank-00001.json").exists()
        log = [json.loads(line) for line in open(out / "logs" / "train.jsonl")]
        assert [r["step"] for r in log] == list(range(1, 7)) and all(r["loss"] > 0 for r in log)

        # the full model written at the end equals the shards assembled on one process
        model = GeneralistModel.from_pretrained(str(out / "model"))
        weights = distributed.load_shards(str(checkpoint), "model", model)
        for name, value in model.state_dict().items():
            assert torch.equal(weights[name], value), name
        results = json.load(open(out / "eval.json"))["trained"]
        assert set(results) == {"digit_classification", "table_species", "motion_classification"}

    _once_more_after_a_gloo_abort(scenario, tmp_path)


def _killed_after_a_checkpoint(out, sharding, *extra) -> int:
    """Starts the run, kills torchrun and its workers (SIGKILL to the session) once a checkpoint
    exists; returns the step of that checkpoint."""
    import signal
    import time

    process = subprocess.Popen(_torchrun_command(out, sharding, *extra), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return int(latest.read_text().split("-")[1])


@pytest.mark.parametrize("sharding, ep, accumulate", [("fsdp", "1", "1"), ("fsdp", "2", "1"), ("replicate", "2", "2")])
def test_torchrun_pretraining_resumes_exactly_after_sigkill_and_saves_a_whole_model(tmp_path, sharding, ep,
                                                                                    accumulate):
    """FSDP2 (with and without expert parallelism) and DDP with expert parallelism, accumulating 2
    micro-batches (the first backward under ``no_sync``)."""
    ep = ("--train.expert_parallel", ep, "--train.accumulate", accumulate)

    def scenario(folder):
        out = folder / "run"
        _torchrun(_torchrun_command(out, sharding, *ep))
        log = [json.loads(line) for line in open(out / "logs" / "train.jsonl")]
        assert [r["step"] for r in log] == list(range(1, STEPS + 1)) and all(r["loss"] > 0 for r in log)

        # checkpoints hold whole tensors: they load on one process and equal the saved model
        model = GeneralistModel.from_pretrained(str(out / "model"))
        weights = distributed.load_shards(str(out / "checkpoints" / f"step-{STEPS:07d}"), "model", model)
        for name, value in model.state_dict().items():
            assert torch.equal(weights[name], value), name
        results = json.load(open(out / "eval.json"))["trained"]
        assert set(results) == {"digit_classification", "table_species", "motion_classification"}

        # killed after a checkpoint and resumed, the run logs the same losses and norms
        killed = folder / "killed"
        stopped_at = _killed_after_a_checkpoint(killed, sharding, *ep)
        assert stopped_at < STEPS
        _torchrun(_torchrun_command(killed, sharding, "--resume", *ep))
        resumed = [json.loads(line) for line in open(killed / "logs" / "train.jsonl")]
        assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in resumed] == [r["loss"] for r in log]
        assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in log]

    _once_more_after_a_gloo_abort(scenario, tmp_path)


def test_torchrun_data_parallel_keeps_one_weight_average_and_saves_it(tmp_path):
    """DDP (2 processes) with ``ema_decay``: the checkpoint's average is what the run saves as its
    model, and it is not the last weights; expert parallelism refuses an average, naming both."""
    def scenario(folder):
        out = folder / "run"
        _torchrun(_torchrun_command(out, "replicate", "--train.ema_decay", "0.5"))
        checkpoint = str(out / "checkpoints" / f"step-{STEPS:07d}")
        assert json.load(open(os.path.join(checkpoint, "trainer.json")))["averaged_steps"] == STEPS
        model = GeneralistModel.from_pretrained(str(out / "model"))
        average = distributed.load_shards(checkpoint, "average", model)
        last = distributed.load_shards(checkpoint, "model", model)
        for name, value in model.state_dict().items():
            assert torch.equal(average[name], value), name
        assert any(not torch.equal(last[n], v) for n, v in model.named_parameters())

    _once_more_after_a_gloo_abort(scenario, tmp_path)

    refused = subprocess.run(_torchrun_command(tmp_path / "ep", "replicate", "--train.ema_decay", "0.5",
                                               "--train.expert_parallel", "2"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "ema_decay=0.5 needs the whole model" in refused.stderr
