"""Objective and batching defects found by an audit (2026-12-06, twelfth session); each test failed
before its fix."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import build

from moe_gen.objectives import MaskedObjective
from moe_gen.tasks import Task, load_preset
from moe_gen.trainer import TrainConfig


def test_masked_samples_smaller_than_the_input_budget_keep_a_target(tok):
    """At the default budgets (128 in, 128 out) a digit's 17 positions all became inputs: nothing
    was scored and the masked task trained on the routing loss alone."""
    from moe_gen.masking import mask_sample

    task = load_preset("digit_masked_modeling", "train", limit=8)
    samples = list(task.samples(tok))
    model = build([task], tok, predict_all_features=True)
    batch = MaskedObjective.from_train_config(model, TrainConfig()).prepare(samples, random.Random(0))
    positions = [sum(len(c) for c in s.encoder + s.decoder if c.column is not None) for s in samples]
    scored = (batch.labels != -100).sum(1)
    shown = (~batch.encoder.padding_mask).sum(1)
    assert min(positions) == 17  # 16 codes and a label of one token or more
    assert scored.tolist() == [1] * len(samples) and shown.tolist() == [n - 1 for n in positions]
    assert "token_loss" in MaskedObjective.from_train_config(model, TrainConfig())(batch)
    # budgets that fit are kept: the image_generation recipe's 12 in, 8 out leaves 5 targets of 17
    fitted = mask_sample(samples[0], input_budget=12, target_budget=8, rng=random.Random(0))
    assert fitted.lengths() == (12, 5)
    # an input budget of 0 shows nothing and predicts up to the target budget
    assert mask_sample(samples[0], input_budget=0, target_budget=8, rng=random.Random(0)).lengths() == (0, 8)


def test_a_masked_sample_without_room_for_an_input_and_a_target_is_refused(tok):
    from moe_gen.masking import mask_sample

    task = Task("one_word", "[TEXT:q] -> [TEXT:a]", [{"q": "", "a": "no"}], objective="masked")
    sample = next(iter(task.samples(tok)))
    positions = sum(len(c) for c in sample.encoder + sample.decoder if c.column is not None)
    assert positions == 1
    with pytest.raises(ValueError, match=r"task 'one_word': row 0 holds 1 data position\(s\).*"
                                         r"masked_input_budget 4"):
        mask_sample(sample, input_budget=4, target_budget=4, rng=random.Random(0))
    assert mask_sample(sample, input_budget=0, target_budget=4, rng=random.Random(0)).lengths() == (0, 1)


def test_a_contrastive_tasks_loss_weight_scales_its_infonce_term(tok):
    """loss_weights weighted only the caption loss: at 0 the contrastive term still trained, and a
    weight of 3 left it as it was."""
    from moe_gen.objectives import ContrastiveObjective
    from moe_gen.tasks import collate

    task = load_preset("image_text_retrieval", "train", limit=8)
    model = build([task], tok).eval()
    batch = collate(list(task.samples(tok))[:6], tok, model.task_ids)
    plain = float(ContrastiveObjective(model)(batch)["contrastive_loss"])
    tripled = float(ContrastiveObjective(model, task_weights={task.name: 3.0})(batch)["contrastive_loss"])
    assert plain > 0.1 and tripled == pytest.approx(3 * plain, rel=1e-5)
    model.zero_grad()
    left_out = ContrastiveObjective(model, task_weights={task.name: 0.0})(batch)
    left_out["loss"].backward()
    assert float(left_out["contrastive_loss"]) == 0.0
    assert not model.contrastive_image.weight.grad.any()  # the projection only the InfoNCE term trains


def test_a_contrastive_task_without_a_token_target_is_refused(tok):
    """A motion target left every row's contrastive pass the EOS alone: every row was every other's
    positive and the InfoNCE term 0 in every batch, without a word."""
    from moe_gen.objectives import ContrastiveObjective

    base = load_preset("text_to_motion", "train", limit=4)
    task = Task("motion_retrieval", base.instruction, base.data, objective="contrastive")
    model = build([task], tok)
    with pytest.raises(ValueError, match=r"task 'motion_retrieval': the contrastive objective needs a token "
                                         r"target \(text\).*row 0 has only \['MOTION:"):
        ContrastiveObjective(model).prepare(list(task.samples(tok)), random.Random(0))


def test_rows_with_the_same_input_are_each_others_contrastive_positives(tok):
    """Two captions of one image were each other's negatives: their pooled image states are the
    same, so the loss of an ideal model had a floor (log 2 · 2/3 in three rows) and
    retrieval_accuracy could not reach 1."""
    from moe_gen.objectives import ContrastiveObjective, _same_inputs
    from moe_gen.tasks import collate

    base = load_preset("image_text_retrieval", "train", limit=3)
    rows = [dict(base.data[0]), dict(base.data[0]), dict(base.data[1])]
    rows[1]["label"] = "seven" if rows[0]["label"] != "seven" else "eight"  # the same image, another caption
    task = Task("retrieval", base.instruction, rows, objective="contrastive")
    model = build([task], tok).eval()
    batch = collate(list(task.samples(tok)), tok, model.task_ids)
    assert batch.encoder.rows  # the images are feature rows, compared with the tokens
    assert _same_inputs(batch.encoder).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    pair = collate(list(task.samples(tok))[:2], tok, model.task_ids)
    with torch.no_grad():
        out = ContrastiveObjective(model)(pair)
    # every retrieval is right and all the softmax mass is on positives, whatever the model
    assert float(out["contrastive_loss"]) == pytest.approx(0.0, abs=1e-6) and "retrieval_accuracy" not in out


def test_a_masked_objective_built_from_python_refuses_unknown_modalities_in_alpha(tok):
    """{"image": 1000, "text": 0} was ignored (every modality at α 1.0), where a Trainer refuses it."""
    task = load_preset("digit_masked_modeling", "train", limit=2)
    model = build([task], tok, predict_all_features=True)
    with pytest.raises(ValueError, match=r"TrainConfig.masked_alpha names unknown modalities \['image', 'text'\] "
                                         r"\(did you mean 'IMAGE', 'TEXT'\?\)"):
        MaskedObjective(model, alpha={"image": 1000.0, "text": 0.0})
    with pytest.raises(ValueError, match=r"TrainConfig.masked_target_alpha names unknown modalities \['RGB'\]"):
        MaskedObjective(model, alpha=0.5, target_alpha={"RGB": 1.0})
    MaskedObjective(model, alpha={"IMAGE": 1000.0, "TEXT": 0.0})


def test_the_parallel_decoder_pass_is_tagged_bidirectional_in_training_and_decoding(tok):
    """The batch attended bidirectionally but every decoder token stayed tagged causal=True, so
    tag-read routers saw it as left-to-right decoding (the contrastive pass was tagged False)."""
    from moe_gen.objectives import ParallelObjective

    task = load_preset("text_to_image_maskgit", "train", limit=4)
    model = build([task], tok)
    batch = ParallelObjective(model).prepare(list(task.samples(tok)), random.Random(0))
    assert not batch.causal and not batch.decoder.tags.causal[~batch.decoder.padding_mask].any()
    model.eval()
    tagged = []
    decode = model.decode
    model.decode = lambda side, *a, **k: tagged.append(side.tags.causal[~side.padding_mask]) or decode(side, *a, **k)
    model.infer(task, task.data[:2], parallel_steps=2)
    assert len(tagged) == 2 and not torch.cat(tagged).any()


def test_the_frame_l1_is_a_mean_of_row_means_with_or_without_task_weights(tok):
    """Without task weights the L1 was a mean over all valid values, with any weight a mean of row
    means: naming another task at weight 1 changed text-to-speech's frame loss (1.389 → 1.396), and
    micro-batches, combined by their rows, did not add up to one batch's loss."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import collate

    tts, other = load_preset("text_to_speech", "train", limit=6), load_preset("doc_topic", "train", limit=2)
    model = build([tts, other], tok).eval()
    samples = list(tts.samples(tok))
    batch = collate(samples[:4], tok, model.task_ids)
    assert batch.frame_valid  # the last row of a signal is padded: rows of fewer values
    with torch.no_grad():
        plain = float(GenerativeObjective(model)(batch)["frame_loss"])
        named = float(GenerativeObjective(model, task_weights={"doc_topic": 1.0})(batch)["frame_loss"])
        assert plain == pytest.approx(named, rel=1e-6)
        parts = [collate(samples[:1], tok, model.task_ids), collate(samples[1:6], tok, model.task_ids)]
        rows = [sum(t.shape[0] for t in part.frame_targets.values()) for part in parts]
        losses = [float(GenerativeObjective(model)(part)["frame_loss"]) for part in parts]
        whole = float(GenerativeObjective(model)(collate(samples[:6], tok, model.task_ids))["frame_loss"])
    assert whole == pytest.approx(sum(n * loss for n, loss in zip(rows, losses)) / sum(rows), rel=1e-6)



def test_the_padded_values_of_a_frame_row_are_no_target(tok):
    """A row's L1 is the mean over its valid values alone (``frame_valid``): the zeros that pad a
    signal's last row take no part, whatever the model predicts there. Checked against the L1 and
    stop loss written out by hand."""
    import torch.nn.functional as F

    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import collate

    tts = load_preset("text_to_speech", "train", limit=4)
    model = build([tts], tok).eval()
    batch = collate(list(tts.samples(tok)), tok, model.task_ids)
    assert batch.frame_valid and any(not bool(v.all()) for v in batch.frame_valid.values())
    with torch.no_grad():
        out = model(batch)
        got = GenerativeObjective(model).loss(batch, out)["frame_loss"]
    expected = 0.0
    for name, predicted in out.frames.items():
        valid = batch.frame_valid.get(name, torch.ones_like(predicted, dtype=torch.bool))
        rows = [float(((p - t).abs()[v]).mean()) for p, t, v in zip(predicted, batch.frame_targets[name], valid)]
        expected += sum(rows) / len(rows)
        expected += float(F.binary_cross_entropy_with_logits(out.stop_logits[name], batch.frame_stop[name]))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_same_inputs_compares_every_token_tag_and_feature_value():
    """Rows are the same input when tokens, tags and feature rows all agree (computed on the device for
    the whole batch at once; it looped over the rows, copying their features to the host): repeated
    rows pair up, and one feature value changed in a repeat tells it apart."""
    from helpers import build

    from moe_gen.objectives import _same_inputs
    from moe_gen.tasks import Tokenizer, collate, load_preset

    tok = Tokenizer.default()
    tasks = [load_preset(n, "train", limit=6) for n in ("spoken_word_classification", "table_species")]
    model = build(tasks, tok)
    samples = [s for t in tasks for s in t.samples(tok, training=False)]
    batch = collate(samples + samples[:3], tok, model.task_ids)  # rows 12, 13, 14 repeat rows 0, 1, 2
    ids = list(range(len(samples))) + [0, 1, 2]
    expected = torch.tensor([[a == b for b in ids] for a in ids])
    assert torch.equal(_same_inputs(batch.encoder), expected)
    name = next(iter(batch.encoder.rows))
    S = batch.encoder.tokens.shape[1]
    first_of_row_13 = int((batch.encoder.index[name] // S == 13).nonzero()[0])
    batch.encoder.rows[name][first_of_row_13, 0] += 1.0
    changed = expected.clone()
    changed[1, 13] = changed[13, 1] = False
    assert torch.equal(_same_inputs(batch.encoder), changed)
