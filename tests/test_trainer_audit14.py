"""Building a Trainer: what a refused build leaves on the model, which parameters ``trainable="adapters"``
trains, and the warning for a warm-up as long as the run (fourteenth session's optimisation audit)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer

QUIET = dict(steps=2, batch_size=4, warmup_steps=1, progress=False, tensorboard=False, device="cpu")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _table_model(tok) -> GeneralistModel:
    torch.manual_seed(0)
    return GeneralistModel.build(flavour_with("debug", router=RouterConfig(strategy="attribute")),
                                 [load_preset("table_species", "train", limit=8)], tok)


@pytest.mark.parametrize("bad", [{"lr_scales": {"adapter.": 0.1}}, {"loss_weights": {"digit_clasification": 2.0}}])
def test_a_refused_trainer_leaves_the_model_as_it_was_given(tok, tmp_path, bad):
    """The refusal came after the new task and its adapter had joined the model, so the corrected
    retry found no new adapter ("trainable='new_adapters' leaves nothing to train")."""
    model = _table_model(tok)
    digits = load_preset("digit_classification", "train", limit=8)
    config, adapters = model.config, sorted(model.adapters)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        Trainer(model, [digits], TrainConfig(**QUIET, trainable="new_adapters", **bad), output_dir=str(tmp_path / "a"))
    assert model.config == config and sorted(model.adapters) == adapters
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with Trainer(model, [digits], TrainConfig(**QUIET, trainable="new_adapters", lr_scales={"adapters.": 0.1}),
                 output_dir=str(tmp_path / "b")) as trainer:
        assert trainer.new_adapters == ["image_patch"]
        assert "digit_classification" in model.task_ids


def test_trainable_adapters_trains_a_new_tasks_frame_and_stop_heads(tok, tmp_path):
    """They stayed frozen at their random start under "adapters" (while "new_adapters" trained them)."""
    model = _table_model(tok)
    speech = load_preset("text_to_speech", "train", limit=8)
    config = TrainConfig(**{**QUIET, "steps": 1, "warmup_steps": 0, "batch_size": 2}, trainable="adapters")
    with Trainer(model, [speech], config, output_dir=str(tmp_path)) as trainer:
        heads = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n.startswith(("frame_heads.", "stop_heads."))}
        assert heads and all(p.requires_grad for n, p in model.named_parameters() if n in heads)
        trainer.fit()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before, after[n].detach()) for n, before in heads.items())


def test_a_warm_up_longer_than_the_run_is_warned_of(tok, tmp_path, caplog):
    """The rate never reached lr (0.5 of it at the last of 10 steps under the default 20 warm-up
    steps) and never decayed, without a word."""
    model = _table_model(tok)
    tables = load_preset("table_species", "train", limit=8)
    with caplog.at_level("WARNING", logger="moe_gen"):
        Trainer(model, [tables], TrainConfig(**{**QUIET, "steps": 10, "warmup_steps": 20}),
                output_dir=str(tmp_path / "a")).close()
    assert "warmup_steps=20 is longer than the run's steps=10: the learning rate reaches 0.5 of lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="moe_gen"):
        Trainer(model, [tables], TrainConfig(**{**QUIET, "steps": 10, "warmup_steps": 10}),
                output_dir=str(tmp_path / "b")).close()
    assert "warmup_steps" not in caplog.text


def test_checkpoints_past_step_ten_million_are_kept_in_step_order(tok, tmp_path):
    """Names sorted as text put step-10000000 (past the 7-digit padding) before step-9999500, so
    the checkpoint just written was removed as the oldest (fourteenth session's long-run audit)."""
    model = _table_model(tok)
    tables = load_preset("table_species", "train", limit=8)
    with Trainer(model, [tables], TrainConfig(**{**QUIET, "steps": 20_000_000}), output_dir=str(tmp_path)) as trainer:
        for step in (9_999_000, 9_999_500, 10_000_000):
            trainer.step = step
            trainer.save_checkpoint()
        assert sorted(os.listdir(trainer.checkpoint_dir)) == ["latest", "step-10000000", "step-9999500"]
        assert trainer.latest_checkpoint().endswith("step-10000000")


def test_a_task_keeps_the_plans_of_its_most_recently_used_models_only(tok):
    """Every loaded or merged model brings its own tokenizer and statistics objects; a task scored
    on each checkpoint of a run kept one plan per model for good (fourteenth session's long-run
    audit: 0.33 MB a model, frozen-encoder caches included)."""
    from moe_gen.tasks.task import MAX_PLANS

    task = load_preset("table_species", "train", limit=8)
    statistics = [dict(task.fit_statistics()) for _ in range(3 * MAX_PLANS)]  # distinct objects, as models hold
    plans = [task.plan(tok, s) for s in statistics]
    assert len(task._plans) == MAX_PLANS
    assert task.plan(tok, statistics[-1]) is plans[-1]  # a recent one is still reused
    assert task.plan(tok, statistics[0]) is not plans[0]  # an old one was let go, and is made again


def test_a_resumed_log_is_cut_one_record_at_a_time(tmp_path):
    """The resume read the whole train.jsonl into memory before rewriting it (1.4 GB for 80,000
    logged steps of a 12-layer, 32-expert model; fourteenth session's long-run audit)."""
    import json
    import tracemalloc

    from moe_gen.trainer.logs import RunLogger

    log = tmp_path / "logs" / "train.jsonl"
    log.parent.mkdir()
    load = {f"layer{i}": [1 / 32] * 32 for i in range(12)}  # about 10 kB a record
    with open(log, "w") as f:
        f.writelines(json.dumps({"step": step, "loss": 1.0 / step, "expert_load": load}) + "\n"
                     for step in range(1, 1001))
        f.write('{"step": 1001, "lo')  # torn by a kill
    tracemalloc.start()
    RunLogger(str(tmp_path), 2000, 600, progress=False, tensorboard=False, resume_step=600).close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    records = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in records] == list(range(1, 601)) and records[-1]["loss"] == 1.0 / 600
    assert peak < 1_000_000, peak  # the log is 10 MB


def test_the_sampler_keeps_encoding_with_the_models_image_tokenizer_whatever_else_plans_the_task(tok, tmp_path):
    """The trainer bound the model's own image tokenizer to the task's cached plan, and the sampler
    found that plan through the cache; once the cache let old plans go (8 kept), 8 other models
    planning the same task made the sampler encode with the task's own tokenizer, silently (the
    review of the fourteenth session's diff)."""
    from moe_gen.model import flavour
    from moe_gen.tasks import Task
    from moe_gen.tasks.modalities.image_codes import VQConfig, images_to_tensor, train_image_vq
    from moe_gen.tasks.sources.vision import load_digit_images
    from moe_gen.tasks.task import MAX_PLANS

    instruction = "draw a handwritten [TEXT:label] -> [IMAGE:image,preprocess=image_vq]"
    digits = load_digit_images("train")[:32]
    config = VQConfig(size=8, codes=16, code_dim=4, hidden=16)  # 4 codes an image; the shipped one gives 16
    own = str(tmp_path / "own_vq.safetensors")
    train_image_vq(images_to_tensor([r["image"] for r in digits], config.size), config, steps=2, batch_size=16,
                   seed=1).save(own)
    rows = [{"label": r["label"], "image": r["image"]} for r in digits[:6]]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [Task("draw", instruction, rows,
                                                          preprocessor_options={"image_vq": {"tokenizer": own}})], tok)
    fresh = Task("draw", instruction, rows)  # names no tokenizer: the model's own copy must be used
    with Trainer(model, [fresh], TrainConfig(**QUIET), output_dir=str(tmp_path / "run")) as trainer:
        cursor = trainer.sampler.cursors[0]

        def code_tokens() -> int:
            cursor._peeked = None
            return len(next(c for c in cursor.peek(tok).decoder if c.column == "image").tokens)

        assert code_tokens() == 4
        for _ in range(MAX_PLANS):  # other models (their own tokenizer and statistics objects) plan the task
            fresh.plan(Tokenizer.default(), dict(model.encoding_statistics(fresh)))
        assert code_tokens() == 4


def test_a_refused_resume_leaves_the_given_models_weights_alone(tok, tmp_path):
    """load_checkpoint loaded the weights before the sampler refused the changed data, so the model
    given to the refused Trainer held the checkpoint's weights (94 of 97 tensors; the review of the
    fourteenth session's diff)."""
    tables = load_preset("table_species", "train", limit=8)
    config = {**QUIET, "steps": 4, "checkpoint_every": 2}
    with Trainer(_table_model(tok), [tables], TrainConfig(**config, lr=1e-2), output_dir=str(tmp_path)) as trainer:
        trainer.fit()
    given = _table_model(tok)  # the weights the first run started from, not its checkpoint's
    before = {k: v.clone() for k, v in given.state_dict().items()}
    with pytest.raises(ValueError, match="had 8 rows when the checkpoint was written and has 12 now"):
        Trainer(given, [load_preset("table_species", "train", limit=12)], TrainConfig(**{**config, "steps": 6}),
                output_dir=str(tmp_path), resume=True)
    assert all(torch.equal(v, before[k]) for k, v in given.state_dict().items())


def test_a_refused_build_removes_every_added_head_and_tokenizer_and_restores_routing_and_checkpointing(tok, tmp_path):
    """New tasks add frame and stop heads (speech), an image tokenizer (text to image) and prompt
    words to the instruction router; the build turns checkpointing on: a refusal puts all of it back."""
    from moe_gen.routing.inputs import InstructionInput

    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", router=RouterConfig(strategy="instruction")),
                                  [load_preset("table_species", "train", limit=8)], tok)
    new = [load_preset(n, "train", limit=8) for n in ("text_to_image", "text_to_speech")]
    added = ("adapters", "frame_heads", "stop_heads", "image_tokenizers")
    before = {name: sorted(getattr(model, name)) for name in added}
    words = [m.words_TkW.clone() for m in model.modules() if isinstance(m, InstructionInput)]
    assert words
    with pytest.raises(ValueError, match="lr_scales"):
        Trainer(model, new, TrainConfig(**QUIET, activation_checkpointing=True, lr_scales={"adapter.": 0.1}),
                output_dir=str(tmp_path / "a"))
    assert {name: sorted(getattr(model, name)) for name in added} == before
    assert not model.encoder.checkpoint_blocks and not model.decoder.checkpoint_blocks
    now = [m.words_TkW for m in model.modules() if isinstance(m, InstructionInput)]
    assert all(torch.equal(a, b) for a, b in zip(words, now, strict=True))
