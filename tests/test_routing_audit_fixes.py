"""Routing defects found by an audit (2026-12-05, seventh session); each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tags

from moe_gen import MoE
from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig


def _layer(**router) -> MoE:
    torch.manual_seed(0)
    config = MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2, router=RouterConfig(strategy="token", **router))
    return MoE(config)


@pytest.mark.parametrize("shape, padded", [((2, 4), True), ((0,), False)], ids=["all-padding", "no-tokens"])
def test_grouped_balance_losses_of_a_batch_without_valid_tokens_are_zero(shape, padded):
    """torch.stack of no groups raised; a rank without tokens under expert parallelism would crash."""
    moe = _layer(balance_loss_groups=("modality", "task")).train()
    x = torch.randn(*shape, 8, requires_grad=True)
    out = moe(x, tags=random_tags(shape), padding_mask=torch.ones(shape, dtype=torch.bool) if padded else None)
    assert out.aux_losses["balance_modality"].item() == 0.0 and out.aux_losses["balance_task"].item() == 0.0
    sum(out.aux_losses.values()).backward()


def test_gate_options_that_would_change_nothing_or_route_at_random_are_refused():
    with pytest.raises(ValueError, match="selection_bias.*'expert_choice'.*would change nothing"):
        MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2,
                  router=RouterConfig(strategy="token", gate="expert_choice", selection_bias=True))
    for noise in ("gaussian", "gumbel", "jitter"):  # (jitter scales the input the fixed hash reads: it was accepted)
        with pytest.raises(ValueError, match=f"noise '{noise}' would make the fixed 'hash' gate route"):
            MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2,
                      router=RouterConfig(strategy="token", gate="hash", noise=noise))
    MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2, router=RouterConfig(strategy="token", gate="hash"))
    for gate in ("expert_choice", "balanced", "hash"):  # they set their own weights: normalize=True was ignored
        with pytest.raises(ValueError, match=f"normalize=True renormalises the top-k gate's weights; gate '{gate}'"):
            MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2,
                      router=RouterConfig(strategy="token", gate=gate, normalize=True))
        MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2, router=RouterConfig(strategy="token", gate=gate))


def test_a_linear_shared_expert_of_another_width_is_refused_when_configured():
    """It built, then failed on the first forward adding [T, 16] to [T, 32]."""
    with pytest.raises(ValueError, match="linear shared expert outputs shared_hidden=32.*d_hidden=16"):
        MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2,
                  experts=ExpertsConfig(kind="linear", shared_expert=True, shared_hidden=32))
    MoE(MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2,
                  experts=ExpertsConfig(kind="linear", shared_expert=True, shared_hidden=16)))(torch.randn(3, 8))
