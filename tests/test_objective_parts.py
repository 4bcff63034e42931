"""What the objectives return besides the loss they train on, and how the trainer logs it: task
loss weights on frame rows, the contrastive objective's duplicate captions and auxiliary losses,
parts returned by one objective of a mixed micro-batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import ContrastiveObjective, GenerativeObjective, _multi_positive_nce, _same_rows
from moe_gen.tasks import Tokenizer, collate, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _build(tasks, tok):
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), tasks, tok)


def test_frame_rows_take_their_tasks_loss_weight(tok):
    """The L1 and stop losses of continuous targets were a plain mean over every row: a task's
    loss weight did not reach them (weight 0 trained its frames as much as weight 4)."""
    motion = load_preset("text_to_motion", "train", limit=3)
    digits = load_preset("digit_classification", "train", limit=3)
    model = _build([motion, digits], tok).eval()
    batch = collate([s for t in (motion, digits) for s in t.samples(tok)], tok, model.task_ids)
    with torch.no_grad():
        plain = GenerativeObjective(model)(batch)["frame_loss"]
        assert float(plain) > 0
        for weight in (0.0, 4.0):
            weighted = GenerativeObjective(model, task_weights={"text_to_motion": weight})(batch)["frame_loss"]
            torch.testing.assert_close(weighted, weight * plain, rtol=1e-5, atol=1e-6)



def test_loss_scales_multiply_the_token_and_each_adapters_frame_term(tok):
    """``LossScales`` (the trainer's micro-batch weighting) multiply the token loss and each frame
    adapter's L1 + stop loss inside ``"loss"``; the routing losses stay as they are."""
    from moe_gen.objectives import LossScales

    motion = load_preset("text_to_motion", "train", limit=3)
    digits = load_preset("digit_classification", "train", limit=3)
    model = _build([motion, digits], tok).eval()
    batch = collate([s for t in (motion, digits) for s in t.samples(tok)], tok, model.task_ids)
    (name,) = batch.frame_targets
    objective = GenerativeObjective(model, frame_weight=2.0)
    with torch.no_grad():
        out = model(batch)
        plain = objective.loss(batch, out)
        scaled = objective.loss(batch, out, LossScales(token=0.5, frame={name: 3.0}))
    assert float(plain["frame_loss"]) > 0 and float(plain["token_loss"]) > 0
    expected = 0.5 * plain["token_loss"] + 2.0 * 3.0 * plain["frame_loss"] + plain["aux_loss"]
    torch.testing.assert_close(scaled["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled["frame_loss"], plain["frame_loss"])  # (logged unscaled)


def test_the_contrastive_loss_is_the_symmetric_infonce_at_a_temperature_capped_at_100(tok):
    """With distinct captions and inputs the contrastive term is CLIP's: the mean of the image→text
    and text→image cross-entropies of ``scale·image·textᵀ``, the pooled encoder output against the
    pooled bidirectional pass over the target text, each projected and normalised; the scale
    ``exp(logit_scale)`` is capped at 100 (a learned scale of 1000 gives the loss of 100)."""
    from moe_gen.objectives import contrastive_side

    task = load_preset("image_text_retrieval", "train", limit=40)
    model = _build([task], tok).eval()
    rows, labels = [], set()
    for sample in task.samples(tok):
        if (label := task.data[sample.index]["label"]) not in labels:
            rows.append(sample)
            labels.add(label)
    batch = collate(rows[:4], tok, model.task_ids)
    assert len(rows) >= 4
    model.logit_scale.data.fill_(math.log(1000.0))

    def pooled(hidden, valid):
        return (hidden * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)

    with torch.no_grad():
        got = ContrastiveObjective(model)(batch)["contrastive_loss"]
        side = contrastive_side(batch, tok.pad_id)
        image = F.normalize(model.contrastive_image(pooled(model(batch).encoder_hidden,
                                                           ~batch.encoder.padding_mask)), dim=-1)
        text = F.normalize(model.contrastive_text(pooled(model.decode_bidirectional(side).hidden, side.is_token)),
                           dim=-1)
    logits = 100.0 * image @ text.t()
    rows_ = torch.arange(len(logits))
    expected = 0.5 * (F.cross_entropy(logits, rows_) + F.cross_entropy(logits.t(), rows_))
    assert abs(float(F.cross_entropy(logits, rows_) - F.cross_entropy(logits.t(), rows_))) > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_duplicate_captions_are_positives_not_negatives():
    """Identical captions embed identically, so InfoNCE over the diagonal alone held a perfect
    model's loss above 0 and scored its retrieval of the duplicate wrong."""
    texts = torch.tensor([[5, 6], [5, 6], [7, 8]])
    same = _same_rows(texts)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    perfect = 50.0 * same.float()  # every image as close to the texts equal to its own as to its own
    assert float(_multi_positive_nce(perfect, same)) < 1e-6
    logits = torch.randn(3, 3)
    distinct = _same_rows(torch.tensor([[1], [2], [3]]))
    torch.testing.assert_close(_multi_positive_nce(logits, distinct), F.cross_entropy(logits, torch.arange(3)))


def test_same_rows_compares_the_scored_tokens_in_order_wherever_they_sit():
    """The vectorised comparison equals comparing each row's scored tokens as Python tuples, over
    random rows whose scored spans start at different places and have different lengths."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (64, 5), generator=g)
    scored = torch.rand(64, 5, generator=g) < 0.5
    keys = [tuple(row[keep].tolist()) for row, keep in zip(tokens, scored)]
    expected = [[a == b for b in keys] for a in keys]
    assert _same_rows(tokens, scored).tolist() == expected
    assert _same_rows(tokens).tolist() == [[a.tolist() == b.tolist() for b in tokens] for a in tokens]


def test_contrastive_parts_report_what_the_loss_holds(tok):
    task = load_preset("image_text_retrieval", "train", limit=40)
    model = _build([task], tok).eval()
    rows = list(task.samples(tok))
    labels = [task.data[s.index]["label"] for s in rows]
    first = [s for s, label in zip(rows, labels) if label == labels[0]]
    other = next(s for s, label in zip(rows, labels) if label != labels[0])
    objective = ContrastiveObjective(model)
    with torch.no_grad():
        out = objective(collate(first[:2] + [other], tok, model.task_ids))
        # the reported auxiliary loss is every routing loss in the total: both passes
        forward_aux = sum(float(v) for k, v in out.items() if k.startswith("aux/") and "contrastive_pass" not in k)
        caption = 2.0 * (float(out["caption_loss"]) - forward_aux)
        expected = float(out["loss"]) - caption - float(out["contrastive_loss"])
        assert float(out["aux_loss"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert any(k.startswith("aux/contrastive_pass/") for k in out)
        assert not out["contrastive_loss"].requires_grad
        # one distinct caption: nothing to retrieve among, so no accuracy (it was 1.0, or 1/B)
        alone = objective(collate(first[:3], tok, model.task_ids))
    assert "retrieval_accuracy" not in alone and float(alone["contrastive_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= float(out["retrieval_accuracy"]) <= 1.0


def test_a_part_one_objective_returns_is_logged_at_its_own_value(tok, tmp_path):
    """Parts were multiplied by their group's share of the micro-batch and summed, so a
    contrastive loss of 1.81 over 6 of 8 samples was logged as 1.35."""
    tasks = [load_preset("digit_classification", "train", limit=16), load_preset("image_text_retrieval", "train",
                                                                                    limit=16)]
    model = _build(tasks, tok)
    config = TrainConfig(steps=1, batch_size=8, mixing="uniform", progress=False, tensorboard=False,
                         checkpoint_every=0)
    trainer = Trainer(model, tasks, config, output_dir=str(tmp_path / "run"))
    returned = []
    contrastive = trainer.objectives["contrastive"]

    class Spy:
        def __getattr__(self, name):
            return getattr(contrastive, name)

        def __call__(self, batch):
            out = contrastive(batch)
            parts = {k: float(out[k].detach()) for k in ("contrastive_loss", "token_loss")}
            returned.append({**parts, "rows": len(batch.tasks)})
            return out

    trainer.objectives["contrastive"] = Spy()
    record = trainer.train_step(1)
    trainer.close()
    (seen,) = returned
    assert 0 < seen["rows"] < 8  # both objectives in the micro-batch
    assert record["contrastive_loss"] == pytest.approx(seen["contrastive_loss"], rel=1e-6)
    assert not math.isclose(record["token_loss"], seen["token_loss"])  # shared parts: both groups' mean


def test_masked_budgets_must_leave_something_to_predict():
    for inputs, targets in ((-3, 8), (12, 0)):
        with pytest.raises(ValueError, match="masked_input_budget must be >= 0 and masked_target_budget >= 1"):
            TrainConfig(masked_input_budget=inputs, masked_target_budget=targets)
    TrainConfig(masked_input_budget=0, masked_target_budget=1)
