"""``RunLogger`` on its own: what ``train.jsonl`` and the TensorBoard scalars hold for a fresh run, a
resumed run and a run killed between two logged steps."""

from __future__ import annotations

import pytest

from moe_gen.trainer.logs import RunLogger, expert_utilisation, read_jsonl_log


def _record(step: int, loss: float, **extra) -> dict:
    return {"step": step, "loss": loss, "tokens_per_s": 100.0, **extra}


def _logger(tmp_path, start_step: int = 0, **options) -> RunLogger:
    return RunLogger(str(tmp_path), 10, start_step, progress=False, **{"tensorboard": False, **options})


def test_each_record_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    """A run killed between logged steps keeps every record logged before the kill."""
    logger = _logger(tmp_path)
    logger.log(_record(1, 2.5))
    try:
        assert read_jsonl_log(logger.path) == [_record(1, 2.5)]
    finally:
        logger.close()


def test_a_fresh_run_starts_a_fresh_log_and_a_resumed_one_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    logger = _logger(tmp_path)
    for step in (1, 2, 3):
        logger.log(_record(step, float(step)))
    logger.close()
    resumed = _logger(tmp_path, 2, resume_step=2)  # step 3 was logged after the checkpoint of step 2
    resumed.log(_record(3, 30.0))
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl_log(logger.path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    fresh = _logger(tmp_path)
    fresh.log(_record(1, 7.0))
    fresh.close()
    assert read_jsonl_log(logger.path) == [_record(1, 7.0)]


def test_the_utilisation_a_record_brings_is_logged_as_it_is(tmp_path):
    """The trainer computes utilisation from the exact shares (an expert at exactly the 1/(4E) floor
    is used) and logs the shares rounded: recomputing it from those (0.0312 < 1/32) would give 7/8."""
    load = {"encoder.0": [0.0312, 0.0938, 0.125, 0.125, 0.1562, 0.1562, 0.1562, 0.1562]}
    assert expert_utilisation(load)["expert_utilisation"] == {"encoder.0": 0.875}
    given = {"expert_utilisation": {"encoder.0": 1.0}, "mean_expert_utilisation": 1.0}
    logger = _logger(tmp_path)
    logger.log(_record(1, 1.0, expert_load=load, **given))
    logger.close()
    (record,) = read_jsonl_log(logger.path)
    assert {k: record[k] for k in given} == given


def test_utilisation_is_logged_to_four_decimals_and_its_mean_over_the_layers():
    """Three experts: used at a share of at least 1/12; one, two and two of them used."""
    load = {"a": [1.0, 0.0, 0.0], "b": [0.5, 0.5, 0.0], "c": [0.0, 0.6, 0.4]}
    assert expert_utilisation(load) == {"expert_utilisation": {"a": 0.3333, "b": 0.6667, "c": 0.6667},
                                        "mean_expert_utilisation": 0.5556}


def test_tensorboard_holds_each_scalar_and_dict_entry_by_step_and_a_resume_replaces_the_steps_after_it(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = _logger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        logger.log(_record(step, float(step), modality_share={"TEXT": 0.75, "IMAGE": 0.25}, note="text"))
    logger.close()
    resumed = _logger(tmp_path, 2, tensorboard=True, resume_step=2)
    resumed.log(_record(3, 30.0))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "tokens_per_s", "modality_share/TEXT", "modality_share/IMAGE"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [e.value for e in events.Scalars("modality_share/TEXT")] == [0.75, 0.75]
