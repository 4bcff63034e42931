"""The masked multimodal objective (4M) on the generalist model: token budgets split between
inputs and targets, items kept at their places, decoding as the objective trains, and given
decoder slots as inputs (split from test_model.py)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import build

from moe_gen.config import RouterConfig
from moe_gen.tasks import Task, collate, load_preset
from moe_gen.tasks.modalities.base import modality_tag_names


def test_masked_modeling_budgets_and_loss(mixed, tok):
    from moe_gen.masking import mask_sample, split_budget
    from moe_gen.objectives import MaskedObjective
    from moe_gen.routing.tags import PASSES

    rng = random.Random(0)
    split = split_budget(20, {"TEXT": 5, "IMAGE": 100, "AUDIO": 0}, 1.0, rng)
    assert split["AUDIO"] == 0 and split["TEXT"] <= 5 and sum(split.values()) == 20
    tasks, samples = mixed
    for sample in samples:
        masked = mask_sample(sample, input_budget=12, target_budget=8, alpha=0.5, rng=rng)
        n_in, n_out = masked.lengths()
        total = sum(len(c) for c in sample.encoder + sample.decoder if c.column is not None)
        # fixed budgets, any modality count; a sample of 12 positions or fewer keeps one as its target
        assert n_in == min(12, total - 1) and n_out == min(8, total - n_in) >= 1
    model = build(tasks, tok, predict_all_features=True)
    objective = MaskedObjective(model, input_budget=12, target_budget=8)
    batch = objective.prepare(samples, random.Random(1))
    assert (batch.decoder.tags.pass_id[~batch.decoder.padding_mask] == PASSES.index("masked")).all()
    result = objective(batch)
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    plain = build(tasks, tok)
    with pytest.raises(ValueError, match="predict_all_features=True"):
        MaskedObjective(plain, input_budget=12, target_budget=8).prepare(samples, random.Random(1))


def test_masked_budgets_split_inputs_and_targets_by_their_own_alphas(tok):
    """As 4M samples inputs and targets apart: a per-modality input α that keeps text out of the
    encoder and the default target α put a digit's label among the targets (with one α of 1.0,
    the 1-token label took a share of the 12 inputs 11 times in 12 and was seldom predicted)."""
    from moe_gen.objectives import MaskedObjective
    from moe_gen.trainer.config import TrainConfig

    task = load_preset("digit_masked_modeling", "train", limit=40)
    model = build([task], tok, predict_all_features=True)
    samples = list(task.samples(tok))

    def label_in(config: TrainConfig) -> tuple[int, int]:
        objective = MaskedObjective.from_train_config(model, config)
        batch = objective.prepare(samples, random.Random(0))
        text = model.modality_ids["TEXT"]
        inputs = ((batch.encoder.tags.modality == text) & ~batch.encoder.padding_mask).any(1)
        targets = ((batch.decoder.tags.modality == text) & (batch.labels != -100)).any(1)
        return int(inputs.sum()), int(targets.sum())

    one = TrainConfig(masked_input_budget=12, masked_target_budget=8, masked_alpha=1.0)
    assert label_in(one)[0] >= 30
    # the declared target's modality is predicted first, right after BOS, as masked_view decodes it
    objective = MaskedObjective.from_train_config(model, one.replace(masked_alpha={"IMAGE": 1.0, "TEXT": 0.0}))
    batch = objective.prepare(samples, random.Random(0))
    for row, modality in enumerate(batch.decoder.tags.modality):  # (a position is tagged like what it predicts)
        kinds = [int(m) for m, label in zip(modality, batch.labels[row]) if label != -100]
        first_image = kinds.index(model.modality_ids["IMAGE"])
        assert first_image >= 1 and set(kinds[:first_image]) == {model.modality_ids["TEXT"]}
        assert set(kinds[first_image:]) == {model.modality_ids["IMAGE"]}
    split = one.replace(masked_alpha={"IMAGE": 1.0, "TEXT": 0.0}, masked_target_alpha=1.0)
    assert label_in(split) == (0, 40)
    assert TrainConfig.from_dict(split.to_dict()).masked_alpha == {"IMAGE": 1.0, "TEXT": 0.0}
    with pytest.raises(ValueError, match=r"masked_target_alpha\['TEXT'\] must be a finite number >= 0"):
        one.replace(masked_target_alpha={"TEXT": -1})
    # a modality name moe_gen does not know (4M's "RGB", a lower-case typo) trained everything at α 1
    from moe_gen.trainer.sampling import TaskSampler

    with pytest.raises(ValueError, match=r"TrainConfig.masked_alpha names unknown modalities \['image'\] "
                                         r"\(did you mean 'IMAGE'\?\)"):
        TaskSampler([task], tok, one.replace(masked_alpha={"image": 1000.0}))


def test_masked_tasks_with_targets_in_two_modalities_are_refused_at_decoding(tok):
    """Training numbers each modality's items apart; decoding counted on from the first target, so
    the second modality's answer was decoded at places training never put it."""
    rows = [{"q": "hello there", "a": "one", "c": "red"}, {"q": "hi", "a": "two three", "c": "blue"}]
    task = Task("m2", "[TEXT:q] what? -> [TEXT:a,closed_set] [CATEGORY:c,closed_set]", rows, objective="masked")
    model = build([task], tok, predict_all_features=True).eval()
    with pytest.raises(ValueError, match="task 'm2' trained with the masked objective has targets in 2 modalities"):
        model.infer(task, rows)


def test_masked_samples_keep_every_item_at_its_place(tok):
    """Masked inputs and targets were numbered in sequence: with 12 of 16 image codes in, code 13
    sat at position 11, so no code's place on the grid could be read, and no target said which
    code it predicts (the masked digit task stayed at chance, 0.10, and its codes at 4%)."""
    from moe_gen.masking import mask_sample

    task = load_preset("digit_masked_modeling", "train", limit=4)
    rng = random.Random(0)
    for i in range(4):
        full = task.encode(i, tok, training=False)
        codes = next(c.tokens for c in full.encoder if c.column == "image")
        masked = mask_sample(full, input_budget=12, target_budget=8, alpha={"IMAGE": 1.0, "TEXT": 0.1}, rng=rng)
        batch = collate([masked], tok, {task.name: 0}, pass_name="masked")
        image = modality_tag_names().index("IMAGE")
        enc = batch.encoder
        held = (enc.tags.modality[0] == image) & ~enc.padding_mask[0]
        places = enc.position_ids[0][held].tolist()
        assert len(places) >= 9 and places != list(range(len(places)))
        assert [codes[p] for p in places] == enc.tokens[0][held].tolist()
        predicted = (batch.decoder.tags.modality[0] == image) & (batch.labels[0] != -100)
        assert sorted(batch.decoder.position_ids[0][predicted].tolist() + places) == list(range(16))
        assert [codes[p] for p in batch.decoder.position_ids[0][predicted].tolist()] == \
            batch.labels[0][predicted].tolist()


def test_masked_objective_tasks_are_decoded_as_they_train(tok):
    """A task trained with the masked objective is answered from the samples that objective makes
    when every input position is in and the whole answer is out: no instruction text, no EOS,
    the ``masked`` pass tag (which a tag-routed decoder routes by)."""
    from moe_gen.masking import mask_sample, masked_view
    from moe_gen.routing.tags import PASSES

    task = load_preset("digit_masked_modeling", "train", limit=4)
    model = build([task], tok, router=RouterConfig(strategy="attribute"), predict_all_features=True).eval()
    labels = sorted(set(task.closed_sets()["label"]))
    row = task.data[0]
    inference = model.plan(task).encode(row, 0, training=False, inference=True, template=0)
    view = masked_view(inference)
    assert not view.decoder and all(c.column == "image" for c in view.encoder)
    assert sum(map(len, view.encoder)) == 16 < sum(map(len, inference.encoder))  # the prompt's text left out
    # the training sample whose inputs are all 16 codes and whose target is the whole label
    full = model.plan(task).encode(row, 0, training=False)
    answer_len = sum(len(c) for c in full.decoder if c.column == "label")
    trained = mask_sample(full, input_budget=16, target_budget=answer_len, alpha={"IMAGE": 1e6, "TEXT": 1e-6},
                          rng=random.Random(0))
    assert [c.column for c in trained.encoder] == ["image"] and [c.column for c in trained.decoder] == ["label"]
    batch = collate([trained], tok, model.task_ids, pass_name="masked", modality_ids=model.modality_ids)
    with torch.no_grad():
        logp = model(batch).logits.float().log_softmax(-1)[0]
    ids = trained.decoder[0].tokens
    expected = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    ranked = model.infer(task, [row], candidates=labels)[0]
    assert ranked.scores[labels.index(row["label"])] == pytest.approx(expected, abs=1e-4)
    assert (batch.decoder.tags.pass_id == PASSES.index("masked")).all()
    # greedy decoding reads the same pass: its first token is the best first token of a label there
    firsts = sorted({tok.encode(label)[0] for label in labels})
    greedy = model.infer(task, [row])[0]
    assert greedy.tokens[0] == firsts[int(logp[0, firsts].argmax())] and greedy.text in labels


def test_a_given_decoder_slot_is_an_input_of_a_masked_objective_task(tok):
    """The masked objective's streams hold every data position, a given ``no_loss`` decoder slot's
    too; decoding such a task reads it in the encoder, as training could have put it."""
    from moe_gen.masking import masked_view

    rows = [{"q": "hi", "p": "the prompt", "a": "one"}, {"q": "hello", "p": "x", "a": "two"}]
    task = Task("given", "[TEXT:q] -> [TEXT:p,no_loss] : [TEXT:a,closed_set]", rows, objective="masked")
    plan = task.plan(tok)
    view = masked_view(plan.encode(rows[0], 0, training=False, inference=True, template=0))
    assert [c.column for c in view.encoder] == ["q", "p"] and not view.decoder
    model = build([task], tok, predict_all_features=True).eval()
    assert all(a.text in ("one", "two") for a in model.infer(task, rows))


# ---- mutation-testing audit (r15): budgets, order and frame flags pinned down -------------------------------

def _two_modality_sample(padded_values: int = 3):
    """A hand-made sample: 5 text tokens in the encoder, then 6 audio rows (the last padded) in the decoder."""
    from moe_gen.tasks.plan import INPUT, TARGET
    from moe_gen.tasks.sample import Chunk, Sample

    text = Chunk("TEXT", INPUT, False, tokens=[11, 12, 13, 14, 15], column="q")
    audio = Chunk("AUDIO", TARGET, True, rows=torch.arange(24.0).reshape(6, 4), positions=torch.zeros(6, 3,
                  dtype=torch.long), adaptor="audio", column="a", padded_values=padded_values, ends=True)
    return Sample("hand", 0, encoder=[text], decoder=[audio], task_modalities=("TEXT", "AUDIO"))


def test_split_budget_spends_exactly_the_budget_and_defaults_unnamed_alphas_to_one():
    """Shares are floored, then the remainder handed out: the counts sum to the budget exactly
    (rounding shares could spend one more); a modality the α mapping leaves out gets α 1.0,
    as ``TrainConfig.masked_alpha`` documents: the same draw as naming it with 1.0."""
    from moe_gen.masking import split_budget

    available = {"AUDIO": 50, "IMAGE": 50, "TEXT": 50}
    for seed in range(40):
        split = split_budget(10, available, 1.0, random.Random(seed))
        assert sum(split.values()) == 10 and all(0 <= n <= 50 for n in split.values()), (seed, split)
        partial = split_budget(10, available, {"IMAGE": 5.0}, random.Random(seed))
        named = split_budget(10, available, {"AUDIO": 1.0, "IMAGE": 5.0, "TEXT": 1.0}, random.Random(seed))
        assert partial == named, seed
    # all of a modality, and no more, when the budget exceeds what the sample holds
    assert split_budget(500, {"TEXT": 3, "IMAGE": 4, "AUDIO": 0}, 1.0, random.Random(0)) == \
        {"TEXT": 3, "IMAGE": 4, "AUDIO": 0}


def test_a_modality_of_alpha_zero_takes_no_share_of_the_budget():
    """α 0 is allowed (``masked_target_alpha={"IMAGE": 0.0}``: predict no image rows unless nothing
    else is left); the draw floors it at 1e-6: NumPy before 1.25 refuses α 0 in a Dirichlet, later
    ones draw all zeros where every α is 0, and the remainder then always went to the first name."""
    from moe_gen.masking import split_budget

    for seed in range(10):
        assert split_budget(10, {"IMAGE": 20, "TEXT": 15}, {"IMAGE": 0.0}, random.Random(seed)) == \
            {"IMAGE": 0, "TEXT": 10}, seed
    # what the other modality cannot hold still goes to it
    assert split_budget(10, {"IMAGE": 20, "TEXT": 4}, {"IMAGE": 0.0}, random.Random(0)) == {"IMAGE": 6, "TEXT": 4}
    # α 0 for all: each draw gives the whole budget to one modality, either one
    drawn = [split_budget(10, {"IMAGE": 20, "TEXT": 15}, 0.0, random.Random(seed)) for seed in range(20)]
    assert all(sorted(split.values()) == [0, 10] for split in drawn)
    assert {max(split, key=split.get) for split in drawn} == {"IMAGE", "TEXT"}


def test_a_modality_without_positions_leaves_the_split_of_the_others_as_if_it_were_absent():
    """The target split of a sample whose inputs took all of one modality: that modality, with no
    position left, takes no part in the Dirichlet draw, so the others' split is the one drawn
    without it (given a share, it handed it on to the largest other share, skewing the split)."""
    from moe_gen.masking import split_budget

    alpha = {"AUDIO": 5.0, "IMAGE": 1.0, "TEXT": 1.0}
    for seed in range(20):
        with_empty = split_budget(12, {"AUDIO": 0, "IMAGE": 30, "TEXT": 30}, alpha, random.Random(seed))
        without = split_budget(12, {"IMAGE": 30, "TEXT": 30}, alpha, random.Random(seed))
        assert with_empty == {"AUDIO": 0, **without}, seed


def test_a_masked_task_with_no_scored_decoder_slot_is_refused_by_name(tok):
    from moe_gen.masking import check_masked_answer

    for instruction in ("[TEXT:q] -> [TEXT:a,no_loss]", "[TEXT:q] -> answer: [TEXT:a,no_loss] done"):
        task = Task("m", instruction, [{"q": "hi", "a": "x"}], objective="masked")
        with pytest.raises(ValueError, match="task 'm' has no scored decoder slot to decode"):
            check_masked_answer(task.plan(tok))


def test_the_target_budget_is_split_by_the_target_alpha(tok):
    """With every input an image code (input α) and a target α that favours text, the digit's
    label is a target of every sample; with the input α for both it never is."""
    from moe_gen.masking import mask_sample

    task = load_preset("digit_masked_modeling", "train", limit=4)
    alpha = {"IMAGE": 1.0, "TEXT": 0.0}
    for i in range(4):
        full = task.encode(i, tok, training=False)
        label = sum(len(c) for c in full.decoder if c.column == "label")  # the whole label, then codes
        split = mask_sample(full, input_budget=4, target_budget=4, alpha=alpha,
                            target_alpha={"IMAGE": 0.0, "TEXT": 1.0}, rng=random.Random(i))
        assert 1 <= label < 4 and split.meta["budgets"]["target"] == {"IMAGE": 4 - label, "TEXT": label}
        assert [c.modality for c in split.decoder] == ["TEXT", "IMAGE"]
        same = mask_sample(full, input_budget=4, target_budget=4, alpha=alpha, rng=random.Random(i))
        assert same.meta["budgets"]["target"] == {"IMAGE": 4, "TEXT": 0}
        assert {c.modality for c in same.decoder} == {"IMAGE"}



def test_the_masked_objective_splits_its_target_budget_by_its_target_alpha(tok):
    """``MaskedObjective(target_alpha=...)`` reaches the masking: every input an image code (the
    input α) and a target α for text make the digit's label a target of every row; without a
    target α (the input α for both) no row predicts it. ``prepare`` is ``mask_sample`` with the
    objective's budgets and alphas, then ``collate``."""
    from moe_gen.masking import mask_sample
    from moe_gen.objectives import MaskedObjective

    task = load_preset("digit_masked_modeling", "train", limit=4)
    model = build([task], tok, predict_all_features=True)
    samples = list(task.samples(tok))
    alpha, target_alpha = {"IMAGE": 1.0, "TEXT": 0.0}, {"IMAGE": 0.0, "TEXT": 1.0}
    text = model.modality_ids["TEXT"]

    def text_targets(objective):
        batch = objective.prepare(samples, random.Random(0))
        return int(((batch.decoder.tags.modality == text) & (batch.labels != -100)).any(1).sum()), batch

    split = MaskedObjective(model, input_budget=4, target_budget=4, alpha=alpha, target_alpha=target_alpha)
    same = MaskedObjective(model, input_budget=4, target_budget=4, alpha=alpha)
    (with_label, batch), (without, _) = text_targets(split), text_targets(same)
    assert (with_label, without) == (len(samples), 0)
    rng = random.Random(0)
    masked = [mask_sample(s, input_budget=4, target_budget=4, alpha=alpha, target_alpha=target_alpha, rng=rng)
              for s in samples]
    expected = collate(masked, tok, model.task_ids, pass_name="masked", modality_ids=model.modality_ids)
    assert torch.equal(batch.labels, expected.labels) and torch.equal(batch.encoder.tokens, expected.encoder.tokens)


def test_masked_inputs_and_targets_keep_their_stream_order_and_frame_flags():
    """Each modality's picked positions stay in stream order (inputs and targets); a frame chunk
    keeps the source's padding and stop flag only where its last row is the signal's last row."""
    from moe_gen.masking import mask_sample

    sample = _two_modality_sample(padded_values=3)
    drawn = set()
    for seed in range(30):
        masked = mask_sample(sample, input_budget=6, target_budget=4, alpha=1.0, rng=random.Random(seed))
        for chunks in (masked.encoder, masked.decoder):
            for modality in ("TEXT", "AUDIO"):
                places = [p for c in chunks if c.modality == modality for p in c.position_ids]
                assert places == sorted(set(places)), (seed, modality, places)
        for c in masked.encoder + masked.decoder:
            if c.rows is None:
                assert c.tokens == [11 + p for p in c.position_ids]
                continue
            assert c.rows.tolist() == [sample.decoder[0].rows[p].tolist() for p in c.position_ids]
            last = c.position_ids[-1] == 5
            assert (c.padded_values, c.ends) == ((3, True) if last else (0, False)), (seed, c.position_ids)
            drawn.add(last)
    assert drawn == {True, False}  # both cases were drawn


def test_masked_view_orders_modalities_as_training_does():
    """The inference view lists modalities by name, as ``mask_sample`` does, whatever order the
    template gives them (text first here): decoding reads inputs in training's layout."""
    from moe_gen.masking import mask_sample, masked_view

    sample = _two_modality_sample(padded_values=0)
    view = masked_view(sample)
    assert [c.modality for c in view.encoder] == ["AUDIO", "TEXT"] and not view.decoder
    assert [c.position_ids for c in view.encoder] == [list(range(6)), list(range(5))]
    trained = mask_sample(sample, input_budget=10, target_budget=1, alpha=1.0, rng=random.Random(0))
    assert list(dict.fromkeys(c.modality for c in trained.encoder)) == ["AUDIO", "TEXT"]
