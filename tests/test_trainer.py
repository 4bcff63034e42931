"""The trainer: non-finite steps, what trains, fine-tuning on new tasks, evaluation, checkpoints
(atomic, exact resume) and the command line (task mixing and sampling: tests/test_mixing.py)."""

from __future__ import annotations

import collections
import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import build_attribute as build
from helpers import flavour_with, quiet

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.moe import MoE
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer, select_trainable

NAMES = ["digit_classification", "table_species", "motion_classification"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=40) for n in NAMES]


# ---- training ------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_logs_per_task(tasks, tok, tmp_path):
    model = build(tasks, tok)
    trainer = Trainer(model, tasks, quiet(steps=30, batch_size=12, lr=3e-3, warmup_steps=3, log_every=5),
                      output_dir=str(tmp_path))
    first = trainer.train_step(1)
    summary = trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "logs" / "train.jsonl")]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert summary["step"] == 30 and records[-1]["loss"] < first["loss"]
    last = records[-1]
    assert set(last["task_loss"]) <= set(NAMES) and last["tokens_per_s"] > 0
    assert sum(last["modality_share"].values()) == pytest.approx(1.0, abs=1e-3)
    moe_names = {name for name, m in model.named_modules() if isinstance(m, MoE)}
    assert set(last["expert_load"]) == moe_names
    assert all(sum(shares) == pytest.approx(1.0, abs=1e-3) for shares in last["expert_load"].values())
    assert last["expert_imbalance"] >= 1.0 and "IMAGE" in last["modality_expert_imbalance"]


def test_non_finite_steps_are_skipped_then_stop_the_run(tasks, tok, tmp_path):
    model = build(tasks, tok)
    trainer = Trainer(model, tasks, quiet(steps=10, batch_size=4, max_bad_steps=3), output_dir=str(tmp_path))
    objective = trainer.objectives["generative"]
    original = objective.__call__
    poisoned, calls = {2, 4, 5, 6}, collections.Counter()

    def maybe_nan(batch):
        out = original(batch)
        calls["n"] += 1
        if calls["n"] in poisoned:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.objectives["generative"] = type("Poisoned", (), {"__call__": staticmethod(maybe_nan),
                                                            "prepare": staticmethod(objective.prepare)})()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step(1)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    record = trainer.train_step(2)
    assert record["skipped"] and record["skipped_steps"] == 1
    # no update (the tag routers' selection biases follow each forward's loads, not the loss)
    assert all(torch.equal(after_first[k], v) for k, v in model.state_dict().items() if not k.endswith("balance_bias"))
    trainer.train_step(3)
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        for step in (4, 5, 6):
            trainer.train_step(step)


def test_trainable_selection_freezes_the_rest(tasks, tok):
    model = build(tasks, tok)
    for what, marker in (("experts", ".experts."), ("routers", ".router.")):
        count = select_trainable(model, what)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(marker in n for n in trainable)
        assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    select_trainable(model, "adapters")  # with their frame and stop heads
    assert all(n.startswith(("adapters.", "frame_heads.", "stop_heads.")) for n, p in model.named_parameters()
               if p.requires_grad)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        select_trainable(build(tasks, tok, every=0), "experts")



def test_trainable_experts_includes_the_shared_expert_and_its_gate(tasks, tok):
    """``trainable="experts"``: the routed experts' stacks, the shared expert and the gate on it
    (every MoE layer's), nothing else."""
    from moe_gen.config import ExpertsConfig

    model = build(tasks, tok, experts=ExpertsConfig(shared_expert=True, shared_gate=True))
    select_trainable(model, "experts")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    assert moes and all(m.shared is not None and m.shared_gate is not None for _, m in moes)
    expected = {f"{name}.{part}.{leaf}" for name, m in moes for part in ("experts", "shared", "shared_gate")
                for leaf, _ in getattr(m, part).named_parameters()}
    assert trainable == expected


def test_lr_scales_set_the_learning_rate_by_parameter_name_prefix(tasks, tok, tmp_path):
    """``lr_scales``: the longest matching prefix's multiplier; 0 freezes (AdamW moves nothing),
    the rest trains at ``lr``; the scaled groups follow the same schedule."""
    model = build(tasks, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = quiet(steps=3, lr=1e-2, warmup_steps=1, lr_scales={"encoder.": 0.0, "encoder.blocks.1.": 0.5})
    with Trainer(model, tasks, config, output_dir=str(tmp_path)) as trainer:
        lrs = {round(g["lr"] / trainer.optimizer.param_groups[0]["lr"], 6) for g in trainer.optimizer.param_groups}
        assert lrs == {1.0, 0.5, 0.0}
        trainer.fit()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert not any(n.startswith("encoder.blocks.0.") or n == "encoder.norm.weight" for n in moved)
    assert any(n.startswith("encoder.blocks.1.") for n in moved)
    assert any(n.startswith("decoder.") for n in moved)
    with pytest.raises(ValueError, match="lr_scales maps parameter-name prefixes"):
        quiet(lr_scales={"encoder.": -1})
    # a prefix no parameter has (a typo) trained everything at lr without a word
    with pytest.raises(ValueError, match=r"no parameter name starts with 'encoders\.' \(did you mean 'encoder\.'"):
        Trainer(model, tasks, quiet(steps=1, lr_scales={"encoders.": 0.1}), output_dir=str(tmp_path / "typo"))


def test_finetuning_adds_a_task_and_trains_only_its_new_adapter(tok, tmp_path):
    tables = load_preset("table_species", "train", limit=20)
    model = build([tables], tok)
    model.save_pretrained(str(tmp_path / "pre"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "pre"))
    digits = load_preset("digit_classification", "train", limit=20)  # images: needs a new adapter
    trainer = Trainer(loaded, [digits], quiet(steps=3, batch_size=4, trainable="new_adapters"),
                      output_dir=str(tmp_path / "ft"))
    assert trainer.new_adapters and "digit_classification" in loaded.task_ids
    # (taken once the trainer added the adapter: taken before, its new keys counted as "changed" even
    # if nothing trained)
    before = {k: v.detach().cpu().clone() for k, v in loaded.named_parameters()}
    trainer.fit()
    after = {k: v.detach().cpu() for k, v in loaded.named_parameters()}  # the trainer moved it to its device
    new = tuple(f"adapters.{a}." for a in trainer.new_adapters)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    trained = {k for k, v in loaded.named_parameters() if k.startswith(new) and v.requires_grad}
    assert changed and changed == trained  # every weight of the new adapter moved, nothing else
    # the fine-tuned model saves with its new task and reloads
    loaded.save_pretrained(str(tmp_path / "ft_model"))
    again = GeneralistModel.from_pretrained(str(tmp_path / "ft_model"))
    assert again.task_ids == loaded.task_ids


def test_evaluate_scores_every_task_kind(tok):
    names = ["digit_classification", "visual_grounding", "text_to_speech", "doc_topic"]
    train = [load_preset(n, "train", limit=4) for n in names]
    model = build(train, tok)
    trainer = Trainer(model, train, quiet(steps=1, eval_limit=3),
                      eval_tasks=[load_preset(n, "test", limit=3) for n in names])
    results = trainer.evaluate()
    assert set(results) == set(names)
    assert set(results["visual_grounding"]) == {"iou_accuracy"}
    assert results["text_to_speech"]["l1"] > 0
    assert all(0.0 <= v <= 1.0 for v in results["digit_classification"].values())


def test_one_step_equals_a_hand_written_step_with_accumulation_and_clipping(tasks, tok, tmp_path):
    """accumulate=2: every scored token of the step weighs alike (the two micro-batches' token
    cross-entropy summed over the step's tokens) and each micro-batch's routing losses by a half,
    clipped to norm 0.5, one AdamW step at the warm-up learning rate — computed by hand on a copy
    of the model."""
    import copy

    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import collate
    from moe_gen.tasks.batch import IGNORE_INDEX
    from moe_gen.trainer.trainer import WarmupCosine, _param_groups

    model = build(tasks, tok)
    twin = copy.deepcopy(model)
    # on the twin's device: an exact equivalence (CUDA sums in other orders, and draws other dropout)
    config = quiet(steps=10, batch_size=4, accumulate=2, clip_norm=0.5, warmup_steps=4, lr=1e-3, device="cpu")
    trainer = Trainer(model, tasks, config, output_dir=str(tmp_path))
    sampler = TaskSampler(tasks, tok, config)
    micro = [sampler.next_batch(1, m) for m in (0, 1)]
    record = trainer.train_step(1)

    objective = GenerativeObjective(twin)
    batches = [collate(samples, tok, twin.task_ids) for samples in micro]
    outs = [objective(batch) for batch in batches]
    counts = [int((batch.labels != IGNORE_INDEX).sum()) for batch in batches]
    assert counts[0] != counts[1]  # the micro-batches' token means weigh differently
    token_sum = sum(out["token_loss"] * n for out, n in zip(outs, counts))
    losses = [token_sum / sum(counts) + sum(out["loss"] - out["token_loss"] for out in outs) / 2]
    losses[0].backward()
    losses = [2 * losses[0].detach()]  # the record's loss is the step's: compared below as sum / 2
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    optimizer = torch.optim.AdamW(_param_groups(twin, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(4, 10, config.min_lr_ratio))
    optimizer.step()
    assert record["loss"] == pytest.approx(float(sum(losses).detach() / 2), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(float(norm), rel=1e-5) and record["lr"] == pytest.approx(2.5e-4)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss_average", ["token", "sample"])
def test_accumulated_micro_batches_give_one_large_batchs_gradient(tok, tmp_path, loss_average):
    """Two micro-batches of 4 rows and one batch of the same 8 rows give the same gradient when the
    rows' answers differ in length (1 to 12 words): each token (sample) weighs alike whichever
    micro-batch it fell in. Before, each micro-batch's mean counted a half, so a token of the
    short micro-batch weighed 9× one of the long (46% off)."""
    import random

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    r = random.Random(3)
    rows = [{"a": " ".join(r.choices(words, k=r.randint(1, 4))),
             "b": " ".join(r.choices(words, k=12 if i % 4 == 3 and i < 4 else 1 + i % 2))} for i in range(8)]
    task = Task("t", "[TEXT:a] -> [TEXT:b]", rows)
    grads, losses, token_losses = [], [], []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour_with("debug", every=0, dropout=0.0), [task], tok)
        trainer = Trainer(model, [task], quiet(steps=1, batch_size=batch_size, accumulate=accumulate, clip_norm=0,
                                               loss_average=loss_average, lr=1e-3),
                          output_dir=str(tmp_path / f"{loss_average}{accumulate}"))
        drawn = [sorted(s.index for s in trainer.sampler.next_batch(1, m)) for m in range(accumulate)]
        trainer.sampler.load_state_dict(TaskSampler([task], tok, trainer.config).state_dict())
        seen = {}

        def clip(clip=trainer._clip, seen=seen, model=model):  # the gradient the optimizer steps with
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            return clip()

        trainer._clip = clip
        record = trainer.train_step(1)
        losses.append(record["loss"])
        token_losses.append(record["token_loss"])
        trainer.close()
        grads.append(seen)
        assert sorted(sum(drawn, [])) == list(range(8))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the logged token loss is the step's too (it was the mean of the micro-batches' means)
    assert token_losses[0] == pytest.approx(token_losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_bf16_autocast_trains(tasks, tok, tmp_path):
    """Its blocks run under bf16 autocast (their matmuls in bf16), and the step's loss is the fp32
    step's within bf16's rounding, not the same bits."""
    losses = {}
    for precision in ("fp32", "bf16"):
        model = build(tasks, tok)
        seen = []
        block = model.encoder.blocks[0]
        block.register_forward_hook(lambda module, args, out, seen=seen: seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        trainer = Trainer(model, tasks, quiet(steps=2, batch_size=4, precision=precision),
                          output_dir=str(tmp_path / precision))
        records = [trainer.train_step(step) for step in (1, 2)]
        assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in records)
        assert seen and all(on == (precision == "bf16") for on, _ in seen)
        assert precision == "fp32" or all(dtype == torch.bfloat16 for _, dtype in seen)
        losses[precision] = records[0]["loss"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tasks, tok, tmp_path, monkeypatch, capsys):
    from moe_gen import distributed
    from moe_gen.trainer.checkpoint import latest_checkpoint

    model = build(tasks, tok)
    trainer = Trainer(model, tasks, quiet(steps=4, batch_size=4, checkpoint_every=2, tensorboard=True),
                      output_dir=str(tmp_path))
    trainer.train_step(1)
    trainer.step = 1
    first = trainer.save_checkpoint()
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    files = {p.name: p.stat().st_size for p in (tmp_path / "checkpoints" / "step-0000001").iterdir()}
    original = distributed.save_shards

    def failing(directory, prefix, tensors, plan):
        if prefix == "optimizer":
            raise OSError("disk full")
        return original(directory, prefix, tensors, plan)

    monkeypatch.setattr(distributed, "save_shards", failing)
    trainer.train_step(2)
    trainer.step = 2
    assert trainer.save_checkpoint() is None and "disk full" in capsys.readouterr().out
    assert latest_checkpoint(str(tmp_path / "checkpoints")) == first
    assert {p.name: p.stat().st_size for p in (tmp_path / "checkpoints" / "step-0000001").iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    monkeypatch.setattr(distributed, "save_shards", original)
    trainer.close()  # the run directory is free for the next run
    # the intact checkpoint resumes
    resumed = Trainer(build(tasks, tok), tasks, quiet(steps=4, batch_size=4), output_dir=str(tmp_path), resume=True)
    assert resumed.step == 1 and resumed.resumed_from == first
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, after_first[name]), name


def test_tensorboard_scalars_are_written(tasks, tok, tmp_path):
    model = build(tasks, tok)
    Trainer(model, tasks, quiet(steps=2, batch_size=4, log_every=1, tensorboard=True),
            output_dir=str(tmp_path)).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "tokens_per_s", "lr", "expert_imbalance"} <= set(tags)
    assert any(t.startswith("task_loss/") for t in tags) and any(t.startswith("modality_share/") for t in tags)
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_a_directory_with_checkpoints_needs_resume_or_overwrite(tasks, tok, tmp_path):
    Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path)).fit()
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path))
    fresh = Trainer(build(tasks, tok), tasks, quiet(steps=3, batch_size=4, checkpoint_every=1),
                    output_dir=str(tmp_path), overwrite=True)
    assert fresh.step == 0 and not (tmp_path / "checkpoints").exists()
    fresh.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000003"]


def test_resume_with_only_a_partial_checkpoint_starts_fresh(tasks, tok, tmp_path):
    partial = tmp_path / "checkpoints" / "step-0000004.partial"
    partial.mkdir(parents=True)
    (partial / "model-dense.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path))
    trainer = Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path), resume=True)
    assert trainer.step == 0 and trainer.resumed_from is None and not partial.exists()


def test_resume_without_the_latest_pointer_takes_the_highest_complete_checkpoint(tasks, tok, tmp_path, caplog):
    """Without ``latest`` (a run stopped between a checkpoint's rename and the pointer's write, or
    folders copied without it) resume=True deleted every complete checkpoint and started at step 0."""
    config = dict(batch_size=4, checkpoint_every=2, keep_checkpoints=5)
    Trainer(build(tasks, tok), tasks, quiet(steps=4, **config), output_dir=str(tmp_path)).fit()
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest").unlink()
    (checkpoints / "step-0000006.partial").mkdir()  # a torn write of a later step is not taken
    with caplog.at_level("WARNING", logger="moe_gen"):
        trainer = Trainer(build(tasks, tok), tasks, quiet(steps=6, **config), output_dir=str(tmp_path), resume=True)
    assert trainer.step == 4 and trainer.resumed_from.endswith("step-0000004")
    assert "no 'latest' file" in caplog.text and (checkpoints / "step-0000002" / "trainer.json").exists()
    trainer.close()


def test_a_resumed_run_takes_its_own_adamw_settings_and_names_those_that_changed(tasks, tok, tmp_path, caplog):
    """A resumed run followed a new ``lr`` but kept the checkpoint's weight decay, betas and eps
    without a word."""
    Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-8),
            output_dir=str(tmp_path)).fit()
    new = quiet(steps=4, batch_size=4, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-6)
    with caplog.at_level("WARNING", logger="moe_gen"):
        resumed = Trainer(build(tasks, tok), tasks, new, output_dir=str(tmp_path), resume=True)
    fresh = Trainer(build(tasks, tok), tasks, new, output_dir=str(tmp_path / "fresh"))
    for key in ("weight_decay", "betas", "eps"):
        assert [list(np.atleast_1d(g[key])) for g in resumed.optimizer.param_groups] == \
            [list(np.atleast_1d(g[key])) for g in fresh.optimizer.param_groups], key
    assert "AdamW settings differ" in caplog.text and "eps 1e-08 → 1e-06" in caplog.text
    resumed.close()
    fresh.close()


@pytest.mark.parametrize("file, damage, message", [
    ("trainer.json", b"{bad json", "trainer.json: not a readable checkpoint file (JSONDecodeError"),
    ("model-dense.safetensors", b"torn", "cannot read its model files"),
    ("optimizer-dense.safetensors", b"torn", "cannot read its optimizer files"),
    ("optimizer.json", b"[]", "optimizer.json: not a readable checkpoint file (no group_params"),
    ("rank-00000.json", b"{}", "rank-00000.json: not a readable checkpoint file (no sampler, rng)"),
])
def test_a_damaged_checkpoint_is_refused_naming_its_file(tasks, tok, tmp_path, file, damage, message):
    """Each of these raised the reader's own error (JSONDecodeError, SafetensorError, TypeError,
    KeyError: 'sampler') without naming the checkpoint file."""
    Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path)).fit()
    (tmp_path / "checkpoints" / "step-0000002" / file).write_bytes(damage)
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(build(tasks, tok), tasks, quiet(steps=4, batch_size=4), output_dir=str(tmp_path), resume=True)


def test_a_checkpoint_of_another_model_size_is_refused_as_not_fitting(tasks, tok, tmp_path):
    Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path)).fit()
    wider = build(tasks, tok, d_model=96, num_heads=4)
    with pytest.raises(ValueError, match=r"does not fit this model|trained another model than this run's \(d_model"):
        Trainer(wider, tasks, quiet(steps=4, batch_size=4), output_dir=str(tmp_path), resume=True)


def test_the_optimizer_uses_the_fused_kernel_only_on_plain_parameters(tasks, tok, tmp_path):
    from moe_gen.trainer.trainer import _fusable

    with Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4), output_dir=str(tmp_path)) as trainer:
        assert all(group["fused"] for group in trainer.optimizer.param_groups)
    assert not _fusable([{"params": [torch.zeros(2, requires_grad=True)]}])  # not a Parameter (an FSDP DTensor)
    assert not _fusable([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]}])
    assert not _fusable([{"params": []}])


def test_a_resumed_run_keeps_its_own_choice_of_fused_kernel(tasks, tok, tmp_path, monkeypatch):
    """The checkpoint restores AdamW's hyper-parameters and moments, but whether the update runs
    fused is the resuming process's choice (its parameters may be sharded now, or on another device)."""
    with Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path)) as first:
        first.fit()
        assert all(group["fused"] for group in first.optimizer.param_groups)
        saved = {name: first.optimizer.state[p]["exp_avg"].clone() for name, p in first.model.named_parameters()
                 if p in first.optimizer.state}
    monkeypatch.setattr("moe_gen.trainer.trainer._fusable", lambda groups: False)
    with Trainer(build(tasks, tok), tasks, quiet(steps=4, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path), resume=True) as resumed:
        assert resumed.step == 2
        assert not any(group.get("fused") for group in resumed.optimizer.param_groups)
        moments = {name: resumed.optimizer.state[p]["exp_avg"] for name, p in resumed.model.named_parameters()
                   if p in resumed.optimizer.state}
        assert moments.keys() == saved.keys() and all(torch.equal(moments[n], saved[n]) for n in saved)


def test_a_run_resumed_with_more_steps_follows_the_longer_schedule(tasks, tok, tmp_path, caplog):
    """Raising ``steps`` is how a finished run trains further: the resumed steps take the learning
    rates a run of the new length has at those steps (before, the checkpoint's schedule stayed, so
    the extension trained at the old run's floor), and a warning says the schedule changed."""
    def lrs(directory):
        with open(f"{directory}/logs/train.jsonl") as f:
            return [json.loads(line)["lr"] for line in f]

    settings = dict(batch_size=4, checkpoint_every=3, log_every=1, warmup_steps=1)
    with Trainer(build(tasks, tok), tasks, quiet(steps=3, **settings), output_dir=str(tmp_path / "a")) as first:
        first.fit()
    with caplog.at_level("WARNING", logger="moe_gen"), Trainer(
            build(tasks, tok), tasks, quiet(steps=6, **settings), output_dir=str(tmp_path / "a"),
            resume=True) as resumed:
        resumed.fit()
    assert "schedule differs" in caplog.text
    with Trainer(build(tasks, tok), tasks, quiet(steps=6, **settings), output_dir=str(tmp_path / "b")) as fresh:
        fresh.fit()
    extended, straight = lrs(tmp_path / "a"), lrs(tmp_path / "b")
    assert len(extended) == len(straight) == 6
    assert extended[3:] == straight[3:] and extended[2] < straight[2]  # step 3 was the short run's last


def test_a_run_whose_optimizer_held_the_frozen_image_tokenizer_resumes(tok, tmp_path, monkeypatch):
    """Before 2026-12-05 ``trainable="all"`` put the frozen image tokenizers' parameters in the
    optimizer (they never had state); such a checkpoint resumes under the rule that leaves them out."""
    from moe_gen.trainer import trainer as trainer_module

    image_tasks = [load_preset("digit_masked_modeling", "train", limit=8)]
    new_rule = trainer_module.select_trainable

    def old_rule(model, what, new_adapters=()):
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())

    monkeypatch.setattr(trainer_module, "select_trainable", old_rule)
    with Trainer(build(image_tasks, tok), image_tasks, quiet(steps=2, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path)) as first:
        first.fit()
        assert any(n.startswith("image_tokenizers.") for g in first.optimizer.param_groups for p in g["params"]
                   for n, q in first.model.named_parameters() if q is p)
    monkeypatch.setattr(trainer_module, "select_trainable", new_rule)
    with Trainer(build(image_tasks, tok), image_tasks, quiet(steps=4, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path), resume=True) as resumed:
        assert resumed.step == 2
        resumed.fit()
        assert resumed.step == 4


def test_a_run_saved_under_the_old_weight_decay_rule_resumes(tasks, tok, tmp_path, monkeypatch, caplog):
    """Before 2026-12-05 expert bias stacks and adapters' embedding tables took weight decay: the same
    parameters, grouped otherwise. Such a run resumes with its moments loaded by name and this run's
    decay per group (a warning says so)."""
    from moe_gen.trainer import optim as trainer_module  # (where the optimizer groups are made)

    new_rule = trainer_module._never_decayed
    monkeypatch.setattr(trainer_module, "_never_decayed",
                        lambda module_name, module, leaf: leaf == "bias" or "embedding" in module_name)
    with Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path)) as first:
        first.fit()
        saved = {name: first.optimizer.state[p]["exp_avg"].clone() for name, p in first.model.named_parameters()
                 if p in first.optimizer.state}
        decayed_before = {n for g in first.optimizer.param_groups if g["weight_decay"] for p in g["params"]
                          for n, q in first.model.named_parameters() if q is p}
    monkeypatch.setattr(trainer_module, "_never_decayed", new_rule)
    with caplog.at_level("WARNING", logger="moe_gen"), Trainer(
            build(tasks, tok), tasks, quiet(steps=4, batch_size=4, checkpoint_every=2), output_dir=str(tmp_path),
            resume=True) as resumed:
        assert resumed.step == 2 and "older weight-decay rule" in caplog.text
        decayed_now = {n for g in resumed.optimizer.param_groups if g["weight_decay"] for p in g["params"]
                       for n, q in resumed.model.named_parameters() if q is p}
        assert decayed_now < decayed_before and any(n.endswith("experts.b_in") for n in decayed_before - decayed_now)
        moments = {name: resumed.optimizer.state[p]["exp_avg"] for name, p in resumed.model.named_parameters()
                   if p in resumed.optimizer.state}
        assert moments.keys() == saved.keys() and all(torch.equal(moments[n], saved[n]) for n in saved)
        resumed.fit()
        assert resumed.step == 4



def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    """``WarmupCosine(2, 10, 0.1)`` worked by hand: step i of the warm-up at (i + 1) / 2, then
    0.1 + 0.9·½(1 + cos(π·(step − 2) / 8)): 1 at step 2, 0.55 half-way (step 6), the floor 0.1
    at step 10 and every step after (a run resumed with more steps stays at the floor)."""
    from moe_gen.trainer.optim import WarmupCosine

    schedule = WarmupCosine(2, 10, 0.1)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 6: 0.55, 10: 0.1, 14: 0.1}
    for step, factor in expected.items():
        assert schedule(step) == pytest.approx(factor, abs=1e-12), step
    assert WarmupCosine(0, 4, 0.0)(0) == 1.0 and WarmupCosine(0, 4, 0.0)(4) == pytest.approx(0.0, abs=1e-12)


def test_location_embedding_takes_no_weight_decay_and_old_checkpoints_name_the_flag(tasks, tok, tmp_path):
    """The location projection is an embedding (no weight decay, as the token table); a run saved
    before the flavours had location features is refused on resume with the flag that fits it."""
    from moe_gen.trainer.trainer import _param_groups

    model = build(tasks, tok)
    decay = {id(p): group["weight_decay"] for group in _param_groups(model, 0.01) for p in group["params"]}
    assert decay[id(model.location_embedding.weight)] == 0.0 == decay[id(model.token_embedding.weight)]
    with Trainer(build(tasks, tok, location_frequencies=0), tasks, quiet(steps=2, batch_size=4, checkpoint_every=2),
                 output_dir=str(tmp_path)) as old:
        old.fit()
    with pytest.raises(ValueError, match="resumes with --model.location_frequencies 0"):
        Trainer(build(tasks, tok), tasks, quiet(steps=4, batch_size=4), output_dir=str(tmp_path), resume=True)


def test_weight_decay_skips_every_bias_and_embedding_table(tasks, tok):
    """Decay on weight matrices and expert weight stacks only: not on expert bias stacks (2-D, one row
    per expert), nor on adapters' ``nn.Embedding`` tables (patch rows and columns, positions)."""
    from moe_gen.trainer.trainer import _param_groups

    model = build(tasks, tok)
    decay = {id(p): group["weight_decay"] for group in _param_groups(model, 0.01) for p in group["params"]}
    owners = {f"{m}.{n}" if m else n: module for m, module in model.named_modules()
              for n, _ in module.named_parameters(recurse=False)}
    params = dict(model.named_parameters())
    assert decay.keys() == {id(p) for p in params.values()}
    expected = {name: p.dim() >= 2 and not isinstance(owners[name], torch.nn.Embedding)
                and name.rsplit(".", 1)[1] not in ("bias", "b_in", "b_out") and "embedding" not in name
                for name, p in params.items()}
    for name, p in params.items():
        assert (decay[id(p)] > 0) == expected[name], name
    decayed = {name for name, on in expected.items() if on}
    assert any(name.endswith("experts.w_in") for name in decayed)
    assert any(name.endswith("experts.b_in") for name in params) and not any(n.endswith("b_in") for n in decayed)
    assert any(isinstance(owners[name], torch.nn.Embedding) and name.startswith("adapters.") for name in params)


# ---- weight averaging -------------------------------------------------------------------------------

def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_weight_average_is_an_ema_of_the_steps_and_is_what_evaluation_and_saving_use(tasks, tok, tmp_path):
    router = RouterConfig(strategy="attribute", tag_balance="bias", tag_balance_rate=0.05)
    model = build(tasks, tok, router=router)
    trainer = Trainer(model, tasks, quiet(steps=3, batch_size=4, ema_decay=0.5), output_dir=str(tmp_path / "run"))
    expected = None
    for step in (1, 2, 3):
        trainer.train_step(step)
        weights = _snapshot(model)
        expected = weights if expected is None else {n: 0.5 * expected[n] + 0.5 * w for n, w in weights.items()}
    average = trainer.trained_model()
    assert average is not model
    for name, p in average.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=1e-7, rtol=1e-6, msg=name)
    assert any(not torch.equal(p, expected[n]) for n, p in model.named_parameters())  # the model is not the average
    for (name, mine), theirs in zip(average.named_buffers(), model.buffers()):  # routing biases follow the model
        assert torch.equal(mine, theirs), name
    assert any("balance_bias" in n and bool(b.abs().sum() > 0) for n, b in average.named_buffers())

    trainer.save_model(str(tmp_path / "saved"))
    saved = GeneralistModel.from_pretrained(str(tmp_path / "saved"))
    for name, p in saved.named_parameters():  # loaded on the CPU; the run may have been on a GPU
        torch.testing.assert_close(p, expected[name].cpu(), atol=1e-7, rtol=1e-6, msg=name)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    from moe_gen.trainer.averaging import weight_average

    with pytest.raises(ValueError, match="expert_parallel"):
        weight_average(model, quiet(ema_decay=0.9), sharded=True)


def test_an_average_longer_than_half_the_run_is_warned_about(tasks, tok, caplog):
    from moe_gen.trainer.averaging import weight_average

    model = build(tasks, tok)
    with caplog.at_level("WARNING", logger="moe_gen"):
        weight_average(model, quiet(steps=1000, ema_decay=0.99), sharded=False)  # about 100 steps: fine
        assert not caplog.records
        weight_average(model, quiet(steps=300, ema_decay=0.999), sharded=False)
    assert "about 1000 steps, more than half of this run's 300" in caplog.text


def test_the_warning_starts_just_past_half_the_run(tasks, tok, caplog):
    """ema_decay 0.5 averages over exactly 2 steps: half of a 4-step run is not "more than half";
    0.99 (about 100 steps) in a 150-step run is, though it is shorter than the run."""
    from moe_gen.trainer.averaging import weight_average

    model = build(tasks, tok)
    with caplog.at_level("WARNING", logger="moe_gen"):
        weight_average(model, quiet(steps=4, ema_decay=0.5), sharded=False)
        assert not caplog.records
        weight_average(model, quiet(steps=150, ema_decay=0.99), sharded=False)
    assert "about 100 steps, more than half of this run's 150" in caplog.text


def test_a_bf16_model_is_averaged_in_fp32_and_the_average_is_in_eval_mode(tasks, tok):
    """Hand-worked EMA of a bf16 model: (1 - 0.9)·change would round away in bf16; the average keeps
    fp32 copies, updated as 0.9·average + 0.1·weights, and evaluates without dropout."""
    from moe_gen.trainer.averaging import update_average, weight_average

    model = build(tasks, tok).to(torch.bfloat16)
    average = weight_average(model, quiet(steps=100, ema_decay=0.9), sharded=False)
    assert not average.module.training
    assert all(p.dtype == torch.float32 for p in average.module.parameters())
    update_average(average, model)  # the first update copies the weights
    first = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.ones_like(p))
    update_average(average, model)
    now = {n: p.detach().float() for n, p in model.named_parameters()}
    for name, p in average.module.named_parameters():
        torch.testing.assert_close(p, 0.9 * first[name] + 0.1 * now[name], atol=1e-6, rtol=1e-6, msg=name)


def test_a_resumed_run_continues_the_same_weight_average(tasks, tok, tmp_path):
    config = quiet(steps=6, batch_size=4, ema_decay=0.8, checkpoint_every=3)
    straight = Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path / "straight"))
    straight.fit()

    first = Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path / "resumed"))
    for step in (1, 2, 3):
        first.train_step(step)
        first.step = step
    first.save_checkpoint()
    first.close()
    resumed = Trainer(build(tasks, tok), tasks, config, output_dir=str(tmp_path / "resumed"), resume=True)
    assert resumed.step == 3 and int(resumed.average.n_averaged) == 3
    resumed.fit()
    for (name, a), b in zip(straight.trained_model().named_parameters(), resumed.trained_model().parameters()):
        assert torch.equal(a, b), name

    # a run that kept no average resumes with ema_decay: the average starts from the resumed weights
    plain = Trainer(build(tasks, tok), tasks, quiet(steps=3, batch_size=4), output_dir=str(tmp_path / "plain"))
    plain.fit()
    averaged = Trainer(build(tasks, tok), tasks, quiet(steps=3, batch_size=4, ema_decay=0.9),
                       output_dir=str(tmp_path / "plain"), resume=True)
    for (name, a), b in zip(plain.model.named_parameters(), averaged.trained_model().parameters()):
        assert torch.equal(a, b), name


def test_logged_utilisation_counts_shares_before_rounding():
    """An expert at exactly the 1/(4E) floor is used; the log's shares are rounded to 4 decimals,
    which put it just under (0.0312 < 1/32) when utilisation was computed from them."""
    from types import SimpleNamespace

    from moe_gen.analysis.stats import utilisation
    from moe_gen.trainer.logs import routing_summary

    counts_E = torch.tensor([1.0, 3, 4, 4, 5, 5, 5, 5], dtype=torch.float64)
    tables = SimpleNamespace(counts_LETMR=counts_E.view(1, 8, 1, 1, 1), layer_names=["encoder.0"], num_experts=[8],
                             modality_names=["TEXT"], dropped_LTMR=torch.zeros(1, 1, 1, 1))
    summary = routing_summary(tables)
    assert float(utilisation(counts_E.view(1, 8))[0]) == 1.0
    assert summary["expert_utilisation"] == {"encoder.0": 1.0} and summary["mean_expert_utilisation"] == 1.0
    assert summary["expert_load"]["encoder.0"][0] == 0.0312


def test_eval_tasks_neither_trained_nor_known_are_refused_at_once(tasks, tok, tmp_path):
    model = build(tasks[:1], tok)
    with pytest.raises(ValueError, match=r"eval_tasks \['table_species'\] are neither trained in this run"):
        Trainer(model, tasks[:1], quiet(steps=1), output_dir=str(tmp_path / "run"), eval_tasks=tasks[:2])
    assert not (tmp_path / "run").exists()
