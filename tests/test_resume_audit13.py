"""What the thirteenth audit found in checkpoints and resume, each pinned: other values of the same
``lr_scales`` prefixes resume whatever groups they make, a run killed while saving its step again
resumes from the earlier copy, a run resumed at its last step reports that step's loss, and a
process that sees fewer GPUs than the saving one restores the CUDA random states it can."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=6) for n in ("digit_classification", "table_species")]


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, "batch_size": 4, "log_every": 1,
                          "warmup_steps": 2, "num_threads": 1, **kwargs})


def _build(tok, tasks):
    torch.manual_seed(0)
    return GeneralistModel.build(flavour_with("debug", router=RouterConfig(strategy="attribute")), tasks, tok)


def _moments(trainer) -> dict[str, dict]:
    return {name: {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
            for name, p in trainer.model.named_parameters() if p in trainer.optimizer.state}


def _scale(name: str, lr_scales: dict) -> float:
    matches = [prefix for prefix in lr_scales if name.startswith(prefix)]
    return float(lr_scales[max(matches, key=len)]) if matches else 1.0


@pytest.mark.parametrize("first, second", [
    ({"encoder.": 0.1, "decoder.": 0.5}, {"encoder.": 0.1, "decoder.": 0.05}),  # the groups reorder
    ({"encoder.": 0.5, "decoder.": 0.5}, {"encoder.": 1.0, "decoder.": 1.0}),  # merge (with lr's own)
    ({"encoder.": 0.1, "decoder.": 0.1}, {"encoder.": 0.1, "decoder.": 0.2}),  # split
])
def test_other_lr_scales_values_resume_with_each_parameters_moments_at_its_new_rate(tok, tasks, tmp_path, first,
                                                                                   second):
    with Trainer(_build(tok, tasks), tasks, _config(steps=4, lr_scales=first), output_dir=str(tmp_path)) as run:
        for step in (1, 2):
            run.train_step(step)
            run.step = step
        run.save_checkpoint()
        saved = _moments(run)
    with Trainer(_build(tok, tasks), tasks, _config(steps=4, lr_scales=second), output_dir=str(tmp_path),
                 resume=True) as resumed:
        assert resumed.step == 2
        loaded = _moments(resumed)
        assert loaded.keys() == saved.keys()
        for name, entry in saved.items():
            assert entry.keys() == loaded[name].keys()
            assert all(torch.equal(entry[key], loaded[name][key]) for key in entry), name
        factor = resumed.scheduler.lr_lambdas[0](2)
        names = {id(p): n for n, p in resumed.model.named_parameters()}
        for group in resumed.optimizer.param_groups:
            for p in group["params"]:
                expected = resumed.config.lr * _scale(names[id(p)], second) * factor
                assert group["lr"] == pytest.approx(expected, rel=1e-12), names[id(p)]
        assert resumed.scheduler.get_last_lr() == [g["lr"] for g in resumed.optimizer.param_groups]
        resumed.fit()  # AdamW steps on with the loaded moments
        assert resumed.step == 4


class _Killed(BaseException):
    """The process dies here: nothing after it runs (no ``except Exception`` clean-up)."""


def test_a_run_killed_while_saving_its_step_again_resumes_from_the_earlier_copy(tok, tasks, tmp_path, monkeypatch,
                                                                               caplog):
    checkpoints = tmp_path / "checkpoints"
    with Trainer(_build(tok, tasks), tasks, _config(steps=2), output_dir=str(tmp_path)) as run:
        run.fit()
        weights = {k: v.clone() for k, v in run.model.state_dict().items()}
        real = os.replace

        def killed_after_moving_the_old_copy(src, dst):
            real(src, dst)
            if str(dst).endswith("step-0000002.old"):
                raise _Killed()

        monkeypatch.setattr(os, "replace", killed_after_moving_the_old_copy)
        with pytest.raises(_Killed):
            run.save_checkpoint()  # the same step again (as save_model does under expert parallelism)
        monkeypatch.setattr(os, "replace", real)
    assert (checkpoints / "latest").read_text() == "step-0000002" and not (checkpoints / "step-0000002").exists()
    with caplog.at_level("WARNING", logger="moe_gen"), Trainer(
            _build(tok, tasks), tasks, _config(steps=2), output_dir=str(tmp_path), resume=True) as resumed:
        assert resumed.step == 2 and "step-0000002.old, is renamed back" in caplog.text
        assert all(torch.equal(weights[k], v) for k, v in resumed.model.state_dict().items())
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002", "step-0000002.partial"]
        # a stale earlier copy (killed after the new copy was in) goes with the next save of the step
        shutil.copytree(checkpoints / "step-0000002", checkpoints / "step-0000002.old")
        resumed.save_checkpoint()
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002"]


def test_a_run_resumed_at_its_last_step_reports_the_loss_of_that_step(tok, tasks, tmp_path):
    with Trainer(_build(tok, tasks), tasks, _config(steps=2), output_dir=str(tmp_path)) as run:
        first = run.fit()
    with Trainer(_build(tok, tasks), tasks, _config(steps=2), output_dir=str(tmp_path), resume=True) as resumed:
        again = resumed.fit()  # no step left to run
    assert first["loss"] is not None and again["loss"] == first["loss"]
    assert {k: again[k] for k in ("step", "skipped_steps", "checkpoint_step")} == \
        {k: first[k] for k in ("step", "skipped_steps", "checkpoint_step")}


def test_cuda_random_states_of_more_devices_than_this_process_sees_restore_those_it_has(monkeypatch, caplog):
    """A checkpoint written where a process saw 2 GPUs, resumed where it sees 1 (torch's
    ``set_rng_state_all`` sets device i's generator for the i-th state: an IndexError past them)."""
    from moe_gen.trainer import checkpoint

    generators = [[]]  # one visible device: its generator's states, as set

    def set_rng_state_all(states):
        for i, state in enumerate(states):
            generators[i].append(state)  # (torch.cuda.default_generators[i].set_state)

    state = checkpoint._rng_state()
    state["cuda"] = [[1, 2, 3], [4, 5, 6]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    with caplog.at_level("WARNING", logger="moe_gen"):
        checkpoint._set_rng_state(state)
    assert len(generators[0]) == 1 and generators[0][0].tolist() == [1, 2, 3]
    assert "CUDA random states of 2 devices and this process sees 1" in caplog.text
