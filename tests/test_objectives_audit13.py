"""Audit 13 of the objectives: the contrastive caption loss reads ``frame_weight``; the parallel
objective refuses targets besides the image codes; a masked task's feature rows need frame heads,
checked when the trainer is built; the contrastive parts are logged by what they average over."""

import math
import random

import pytest
import torch
from helpers import build

from moe_gen.objectives import OBJECTIVES, ContrastiveObjective, MaskedObjective
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_contrastive_caption_loss_weighs_frames_by_frame_weight(tok):
    """The contrastive objective built its caption loss with frame_weight 1 whatever
    ``TrainConfig.frame_weight`` said (the generative and masked objectives read it)."""
    base = load_preset("text_to_motion", "train", limit=4)
    task = Task("motion_caption", "[TEXT:text] -> [TEXT:label] [MOTION:motion,adaptor=motion_tgt,max_length=24]",
                base.data, objective="contrastive")
    model = build([task], tok, every=0, dropout=0.0).eval()
    outs = {}
    for weight in (0.0, 3.0):
        objective = OBJECTIVES.get("contrastive").from_train_config(model, TrainConfig(frame_weight=weight))
        batch = objective.prepare(list(task.samples(tok)), random.Random(0))
        with torch.no_grad():
            outs[weight] = {k: float(v) for k, v in objective(batch).items() if torch.is_tensor(v) and v.numel() == 1}
    frame = outs[0.0]["frame_loss"]
    assert frame > 0 and outs[3.0]["frame_loss"] == pytest.approx(frame, rel=1e-6)
    # caption_loss = token_loss + frame_weight · frame_loss + routing; the total holds it twice (caption_weight 2)
    assert outs[3.0]["caption_loss"] - outs[0.0]["caption_loss"] == pytest.approx(3.0 * frame, rel=1e-4)
    assert outs[3.0]["loss"] - outs[0.0]["loss"] == pytest.approx(2.0 * 3.0 * frame, rel=1e-4)


def _trainer(model, tasks, tmp_path, **overrides):
    config = TrainConfig(**{"steps": 2, "batch_size": 2, "progress": False, "tensorboard": False,
                            "checkpoint_every": 0, **overrides})
    return Trainer(model, tasks, config, output_dir=str(tmp_path / "run"))


def _draw_and_name(tok):
    base = load_preset("text_to_image_maskgit", "train", limit=6)
    return Task("draw_and_name", "draw digit [TEXT:id] -> [IMAGE:image,preprocess=image_vq] [TEXT:label,closed_set]",
                [dict(r, id=str(r["id"])) for r in base.data], objective="parallel")


def test_parallel_objective_refuses_a_target_besides_the_image_codes(tok, tmp_path):
    """A closed-set label after the image codes kept its allowed tokens where the last code is
    predicted: whenever that code was masked the loss was infinite, and the run ended in
    TrainingDiverged advising a lower learning rate (parallel decoding refuses such a task anyway)."""
    task = _draw_and_name(tok)
    model = build([task], tok, every=0, dropout=0.0)
    with pytest.raises(ValueError, match=r"task 'draw_and_name': the parallel objective trains exactly one target.*"
                                         r"\[TEXT:label,closed_set\]"):
        _trainer(model, [task], tmp_path)
    objective = OBJECTIVES.get("parallel").from_train_config(model, TrainConfig())
    with pytest.raises(ValueError, match=r"task 'draw_and_name': .* image codes alone; row 0 also has the "
                                         r"target\(s\) \['TEXT:label'\]"):
        objective.prepare(list(task.samples(tok)), random.Random(0))


def _masked_patches(tok):
    base = load_preset("digit_classification", "train", limit=16)
    return Task("digit_masked_patches", base.instruction, base.data, objective="masked")


def test_masked_task_with_feature_rows_needs_frame_heads_when_the_trainer_is_built(tok, tmp_path):
    """Image patches of a masked task on a model without their frame head trained until a draw
    first made a patch a target, then stopped the run with a message naming no task."""
    task = _masked_patches(tok)
    model = build([task], tok, every=0)
    with pytest.raises(ValueError, match=r"task 'digit_masked_patches' trained with the masked objective: slot "
                                         r"\[IMAGE:image\] makes 'image_patch' feature rows.*"
                                         r"predict_all_features=True"):
        _trainer(model, [task], tmp_path, masked_target_alpha={"IMAGE": 0.0, "TEXT": 3.0})
    # drawn anyway (as the objective alone may be used): the error names the task and the row
    objective = MaskedObjective(model, input_budget=0, target_budget=64)
    with pytest.raises(ValueError, match=r"task 'digit_masked_patches': masking made IMAGE:image rows of row 0 "
                                         r"targets.*'image_patch'"):
        objective.prepare(list(task.samples(tok))[:2], random.Random(0))
    with_heads = build([task], tok, every=0, predict_all_features=True)
    trainer = _trainer(with_heads, [task], tmp_path / "heads", masked_input_budget=4, masked_target_budget=4)
    assert math.isfinite(trainer.train_step(1)["loss"])
    trainer.close()


def test_contrastive_parts_are_logged_by_what_they_average_over_under_accumulation(tok, tmp_path, monkeypatch):
    """Under accumulate=2 the caption loss, InfoNCE term and retrieval accuracy were plain means
    over the micro-batches: a contrastive group of 2 rows weighed as much as one of 4, and a
    caption loss over 3 tokens as much as one over 30 (so caption_loss disagreed with token_loss)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    captions = ["alpha", "beta gamma", " ".join(words), "delta", " ".join(reversed(words)), "eta theta iota"]
    contrastive = Task("c", "[TEXT:q] -> [TEXT:x]", [{"q": f"w{i}", "x": x} for i, x in enumerate(captions)],
                       objective="contrastive")
    generative = Task("g", "[TEXT:q] -> [TEXT:x]", [{"q": f"v{i}", "x": "yes"} for i in range(4)])
    tasks = [contrastive, generative]
    model = build(tasks, tok, every=0, dropout=0.0)
    trainer = _trainer(model, tasks, tmp_path, steps=1, batch_size=5, accumulate=2, clip_norm=0.0)
    by_key = {(t.name, i): s for t in tasks for i, s in enumerate(t.samples(tok))}
    micro_batches = [[("c", 0), ("c", 1), ("g", 0), ("g", 1), ("g", 2)],
                     [("c", 2), ("c", 3), ("c", 4), ("c", 5), ("g", 3)]]
    trainer.sampler.next_batch = lambda step, micro: [by_key[k] for k in micro_batches[micro]]
    seen = []
    call = ContrastiveObjective.__call__

    def spy(self, batch, scales=None):
        out = call(self, batch, scales)
        seen.append({"rows": len(batch.tasks), "tokens": self.loss_counts(batch)[0],
                     **{k: float(out[k]) for k in ("caption_loss", "contrastive_loss", "retrieval_accuracy")}})
        return out

    monkeypatch.setattr(ContrastiveObjective, "__call__", spy)
    record = trainer.train_step(1)
    trainer.close()
    assert [s["rows"] for s in seen] == [2, 4] and seen[0]["tokens"] != seen[1]["tokens"]

    def mean(key, weight):
        return sum(s[key] * s[weight] for s in seen) / sum(s[weight] for s in seen)

    assert record["caption_loss"] == pytest.approx(mean("caption_loss", "tokens"), rel=1e-6)
    assert record["contrastive_loss"] == pytest.approx(mean("contrastive_loss", "rows"), rel=1e-6)
    assert record["retrieval_accuracy"] == pytest.approx(mean("retrieval_accuracy", "rows"), rel=1e-6)


def test_a_masked_task_that_could_not_be_decoded_is_refused_before_it_trains(tok, tmp_path):
    """Decoding refuses a masked task with an EOS (or literal text) between its target values
    (``check_masked_answer``); the trainer used to train it first and the run failed at its
    evaluation."""
    rows = [{"q": "hello there", "a": "one", "b": "red"}, {"q": "hi", "a": "two", "b": "blue"}] * 4
    task = Task("m", "[TEXT:q] -> [TEXT:a] [TEXT:b,closed_set]", rows, objective="masked")
    model = build([task], tok, every=0)
    with pytest.raises(ValueError, match=r"task 'm' trained with the masked objective has the EOS that closes "
                                         r"\[TEXT:a\] between its target values"):
        _trainer(model, [task], tmp_path)
