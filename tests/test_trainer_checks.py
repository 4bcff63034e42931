"""Trainer behaviour the other trainer tests left open (found by mutation testing of
moe_gen/trainer/trainer.py): its refusals, gradient clipping switched off, steps skipped on a
non-finite gradient norm, what a step logs and counts, ``evaluate``'s arguments and the routing
numbers of the log."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import build_attribute as build
from helpers import quiet

from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import Trainer
from moe_gen.trainer.trainer import TrainingDiverged

NAMES = ["table_species", "motion_classification"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=12) for n in NAMES]


def _weights(model) -> dict:
    # (the tag routers' selection biases follow each forward's loads, not the optimizer)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("balance_bias")}


# ---- refusals and what is accepted ---------------------------------------------------------------

def test_two_tasks_of_one_name_are_refused_naming_it(tasks, tok, tmp_path):
    with pytest.raises(ValueError, match=r"distinct names; repeated: \['table_species'\]"):
        Trainer(build(tasks, tok), [tasks[0], tasks[1], tasks[0]], quiet(steps=1), output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_eval_tasks_the_model_knows_but_the_run_does_not_train_are_accepted(tasks, tok, tmp_path):
    """Fine-tuning on one task and scoring another the model was trained on before is allowed."""
    trainer = Trainer(build(tasks, tok), tasks[:1], quiet(steps=1, batch_size=4), output_dir=str(tmp_path),
                      eval_tasks=tasks[1:])
    assert [t.name for t in trainer.eval_tasks] == ["motion_classification"]
    trainer.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda_is_refused_naming_the_setting(tasks, tok, tmp_path):
    model = build(tasks, tok)
    with pytest.raises(ValueError, match=r"TrainConfig.device is 'cuda', but CUDA is not available here"):
        Trainer(model, tasks, quiet(steps=1, device="cuda"), output_dir=str(tmp_path))


def test_num_threads_sets_torchs_threads(tasks, tok, tmp_path):
    before = torch.get_num_threads()
    try:
        Trainer(build(tasks, tok), tasks, quiet(steps=1, num_threads=before + 1), output_dir=str(tmp_path)).close()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


# ---- one step: clipping, skipped steps, what it logs ---------------------------------------------

def test_clip_norm_0_leaves_the_gradients_as_they_are(tasks, tok, tmp_path):
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=1, clip_norm=0.0), output_dir=str(tmp_path))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    norm = trainer._clip()
    assert norm == pytest.approx(0.5 * sum(p.numel() for p in params) ** 0.5, rel=1e-5)
    assert all(bool((p.grad == 0.5).all()) for p in params)
    trainer.close()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # (the skipped first step)
def test_a_non_finite_gradient_norm_skips_the_step_and_only_bad_steps_in_a_row_stop_the_run(tasks, tok, tmp_path):
    """A finite loss with an infinite gradient is skipped like a non-finite loss; a good step in
    between starts the count of bad steps again, and the run stops at the third bad one in a row,
    saying which step and what the last loss and norm were."""
    model = build(tasks, tok)
    trainer = Trainer(model, tasks, quiet(steps=10, batch_size=4, warmup_steps=1, max_bad_steps=3),
                      output_dir=str(tmp_path))
    poison = {"on": False}
    param = dict(model.named_parameters())["decoder.blocks.0.norm_self.weight"]  # in every forward
    param.register_hook(lambda grad: grad + float("inf") if poison["on"] else grad)

    def step(n: int, bad: bool) -> dict:
        poison["on"] = bad
        return trainer.train_step(n)

    before = _weights(model)
    record = step(1, bad=True)
    assert record["skipped"] and record["skipped_steps"] == 1 and record["grad_norm"] == float("inf")
    assert abs(record["loss"]) < float("inf")  # a finite loss
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert not step(2, bad=False)["skipped"]
    step(3, bad=True)
    step(4, bad=True)  # two bad steps in a row since the good one: the run goes on
    assert trainer.state["bad_in_a_row"] == 2
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(up to step 5\)") as stopped:
        step(5, bad=True)
    assert "norm inf" in str(stopped.value) and f"last loss {stopped.value.record['loss']}" in str(stopped.value)
    trainer.close()


def test_a_step_logs_the_base_learning_rate_and_counts_its_tokens(tasks, tok, tmp_path):
    """With ``lr_scales`` the logged ``lr`` is that of the unscaled groups, and ``tokens_seen`` (kept
    in checkpoints) sums each step's positions (``tokens_per_s`` x ``step_time``)."""
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=10, batch_size=4, lr=1e-3, warmup_steps=0,
                                                      lr_scales={"encoder.": 0.1}), output_dir=str(tmp_path))
    assert sorted({round(g["lr"], 9) for g in trainer.optimizer.param_groups}) == [1e-4, 1e-3]
    records = [trainer.train_step(step) for step in (1, 2)]
    assert records[0]["lr"] == pytest.approx(1e-3)
    positions = sum(r["tokens_per_s"] * r["step_time"] for r in records)
    assert positions > 0 and trainer.state["tokens_seen"] == pytest.approx(positions, rel=1e-6)
    trainer.close()


def test_the_last_step_is_logged_when_it_is_no_multiple_of_log_every(tasks, tok, tmp_path):
    Trainer(build(tasks, tok), tasks, quiet(steps=3, batch_size=4, log_every=2), output_dir=str(tmp_path)).fit()
    records = [json.loads(line) for line in open(tmp_path / "logs" / "train.jsonl")]
    assert [r["step"] for r in records] == [2, 3]


def test_a_good_checkpoint_write_starts_the_count_of_failed_writes_again(tasks, tok, tmp_path, monkeypatch):
    """Writes failing at steps 2 and 4 with a good one between are not two in a row: the run ends,
    counting both."""
    import errno

    from moe_gen import distributed

    original = distributed.save_shards

    def failing(directory, prefix, tensors, plan):
        if prefix == "optimizer" and os.path.basename(directory).startswith(("step-0000002", "step-0000004")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, prefix, tensors, plan)

    monkeypatch.setattr(distributed, "save_shards", failing)
    summary = Trainer(build(tasks, tok), tasks, quiet(steps=5, batch_size=4, checkpoint_every=1,
                                                      max_failed_checkpoints=2), output_dir=str(tmp_path)).fit()
    assert summary["step"] == 5 and summary["failed_checkpoints"] == 2 and summary["checkpoint_step"] == 5


# ---- evaluate ------------------------------------------------------------------------------------

def test_evaluate_passes_its_tasks_and_limit_and_defaults_to_the_configs(tasks, tok, tmp_path, monkeypatch):
    from moe_gen.trainer import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "evaluate_tasks",
                        lambda model, tasks, limit, batch_size: calls.append(([t.name for t in tasks], limit)) or {})
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=1, eval_limit=7), output_dir=str(tmp_path),
                      eval_tasks=tasks[:1])
    trainer.evaluate()
    trainer.evaluate(tasks[1:], limit=None)  # None: every row
    trainer.evaluate(tasks, limit=3)
    assert calls == [(["table_species"], 7), (["motion_classification"], None), (NAMES, 3)]
    trainer.close()


# ---- log helpers ---------------------------------------------------------------------------------

def test_routing_summary_gives_each_modalitys_max_over_mean_load():
    from moe_gen.trainer.logs import routing_summary

    # one layer, two experts, modalities TEXT (1 and 3 assignments) and IMAGE (2 and 2)
    counts_EM = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    tables = SimpleNamespace(counts_LETMR=counts_EM.view(1, 2, 1, 2, 1), layer_names=["encoder.0"],
                             num_experts=[2], modality_names=["TEXT", "IMAGE"], dropped_LTMR=torch.zeros(1, 1, 2, 1))
    summary = routing_summary(tables)
    assert summary["modality_expert_imbalance"] == {"TEXT": 1.5, "IMAGE": 1.0}
    assert summary["expert_imbalance"] == pytest.approx(5 / 4)  # loads 3 and 5
    assert summary["expert_load"] == {"encoder.0": [0.375, 0.625]}


def test_a_part_whose_weights_are_all_zero_is_their_plain_mean():
    from moe_gen.trainer.trainer import _weighted_mean

    assert _weighted_mean([(2.0, 0.0), (4.0, 0.0)]) == 3.0
    assert _weighted_mean([(2.0, 1.0), (4.0, 3.0)]) == 3.5
