"""What an audit of checkpoints and resume found (2026-12-05, eighth session), each pinned: a
resumed run must be the run it continues (same batches, same model, same multipliers), a
fine-tuning run resumes with the model it trained, and checkpointing keeps gradients equal with
the windowed balance loss under the contrastive objective."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer
from moe_gen.trainer.logs import read_jsonl_log


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, "batch_size": 4, "log_every": 1,
                          "warmup_steps": 2, **kwargs})


def _build(tok, tasks, **overrides):
    torch.manual_seed(0)
    overrides.setdefault("router", RouterConfig(strategy="attribute"))
    return GeneralistModel.build(flavour_with("debug", **overrides), tasks, tok)


def _two_steps(tok, tasks, directory, config=None, **overrides):
    with Trainer(_build(tok, tasks, **overrides), tasks, config or _config(steps=4), output_dir=directory) as t:
        for step in (1, 2):
            t.train_step(step)
            t.step = step
        t.save_checkpoint()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=6) for n in ("digit_classification", "table_species")]


def test_checkpointing_keeps_the_windowed_balance_gradients_under_the_contrastive_objective(tok, tmp_path):
    retrieval = [load_preset("image_text_retrieval", "train", limit=6)]
    norms = []
    for checkpointing in (False, True):
        router = RouterConfig(strategy="attribute", tag_balance="loss", tag_balance_window=3)
        trainer = Trainer(_build(tok, retrieval, router=router), retrieval,
                          _config(steps=2, activation_checkpointing=checkpointing),
                          output_dir=str(tmp_path / str(checkpointing)))
        trainer.fit()
        norms.append([r["grad_norm"] for r in read_jsonl_log(str(tmp_path / str(checkpointing) / "logs" /
                                                                  "train.jsonl"))])
    assert norms[0] == norms[1]  # the recomputation read the average the second pass had moved


@pytest.mark.parametrize("change, message", [
    ({"seed": 7}, r"seed 0 → 7\): the resumed run would draw other batches"),
    ({"batch_size": 2}, r"batch_size 4 → 2"),
    ({"mixing": "uniform"}, r"mixing 'temperature' → 'uniform'"),
    # a modality budget and a token cap decide which rows a step keeps (they were only warned of)
    ({"modality_budget": {"IMAGE": 40}}, r"modality_budget \{\} → \{'IMAGE': 40\}"),
    ({"max_tokens": 300}, r"max_tokens None → 300"),
])
def test_a_resume_that_would_draw_other_batches_is_refused(tok, tasks, tmp_path, change, message):
    _two_steps(tok, tasks, str(tmp_path))
    with pytest.raises(ValueError, match=message):
        Trainer(_build(tok, tasks), tasks, _config(steps=4, **change), output_dir=str(tmp_path), resume=True)


def test_a_resume_with_another_model_is_refused_with_the_flag_that_resumes_it(tok, tasks, tmp_path, caplog):
    _two_steps(tok, tasks, str(tmp_path))
    message = r"another model than this run's \(moe.router.noise 'none' → 'gaussian'\): the checkpoint resumes with "
    with pytest.raises(ValueError, match=message + r"--model.moe.router.noise \"none\""):
        Trainer(_build(tok, tasks, router=RouterConfig(strategy="attribute", noise="gaussian")), tasks,
                _config(steps=4), output_dir=str(tmp_path), resume=True)
    with caplog.at_level(logging.WARNING, logger="moe_gen"):  # what a run may change: warned, or not at all
        resumed = Trainer(_build(tok, tasks, dropout=0.2), tasks, _config(steps=4, log_every=2, loss_weights={
            "table_species": 2.0}), output_dir=str(tmp_path), resume=True)
    assert resumed.step == 2
    assert "dropout 0.0 → 0.2" in caplog.text and "loss_weights" in caplog.text and "log_every" not in caplog.text
    resumed.close()


def test_a_task_whose_rows_changed_is_refused(tok, tasks, tmp_path):
    _two_steps(tok, tasks, str(tmp_path))
    more = [tasks[0], load_preset("table_species", "train", limit=7)]
    with pytest.raises(ValueError, match="trained another model|had 6 rows when the checkpoint was written"):
        Trainer(_build(tok, more), more, _config(steps=4), output_dir=str(tmp_path), resume=True)
    sampler = TaskSampler(more, tok, _config(steps=4))
    state = TaskSampler(tasks, tok, _config(steps=4)).state_dict()
    with pytest.raises(ValueError, match="task 'table_species' had 6 rows when the checkpoint was written and has 7"):
        sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="row orders of seed 0, and this run's seed is 7"):
        TaskSampler(tasks, tok, _config(steps=4, seed=7)).load_state_dict(state)


def test_new_lr_scales_prefixes_with_as_many_groups_are_refused(tok, tasks, tmp_path):
    _two_steps(tok, tasks, str(tmp_path), _config(steps=4, lr_scales={"encoder.": 0.5}))
    with pytest.raises(ValueError, match=r"at ×0.5 of the learning rate, this run at ×1 \(did `lr_scales` change"):
        Trainer(_build(tok, tasks), tasks, _config(steps=4, lr_scales={"decoder.": 0.5}), output_dir=str(tmp_path),
                resume=True)


def test_fine_tuning_new_adapters_resumes_with_the_model_it_trained(tok, tmp_path):
    pre = [load_preset("digit_classification", "train", limit=6)]
    _build(tok, pre).save_pretrained(str(tmp_path / "pre"))
    new = [load_preset("table_species", "train", limit=6)]
    model = GeneralistModel.from_pretrained(str(tmp_path / "pre"))
    config = _config(steps=4, checkpoint_every=2, trainable="new_adapters")
    with Trainer(model, new, config, output_dir=str(tmp_path / "ft")) as first:
        for step in (1, 2):
            first.train_step(step)
            first.step = step
        first.save_checkpoint()
    with Trainer(model, new, config, output_dir=str(tmp_path / "ft"), resume=True) as again:  # knows the task now
        assert again.step == 2 and again.new_adapters == first.new_adapters == ["struct_cells"]


def test_a_resumed_command_line_run_keeps_its_before_training_scores(tmp_path):
    import json

    from moe_gen.cli import main

    run = str(tmp_path / "run")
    flags = ["--config", "debug", "--output", run, "--train.eval_limit", "2", "--baseline", "true",
             "--train.tensorboard", "false"]
    assert main(["pretrain", *flags, "--train.steps", "2"]) == 0
    before = json.load(open(f"{run}/eval.json"))["before_training"]
    assert main(["pretrain", *flags, "--train.steps", "3", "--resume"]) == 0
    assert before is not None and json.load(open(f"{run}/eval.json"))["before_training"] == before  # was None


def test_a_checkpoint_written_before_a_setting_existed_still_resumes(tok, tasks, tmp_path):
    import json
    import os

    _two_steps(tok, tasks, str(tmp_path), router=RouterConfig(strategy="attribute"))
    state_file = os.path.join(str(tmp_path), "checkpoints", "step-0000002", "trainer.json")
    state = json.load(open(state_file))
    del state["config"]["batch_tasks"], state["model_config"]["moe"]["router"]["tag_balance_window"]
    json.dump(state, open(state_file, "w"))  # as an older package wrote it
    with Trainer(_build(tok, tasks), tasks, _config(steps=4), output_dir=str(tmp_path), resume=True) as resumed:
        assert resumed.step == 2


def test_a_checkpoint_is_on_disk_before_latest_names_it(tok, tasks, tmp_path, monkeypatch):
    """Every file of a checkpoint is flushed (fsync) before the renames that publish it, and the
    folders holding those renames before ``latest`` names it: after a machine crash ``latest`` named
    a checkpoint whose weights and optimizer state had never been flushed."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target, *args, **kwargs):
        events.append(("replace", os.path.realpath(str(source)), os.path.realpath(str(target))))
        return real_replace(source, target, *args, **kwargs)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fsynced descriptor through /proc")
    with Trainer(_build(tok, tasks), tasks, _config(steps=4), output_dir=str(tmp_path)) as t:
        t.train_step(1)
        t.step = 1
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        final = t.save_checkpoint()
    monkeypatch.undo()
    root = os.path.realpath(os.path.dirname(final))
    published = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.join(root, "latest"))
    synced = {e[1] for e in events[:published] if e[0] == "fsync"}
    renamed_to = {e[2]: e[1] for e in events[:published] if e[0] == "replace"}
    partial = os.path.realpath(final) + ".partial"
    for name in os.listdir(final):  # each file flushed under the name it was written as, before its rename
        written = renamed_to.get(os.path.join(partial, name), os.path.join(partial, name))
        assert written in synced, f"{name} was not flushed before latest named its checkpoint"
    assert partial in synced and root in synced  # the folder's entries, and the rename of the folder
    assert events[-1] == ("fsync", root)  # latest's own rename


# the settings a resume may not change (they decide which rows each step draws), and those it may
# change without a word: written out here, not read from the module, so a dropped name is caught
_DRAWING = ("seed", "batch_size", "accumulate", "mixing", "temperature", "batch_tasks", "task_weights",
            "modality_budget", "max_tokens")
_EXTENDING = ("steps", "lr", "warmup_steps", "min_lr_ratio", "lr_scales", "weight_decay", "betas", "eps",
              "checkpoint_every", "keep_checkpoints", "max_failed_checkpoints", "log_every", "progress",
              "tensorboard", "eval_limit", "eval_batch_size", "num_threads", "device", "activation_checkpointing",
              "fsdp_unit", "expert_parallel", "sharding", "shard_size", "trainable", "max_bad_steps")


def test_every_setting_that_draws_batches_is_refused_and_every_extending_one_passes_silently(caplog):
    from moe_gen.trainer.resume import check_same_training

    saved = _config(steps=4).to_dict()
    assert set(_DRAWING) | set(_EXTENDING) <= set(saved)
    for key in _DRAWING:
        with pytest.raises(ValueError, match=rf"\({key} .* → 'changed'\): the resumed run would draw other batches"):
            check_same_training("ckpt", saved, {**saved, key: "changed"})
    with caplog.at_level(logging.WARNING, logger="moe_gen"):
        for key in _EXTENDING:
            check_same_training("ckpt", saved, {**saved, key: "changed"})
    assert not caplog.records


def test_a_model_refusal_names_three_changes_and_counts_the_rest_and_the_backend_may_change(caplog):
    import json

    from moe_gen.trainer.resume import check_same_model

    saved = flavour_with("debug").to_dict()
    three = json.loads(json.dumps(saved))
    three.update(d_model=saved["d_model"] * 2, encoder_layers=9, ffn_hidden=7)
    with pytest.raises(ValueError, match=r"\(d_model .*, encoder_layers .*, ffn_hidden \S+ → 7\): the checkpoint"):
        check_same_model("ckpt", saved, three)
    with pytest.raises(ValueError, match=r"ffn_hidden \S+ → 7 and 1 more\): "):
        check_same_model("ckpt", saved, {**three, "num_heads": 5})  # sorted: d_model, encoder_layers, ffn_hidden
    other_backend = json.loads(json.dumps(saved))
    other_backend["moe"]["backend"] = "eager"
    with caplog.at_level(logging.WARNING, logger="moe_gen"):
        check_same_model("ckpt", saved, other_backend)  # how the model is run, not what it is
    assert not caplog.records


def test_a_checkpoint_of_another_shape_is_refused_before_anything_loads(tok, tasks, tmp_path):
    """Checked by the checkpoint itself (a checkpoint whose trainer.json predates the model check):
    a ValueError naming the tensors, with the optimizer and weights untouched, not PyTorch's size
    error from ``load_state_dict`` after the optimizer had loaded."""
    from moe_gen.trainer.checkpoint import latest_checkpoint, load_checkpoint

    _two_steps(tok, tasks, str(tmp_path / "run"))
    path = latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    with Trainer(_build(tok, tasks, d_model=32), tasks, _config(steps=4), output_dir=str(tmp_path / "b")) as t:
        weights = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        with pytest.raises(ValueError, match=r"does not fit this model: tensors of another shape \(.*against"):
            load_checkpoint(path, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, sampler=t.sampler)
        assert not t.optimizer.state
        assert all(torch.equal(p, weights[n]) for n, p in t.model.named_parameters())


def test_a_resume_restores_the_python_numpy_and_torch_random_states_of_the_save(tok, tasks, tmp_path):
    import random

    import numpy as np

    with Trainer(_build(tok, tasks), tasks, _config(steps=4), output_dir=str(tmp_path)) as first:
        first.train_step(1)
        first.step = 1
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        first.save_checkpoint()
        expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    with Trainer(_build(tok, tasks), tasks, _config(steps=4), output_dir=str(tmp_path), resume=True):
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
