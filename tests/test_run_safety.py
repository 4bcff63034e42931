"""Run safety: one run per output directory (a lock), and checkpoint writes that fail stop or flag the
run instead of being lost silently (issue 13, findings 1 and 2)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import mount_command

from moe_gen import distributed
from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer
from moe_gen.trainer.checkpoint import CheckpointError
from moe_gen.trainer.lock import LOCK_FILE, RunDirectoryInUse, RunLock
from moe_gen.trainer.logs import read_jsonl_log

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=20) for n in ("table_species", "motion_classification")]


def build(tasks, tok) -> GeneralistModel:
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), tasks, tok)


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "progress": False, "tensorboard": False, **kwargs})


def disk_full(monkeypatch, prefixes=("model", "optimizer"), steps=None):
    """Makes checkpoint shard writes fail with ENOSPC (at the given steps; every step when None)."""
    original = distributed.save_shards

    def failing(directory, prefix, tensors, plan):
        step = int(os.path.basename(directory).split("-")[1].split(".")[0])
        if prefix in prefixes and (steps is None or step in steps):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, prefix, tensors, plan)

    monkeypatch.setattr(distributed, "save_shards", failing)


# ---- finding 1: one run per directory -----------------------------------------------------------

def test_a_second_trainer_on_the_same_directory_is_refused(tasks, tok, tmp_path):
    first = Trainer(build(tasks, tok), tasks, quiet(steps=2), output_dir=str(tmp_path))
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and "host" in holder and "started" in holder
    with pytest.raises(RunDirectoryInUse, match="in use by another run") as refused:
        Trainer(build(tasks, tok), tasks, quiet(steps=2), output_dir=str(tmp_path))
    assert str(tmp_path) in str(refused.value) and "another trainer of this process" in str(refused.value)

    # from another thread too
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_refusal(tasks, tok, tmp_path)))
    thread.start()
    thread.join()
    assert errors and isinstance(errors[0], RunDirectoryInUse)

    first.fit()  # fit releases the directory when it ends
    assert not (tmp_path / LOCK_FILE).exists()
    second = Trainer(build(tasks, tok), tasks, quiet(steps=3), output_dir=str(tmp_path), resume=True)
    assert second.resumed_from is not None
    second.close()


def _refusal(tasks, tok, directory):
    try:
        Trainer(build(tasks, tok), tasks, quiet(steps=2), output_dir=str(directory))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_the_lock_is_released_when_fit_raises_and_held_through_a_with_block(tasks, tok, tmp_path, monkeypatch):
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=2), output_dir=str(tmp_path))
    monkeypatch.setattr(trainer, "train_step", lambda step, recorder=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.fit()
    assert not (tmp_path / LOCK_FILE).exists()
    with Trainer(build(tasks, tok), tasks, quiet(steps=1), output_dir=str(tmp_path / "b")) as held:
        held.fit()
        with pytest.raises(RunDirectoryInUse):  # still held after fit: evaluation and save_model follow
            RunLock(str(tmp_path / "b")).acquire()
        held.save_model(str(tmp_path / "b" / "model"))
    RunLock(str(tmp_path / "b")).acquire()


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    # flock: a killed holder leaves its file but not its lock
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": "x"}))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_without_flock_the_lock_file_is_the_lock_and_stale_ones_are_taken_over(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    import socket

    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "started": "x"}))  # dead pid
    first = RunLock(str(tmp_path))
    first.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirectoryInUse, match="another trainer of this process"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "x"}))
    with pytest.raises(RunDirectoryInUse, match="if no run uses it, delete"):
        RunLock(str(tmp_path)).acquire()


def _without_flock(monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)


@pytest.mark.parametrize("host, alive", [("another-host", "gone"), ("here", "another user's")])
def test_without_flock_a_lock_file_is_taken_over_only_when_its_process_is_gone_from_this_host(tmp_path, monkeypatch,
                                                                                            host, alive):
    """A pid of another host says nothing of this one's processes; one that ``os.kill`` may not signal
    (another user's) still runs."""
    import socket

    _without_flock(monkeypatch)
    if alive == "another user's":
        def kill(pid, signal):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "kill", kill)
    holder = {"pid": 999_999_999, "host": socket.gethostname() if host == "here" else host, "started": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(RunDirectoryInUse, match="process 999999999 on"):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder


def test_a_lock_taken_over_holds_only_its_own_record(tmp_path):
    """The stale holder's record was longer than the new one: the file must not keep its tail."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": "x" * 500}))
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_holds_the_file_at_its_path_when_the_file_it_locked_was_replaced_meanwhile(tmp_path, monkeypatch):
    """Between opening the lock file and locking it, its holder released (removing the file) and
    another run created a new one: the lock must be on the file at the path, or two runs hold it."""
    path, real, raced = tmp_path / LOCK_FILE, fcntl.flock, []

    def racing(fd, operation):
        if not raced:
            raced.append(True)
            path.unlink()
            path.write_text("{}")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing)
    with RunLock(str(tmp_path)):
        assert raced and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirectoryInUse):
            RunLock(str(tmp_path)).acquire()


def test_releasing_leaves_a_lock_file_another_run_made_since(tmp_path):
    """The holder's file was removed by hand and a second run took the directory: the first one's
    release must neither remove the second's file nor drop its lock."""
    first, second = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    first.acquire()
    (tmp_path / LOCK_FILE).unlink()
    second.acquire()
    first.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirectoryInUse):
        RunLock(str(tmp_path)).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_is_taken_once_and_released_without_leaking_its_file(tmp_path):
    lock = RunLock(str(tmp_path))
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    lock.acquire()
    with pytest.raises(RuntimeError, match="already held by this RunLock"):
        lock.acquire()
    lock.release()
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
    RunLock(str(tmp_path)).acquire()


def test_the_refusal_names_a_holder_of_another_host_with_our_pid_as_another_process(tmp_path):
    with RunLock(str(tmp_path)):
        holder = {"pid": os.getpid(), "host": "another-host", "started": "x"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(holder))  # the record a run elsewhere would write
        with pytest.raises(RunDirectoryInUse, match=f"process {os.getpid()} on another-host, started x"):
            RunLock(str(tmp_path)).acquire()


def _pretrain(output, *extra):
    return [sys.executable, "-m", "moe_gen.cli", "pretrain", "--config", "debug", "--output", str(output),
            "--train.tensorboard", "false", "--train.eval_limit", "2", *extra]


def test_a_second_pretrain_process_on_the_same_folder_exits_at_once(tmp_path):
    run = tmp_path / "run"
    # long enough (about 10 s) that the first is still training when the second has started up (5 s)
    first = subprocess.Popen(_pretrain(run, "--train.steps", "300", "--train.checkpoint_every", "100",
                                       "--train.batch_size", "4", "--train.log_every", "1"),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints").exists() and not (run / "logs").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        start = time.monotonic()
        second = subprocess.run(_pretrain(run, "--train.steps", "4", "--overwrite"), env=ENV, capture_output=True,
                                text=True, timeout=120)
        seconds = time.monotonic() - start
        still_running = first.poll() is None
        out, err = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
    assert still_running, "the first run ended before the second was refused: the test proves nothing"
    assert second.returncode == 1, second.stderr
    assert f"the run directory {run} is in use by another run (process {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr and seconds < 60
    # the first finished untouched: every step logged once, its own checkpoints, model and results
    assert first.returncode == 0, err
    assert [r["step"] for r in read_jsonl_log(str(run / "logs" / "train.jsonl"))] == list(range(1, 301))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000200", "step-0000300"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000300"
    assert json.loads((run / "checkpoints" / "step-0000300" / "trainer.json").read_text())["step"] == 300
    GeneralistModel.from_pretrained(str(run / "model"))
    assert json.loads((run / "eval.json").read_text())["summary"]["checkpoint_step"] == 300
    assert not (run / LOCK_FILE).exists()


# ---- finding 2: failed checkpoint writes ---------------------------------------------------------

def test_a_failed_first_checkpoint_stops_the_run_and_claims_nothing(tasks, tok, tmp_path, monkeypatch, capsys):
    disk_full(monkeypatch)
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=6, checkpoint_every=2), output_dir=str(tmp_path))
    with pytest.raises(CheckpointError) as stopped:
        trainer.fit()
    message = str(stopped.value)
    assert "stopping at step 2" in message and "No space left on device" in message
    assert "no checkpoint of this run exists" in message and "intact" not in message
    assert "intact" not in capsys.readouterr().out
    assert trainer.step == 2 and trainer.state["failed_checkpoints"] == 1
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.name.startswith("step-") for p in (tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / LOCK_FILE).exists()


def test_consecutive_failed_writes_stop_the_run_naming_the_latest_checkpoint(tasks, tok, tmp_path, monkeypatch,
                                                                             capsys):
    disk_full(monkeypatch, steps={2, 3, 4, 5, 6})
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=6, checkpoint_every=1, max_failed_checkpoints=2),
                      output_dir=str(tmp_path))
    with pytest.raises(CheckpointError) as stopped:
        trainer.fit()
    first = str(tmp_path / "checkpoints" / "step-0000001")
    printed = capsys.readouterr().out
    assert "the checkpoint of step 2 was not written" in printed and f"the latest checkpoint is {first}" in printed
    assert "stopping at step 3" in str(stopped.value) and "2 checkpoint writes in a row failed" in str(stopped.value)
    assert f"the latest checkpoint is {first} (step 1)" in str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]


def test_a_failed_write_between_good_ones_is_counted_in_the_summary(tasks, tok, tmp_path, monkeypatch):
    disk_full(monkeypatch, prefixes=("optimizer",), steps={2})
    summary = Trainer(build(tasks, tok), tasks, quiet(steps=3, checkpoint_every=1), output_dir=str(tmp_path)).fit()
    assert summary["failed_checkpoints"] == 1 and summary["checkpoint_step"] == 3
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step-0000003")


def test_pretrain_with_checkpoints_it_cannot_write_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")  # unwritable whoever runs the test (root included)
    result = subprocess.run(_pretrain(run, "--train.steps", "4", "--train.checkpoint_every", "2"), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "stopping at step 2" in result.stderr and "no checkpoint of this run exists" in result.stderr
    assert "the model was not saved" in result.stderr and "intact" not in result.stdout + result.stderr
    assert not (run / "model").exists() and not (run / "eval.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_pretrain_into_a_read_only_checkpoint_directory_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o500)
    try:
        result = subprocess.run(_pretrain(run, "--train.steps", "4", "--train.checkpoint_every", "2", "--resume"),
                                env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        (run / "checkpoints").chmod(0o700)
    assert result.returncode == 1 and "no checkpoint of this run exists" in result.stderr


def test_the_model_save_is_atomic_and_a_failed_one_is_reported(tasks, tok, tmp_path, monkeypatch, capsys):
    model = build(tasks, tok)
    target = tmp_path / "model"
    model.save_pretrained(str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        model.token_embedding.weight.add_(1.0)
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    monkeypatch.undo()
    model.save_pretrained(str(target))
    loaded = GeneralistModel.from_pretrained(str(target))
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_pretrain_that_cannot_save_its_model_says_what_is_saved(tmp_path, monkeypatch, capsys):
    from moe_gen.cli import main

    def full(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GeneralistModel, "save_pretrained", full)
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path), "--train.steps", "2",
                 "--train.tensorboard", "false", "--train.eval_limit", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"the model was not saved to {tmp_path / 'model'}" in err and "No space left on device" in err
    assert f"the latest checkpoint is {tmp_path / 'checkpoints' / 'step-0000002'} (step 2)" in err


def test_pretrain_on_a_full_disk_ends_non_zero_and_names_what_it_kept(tmp_path):
    """A real full disk: a 16 MiB tmpfs holds one debug checkpoint (12 MiB) and not a second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = mount_command(str(disk), "16m")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount rights)")
    run = disk / "run"
    pretrain = _pretrain(run, "--train.steps", "5", "--train.checkpoint_every", "1", "--train.batch_size", "4",
                         "--train.max_failed_checkpoints", "2")
    script = (f"mount -t tmpfs -o size=16m tmpfs {disk} && {' '.join(pretrain)}; "
              f"code=$?; echo FILES; ls -A {run} {run}/checkpoints; exit $code")
    result = subprocess.run([*prefix, "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=600)
    first = run / "checkpoints" / "step-0000001"
    assert result.returncode == 1, result.stderr
    assert "No space left on device" in result.stderr and "stopping at step 3" in result.stderr
    assert f"the latest checkpoint is {first} (step 1)" in result.stderr
    assert "the model was not saved" in result.stderr
    files = result.stdout.split("FILES", 1)[1].split()
    assert "step-0000001" in files and "step-0000002" not in files and "model" not in files


@pytest.mark.distributed
def test_under_torchrun_every_process_stops_together(tmp_path):
    """Two gloo processes: a busy directory is refused on both, and failing checkpoint writes stop both
    (no process left waiting in a collective)."""
    import socket

    def torchrun(output, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "pretrain.py")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(port), script, "--config", "debug",
                   "--output", str(output), "--train.steps", "4", "--train.checkpoint_every", "2",
                   "--train.eval_limit", "2", "--train.tensorboard", "false", *extra]
        return subprocess.run(command, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=240)

    unwritable = tmp_path / "unwritable"
    unwritable.mkdir()
    (unwritable / "checkpoints").write_text("not a directory")
    stopped = torchrun(unwritable)
    assert stopped.returncode != 0 and "no checkpoint of this run exists" in stopped.stderr
    busy = tmp_path / "busy"
    with RunLock(str(busy)):
        refused = torchrun(busy)
    assert refused.returncode != 0 and f"the run directory {busy} is in use" in refused.stderr
