"""Auxiliary routing losses: balance, z and importance losses by hand, which apply to which routers,
and padding that adds to none of them (moved from test_routing.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_tags, routing_moe

from moe_gen import MoE, RouterConfig
from moe_gen.routing import balance_loss, importance_loss, z_loss

D, E = 16, 8


def make_moe(**kwargs) -> MoE:
    return routing_moe(**{"d_model": D, "num_experts": E, **kwargs})


def test_balance_loss_is_one_when_uniform_and_larger_when_not():
    probs = torch.full((8, 4), 0.25)
    ids = torch.arange(8).remainder(4).unsqueeze(1)
    assert float(balance_loss(probs, ids)) == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    assert float(balance_loss(skewed, torch.zeros(8, 1, dtype=torch.long))) == pytest.approx(4 * 0.7)


def test_z_and_importance_losses_by_hand():
    logits = torch.zeros(5, 4)
    assert float(z_loss(logits)) == pytest.approx(math.log(4) ** 2)
    assert float(importance_loss(torch.full((6, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-12)
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # importance (2, 0): var 1, mean 1
    assert float(importance_loss(probs)) == pytest.approx(1.0)


def test_importance_loss_divides_by_the_squared_mean():
    probs = torch.tensor([[1.0, 0.0]] * 4)  # importance (4, 0): var 4, mean 2, CV² = 4 / 2² = 1
    assert float(importance_loss(probs)) == pytest.approx(1.0)
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75], [1.0, 0.0]])  # (2, 1): var 0.25, mean 1.5
    assert float(importance_loss(probs)) == pytest.approx(0.25 / 1.5**2)


def test_every_loss_of_a_batch_without_valid_tokens_is_zero():
    assert float(balance_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long))) == 0.0
    assert float(importance_loss(torch.zeros(0, 4))) == 0.0
    assert float(z_loss(torch.zeros(0, 4))) == 0.0
    moe = make_moe(router=RouterConfig(balance_loss_weight=0.5, importance_loss_weight=1.0, z_loss_weight=0.1))
    x = torch.randn(2, 3, D, requires_grad=True)
    out = moe(x, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert set(out.aux_losses) == {"balance", "importance", "z"}
    assert all(loss.item() == 0.0 for loss in out.aux_losses.values())
    out.aux_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.router.parameters() if p.grad is not None)


@pytest.mark.parametrize("strategy", ["modality", "task", "attribute"])
@pytest.mark.parametrize("capacity_factor", [None, 100.0], ids=["group-routes", "token-routes"])
def test_tag_routed_losses_equal_the_token_losses_of_their_valid_tokens(strategy, capacity_factor):
    """Group routes (dropless) weight each group's z-loss by its valid members; routes expanded to
    tokens (capacity) compute it token by token: both equal the ST-MoE loss over the valid tokens."""
    torch.manual_seed(0)
    moe = make_moe(capacity_factor=capacity_factor,
                   router=RouterConfig(strategy=strategy, balance_loss_weight=0.5, z_loss_weight=0.25))
    x, tags = torch.randn(3, 12, D), random_tags((3, 12))
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 5:] = pad[2, 2:] = True
    out = moe(x, tags=tags, padding_mask=pad)
    r = out.routing
    assert (r.groups is None) == (capacity_factor is not None)
    valid = r.valid
    torch.testing.assert_close(out.aux_losses["z"], 0.25 * z_loss(r.logits[valid]))
    torch.testing.assert_close(out.aux_losses["tag_balance"], 0.5 * balance_loss(r.probs[valid], r.topk_ids[valid]))


def test_count_losses_are_skipped_for_expanded_tag_routes_and_balanced_gates():
    cfg = dict(balance_loss_weight=0.5, importance_loss_weight=2.0, z_loss_weight=0.25)
    x, tags = torch.randn(40, D), random_tags((40,))
    expanded = make_moe(capacity_factor=100.0, router=RouterConfig(strategy="task", **cfg))(x, tags=tags)
    assert expanded.routing.groups is None and set(expanded.aux_losses) == {"tag_balance", "z"}
    chosen = make_moe(router=RouterConfig(gate="expert_choice", **cfg))(x, tags=tags)
    assert set(chosen.aux_losses) == {"z"}


def test_aux_losses_are_weighted_and_tag_routing_skips_count_losses():
    cfg = dict(balance_loss_weight=0.5, z_loss_weight=0.25, importance_loss_weight=2.0)
    x, tags = torch.randn(40, D), random_tags((40,))
    token = make_moe(router=RouterConfig(strategy="token", **cfg))
    out = token(x, tags=tags)
    assert set(out.aux_losses) == {"balance", "z", "importance"}
    r = out.routing
    torch.testing.assert_close(out.aux_losses["balance"], 0.5 * balance_loss(r.probs, r.topk_ids))
    torch.testing.assert_close(out.aux_losses["z"], 0.25 * z_loss(r.logits))
    torch.testing.assert_close(out.aux_losses["importance"], 2.0 * importance_loss(r.probs))
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    for strategy in ("modality", "task", "attribute"):
        tagged = make_moe(router=RouterConfig(strategy=strategy, **cfg))(x, tags=tags)
        # no token-count losses; the default tag_balance="loss" balances the tag groups instead
        assert set(tagged.aux_losses) == {"tag_balance", "z"}
        torch.testing.assert_close(tagged.aux_losses["tag_balance"],
                                   0.5 * balance_loss(tagged.routing.probs, tagged.routing.topk_ids))
    hybrid = make_moe(router=RouterConfig(strategy="hybrid", **cfg))(x, tags=tags)
    assert "balance" in hybrid.aux_losses


def test_grouped_balance_losses_by_hand():
    x, tags = torch.randn(60, D), random_tags((60,))
    moe = make_moe(router=RouterConfig(balance_loss_weight=1.0, balance_loss_groups=("modality", "task")))
    out = moe(x, tags=tags)
    r = out.routing
    for name, group in (("balance_modality", tags.modality), ("balance_task", tags.task)):
        expected = torch.stack([
            balance_loss(r.probs[group == g], r.topk_ids[group == g]) for g in torch.unique(group)
        ]).mean()
        torch.testing.assert_close(out.aux_losses[name], expected)


def test_losses_ignore_padding():
    moe = make_moe(router=RouterConfig(importance_loss_weight=1.0))
    x = torch.randn(2, 10, D)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4:] = True
    padded = moe(x, padding_mask=pad)
    x2 = x.clone()
    x2[1, 4:] = 1e4  # garbage in padding changes nothing
    again = moe(x2, padding_mask=pad)
    for name in padded.aux_losses:
        torch.testing.assert_close(padded.aux_losses[name], again.aux_losses[name])
    valid = torch.cat([x[0], x[1, :4]])
    alone = moe(valid)
    for name in padded.aux_losses:
        torch.testing.assert_close(padded.aux_losses[name], alone.aux_losses[name])
