"""Defects an audit of the routing-analysis report found (2026-12-05, eighth session), each
pinned: the rows it says it read, its held-out loss, its arguments, its JSON and its
interference summary."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch

from moe_gen.analysis import report, stats
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, load_preset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def species(tok):
    split = load_preset("table_species", "test")
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), [split], tok), split


def test_the_rows_reported_are_the_rows_recorded(tok):
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [load_preset("table_species", "train", limit=10)], tok)
    split = load_preset("table_species", "test")  # 20 of its 30 rows hold species the model never saw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = report.analyze(model, [split], limit=32, interference_rows=0)
    assert analysis.rows == {"table_species": 10}  # said 30


def test_the_held_out_loss_does_not_depend_on_the_batch_size(species, tok):
    model, split = species
    losses = [report.analyze(model, [split], limit=30, batch_size=b, interference_rows=0).evaluation["table_species"]
              ["loss"] for b in (1, 4, 30)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(losses[2], rel=1e-5)
    # Tasks whose objective draws masks (masked, MaskGIT): each batch seeded its own draws, so a row's
    # masks, the loss (9.85, 8.86 and 8.13 on the masked task at 1, 2 and 8) and the routes
    # recorded changed with the batch size.
    for name in ("digit_masked_modeling", "text_to_image_maskgit"):
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour("debug"), [load_preset(name, "train", limit=8)], tok).eval()
        split = load_preset(name, "test")
        analyses = [report.analyze(model, [split], limit=8, batch_size=b, interference_rows=0) for b in (1, 2, 8)]
        losses = [a.evaluation[name]["loss"] for a in analyses]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
        for a in analyses[1:]:
            assert torch.equal(a.tables.counts_LETMR, analyses[0].tables.counts_LETMR), name


def test_arguments_that_would_record_nothing_or_twice_are_refused(species):
    model, split = species
    cases = [({"batch_size": 0}, "batch_size must be a whole number >= 1"),
             ({"batch_size": -1}, "batch_size must be a whole number >= 1"),
             ({"interference_rows": -1}, "interference_rows must be a whole number >= 0")]
    # a limit of True read 1 row; 2.5 and "3" failed with TypeErrors from deep inside
    cases += [({"limit": bad}, rf"limit must be a whole number >= 1 or None \(every row\), got {re.escape(repr(bad))}")
              for bad in (0, True, 2.5, "3")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            report.analyze(model, [split], **{"limit": 4, **kwargs})
    with pytest.raises(ValueError, match=r"tasks \['table_species'\] are given more than once"):
        report.analyze(model, [split, split], limit=4, interference_rows=0)


def test_labels_given_as_bytes_are_the_labels_the_model_saved(tok):
    def as_bytes(split):
        return split.with_rows([{**r, "species": r["species"].encode()} for r in split.data])

    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [as_bytes(load_preset("table_species", "train"))], tok)
    assert len(report._samples(model, as_bytes(load_preset("table_species", "test")), 4)) == 4  # all refused


def test_routing_json_holds_no_nan_and_one_task_has_no_interference_between_tasks(species, tmp_path):
    model, split = species
    model = copy.deepcopy(model)  # its weights are broken below
    analysis = report.analyze(model, [split], limit=4, interference_rows=4)
    keys = report.key_numbers(analysis)
    assert keys["most negative interference"] == "–" and keys["mean interference (off-diagonal)"] == "–"  # was 1.0
    with torch.no_grad():  # a diverged expert: its cosine similarities are NaN
        model.encoder.blocks[0].ffn.experts.w_in[3, 0, 0] = float("inf")
    analysis.similarity = stats.expert_similarity(model)
    assert stats.json_ready(torch.tensor([float("nan"), 1.0])) == [None, 1.0]
    report.write_report(analysis, str(tmp_path))
    text = (tmp_path / "routing.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"routing.json holds {c}"))
    assert os.path.exists(tmp_path / "report.md")


# ---- a second audit (2026-12-05, ninth session) ----------------------------------------------------

def test_forward_mode_routes_a_masked_task_as_its_training_does():
    """Forward mode collated every task as a generative one: a masked-modeling task's tokens were
    routed with another pass tag and unmasked inputs, so the report described routes the model
    never uses (its encoder experts differed from training's)."""
    import random

    from moe_gen.analysis import RoutingRecorder
    from moe_gen.config import RouterConfig
    from moe_gen.objectives import MaskedObjective

    torch.manual_seed(0)
    train = load_preset("digit_masked_modeling", "train", limit=8)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute"), "top_k": 1}),
                                  [train], Tokenizer.default()).eval()
    test = load_preset("digit_masked_modeling", "test")
    analysis = report.analyze(model, [test], limit=4, interference_rows=0)
    objective = MaskedObjective(model)
    with RoutingRecorder(model) as recorder, torch.no_grad():
        objective(objective.prepare(report._samples(model, test, 4), random.Random(0)))
    torch.testing.assert_close(analysis.tables.counts_LETMR, recorder.tables().counts_LETMR)


def test_a_one_expert_layer_has_no_max_off_diagonal_similarity(tmp_path):
    torch.manual_seed(0)
    train = load_preset("table_species", "train", limit=8)
    model = GeneralistModel.build(flavour("debug", moe={"num_experts": 1, "top_k": 1}), [train], Tokenizer.default())
    analysis = report.analyze(model, [load_preset("table_species", "test")], limit=4, interference_rows=0)
    report.write_report(analysis, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "| encoder.blocks.0.ffn | 0 | — |" in text  # read -1 (1 - 2), a cosine no pair had


def test_a_link_whose_outputs_are_not_a_mapping_is_refused_when_made():
    from moe_gen.model.chain import Link

    with pytest.raises(ValueError, match=r"outputs maps the task's target columns to row columns"):
        Link("text_to_image", "image")  # failed with AttributeError after the link's inference had run
