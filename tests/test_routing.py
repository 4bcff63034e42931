"""Routers: strategies, gates, noise, capacity and tags (auxiliary losses: test_routing_losses.py)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from helpers import random_tags, routing_moe

from moe_gen import ROUTERS, MoE, MoEConfig, RouterConfig, TokenTags
from moe_gen.routing import attribute_dim, capacity_for, slot_positions
from moe_gen.routing.tags import TagBatch

D, E = 16, 8


def make_moe(**kwargs) -> MoE:
    return routing_moe(**{"d_model": D, "num_experts": E, **kwargs})


@pytest.mark.parametrize("strategy", ["modality", "task", "attribute", "instruction"])
@pytest.mark.parametrize("noise", ["none", "gaussian", "gumbel", "jitter"])
def test_content_independent_routes_are_identical_within_a_tag_group(strategy, noise):
    moe = make_moe(router=RouterConfig(strategy=strategy, noise=noise)).train()
    x = torch.randn(96, D)
    tags = random_tags((96,))
    routing = moe(x, tags=tags).routing
    key = tags.group_key()
    groups = torch.unique(key)
    assert len(groups) > 3  # the fixture really mixes several tag groups
    for g in groups:
        members = (key == g).nonzero().squeeze(1)
        ids, weights = routing.topk_ids[members], routing.topk_weights[members]
        assert torch.equal(ids, ids[:1].expand_as(ids))
        assert torch.equal(weights, weights[:1].expand_as(weights))


def test_content_dependent_routes_vary_within_a_tag_group():
    moe = make_moe(router="token")
    routing = moe(torch.randn(64, D), tags=TokenTags.constant(64)).routing
    assert len(torch.unique(routing.topk_ids, dim=0)) > 1


def test_context_routing_ignores_padding_and_other_rows():
    moe = make_moe(router="context")
    x = torch.randn(3, 10, D)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True
    full = moe(x, padding_mask=pad)
    # Change the padding values and another row: row 0's valid routes and outputs stay.
    x2 = x.clone()
    x2[0, 6:] = float("nan")
    x2[2] = torch.randn(10, D)
    other = moe(x2, padding_mask=pad)
    ids = full.routing.topk_ids.view(3, 10, -1)
    ids2 = other.routing.topk_ids.view(3, 10, -1)
    assert torch.equal(ids[0, :6], ids2[0, :6])
    torch.testing.assert_close(full.output[0, :6], other.output[0, :6])
    assert torch.equal(other.output[0, 6:], torch.zeros(4, D))


def test_packed_samples_pool_context_per_sample():
    moe = make_moe(router="context")
    a, b = torch.randn(5, D), torch.randn(7, D)
    tags = TokenTags.constant(12)
    packed_tags = TokenTags(**{**tags.__dict__, "sample": torch.tensor([0] * 5 + [1] * 7)})
    packed = moe(torch.cat([a, b]), tags=packed_tags).output
    alone = moe(a, tags=TokenTags.constant(5)).output
    torch.testing.assert_close(packed[:5], alone)


def _context_reference(ctx, x_TD, segment_T, causal_T, valid_T):
    """z of a context router, token by token: the mean over the valid tokens of its sequence that are
    not causal and, for a causal token, the causal ones up to itself."""
    rows = []
    for t in range(x_TD.shape[0]):
        seen = [u for u in range(x_TD.shape[0]) if valid_T[u] and segment_T[u] == segment_T[t]
                and (not causal_T[u] or (causal_T[t] and u <= t))]
        mean = x_TD[seen].double().mean(0) if seen else torch.zeros(x_TD.shape[1], dtype=torch.float64)
        rows.append(x_TD[t] + ctx.context_proj(mean.float()))
    return torch.stack(rows)


def test_context_pools_what_each_token_sees_and_carries_it_across_calls():
    from moe_gen.routing.inputs import ContextInput
    from moe_gen.routing.tags import _segments

    torch.manual_seed(0)
    ctx = ContextInput(D, RouterConfig(strategy="context"))
    # Two rows of [prompt (4 positions, not causal) ; answer (3 positions, causal)], row 1 padded in both;
    # row 0 packs two samples (positions 0-1 and 4-5 are sample 0, 2-3 and 6 sample 1).
    B, P, L = 2, 4, 3
    x = torch.randn(B, P + L, D)
    causal = torch.tensor([[False] * P + [True] * L] * B)
    valid = torch.tensor([[True] * 7, [True, True, False, False, True, True, False]])
    sample = torch.tensor([[0, 0, 1, 1, 0, 0, 1], [0] * 7])
    tags_BS = dataclasses.replace(TokenTags.constant((B, P + L)), causal=causal, sample=sample)
    tags = tags_BS.flatten()
    segment = _segments((B, P + L), tags, None)
    x[~valid] = float("nan")  # padding never reaches a valid token's pool
    with torch.no_grad():
        z = ctx(x.reshape(-1, D), tags, segment, valid.reshape(-1))
        expected = _context_reference(ctx, x.reshape(-1, D), segment, causal.reshape(-1), valid.reshape(-1))
        flat_valid = valid.reshape(-1)
        torch.testing.assert_close(z[flat_valid], expected[flat_valid])
        # The same tokens in calls: the prompt, then one answer position per call (cached decoding),
        # the router's carry holding what earlier calls saw (one sample per row here).
        tags1 = dataclasses.replace(tags_BS, sample=torch.zeros(B, P + L, dtype=torch.long))
        segment1 = _segments((B, P + L), tags1.flatten(), None)
        whole = ctx(x.reshape(-1, D), tags1.flatten(), segment1, valid.reshape(-1)).view(B, P + L, D)
        carry: dict = {}
        parts = [slice(0, P)] + [slice(P + j, P + j + 1) for j in range(L)]
        for part in parts:
            part_tags = tags1.select((slice(None), part)).flatten()
            width = part.stop - part.start
            z_part = ctx(x[:, part].reshape(-1, D), part_tags, _segments((B, width), part_tags, None),
                         valid[:, part].reshape(-1), carry=carry).view(B, width, D)
            torch.testing.assert_close(z_part[valid[:, part]], whole[:, part][valid[:, part]])
    assert carry["count"].view(-1).tolist() == [7, 4]


def test_context_without_causal_tokens_adds_the_projected_mean_of_each_sequence():
    # the path taken when no token is causal (encoders) and outside cached decoding: every valid
    # token adds the projection of its sequence's mean; padding and the other sequences stay out
    from moe_gen.routing.inputs import ContextInput
    from moe_gen.routing.tags import _segments

    torch.manual_seed(0)
    ctx = ContextInput(D, RouterConfig(strategy="context"))
    x = torch.randn(2, 6, D)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    sample = torch.tensor([[0, 0, 0, 1, 1, 1], [0] * 6])  # row 0 packs two samples
    tags = dataclasses.replace(TokenTags.constant((2, 6)), sample=sample).flatten()
    segment, flat_valid = _segments((2, 6), tags, None), valid.reshape(-1)
    x[~valid] = float("nan")
    with torch.no_grad():
        z = ctx(x.reshape(-1, D), tags, segment, flat_valid)
        expected = _context_reference(ctx, x.reshape(-1, D), segment, torch.zeros(12, dtype=torch.bool), flat_valid)
        torch.testing.assert_close(z[flat_valid], expected[flat_valid])
        # by hand for row 1: the mean of its 3 valid tokens
        row1 = x[1, :3]
        torch.testing.assert_close(z.view(2, 6, D)[1, :3], row1 + ctx.context_proj(row1.mean(0)))


def test_context_causal_prefixes_are_summed_in_float64_outside_training():
    # prompt tokens of +1e4 then -1e4 that cancel: summed in float32 the running sum (~1e5) rounds
    # their small parts away (errors of ~1e-4 in z), so cached decoding's carried sums and the full
    # forward would route the answer tokens differently; in float64 both give the exact mean
    from moe_gen.routing.inputs import ContextInput
    from moe_gen.routing.tags import _segments

    torch.manual_seed(0)
    ctx = ContextInput(D, RouterConfig(strategy="context"))
    P, L = 32, 4
    x = torch.rand(1, P + L, D)
    x[0, :P] += torch.tensor([1e4] * (P // 2) + [-1e4] * (P // 2)).unsqueeze(1)
    causal = torch.tensor([[False] * P + [True] * L])
    tags = dataclasses.replace(TokenTags.constant((1, P + L)), causal=causal).flatten()
    valid = torch.ones(P + L, dtype=torch.bool)
    segment = _segments((1, P + L), tags, None)
    with torch.no_grad():
        z = ctx(x.reshape(-1, D), tags, segment, valid)
        expected = _context_reference(ctx, x.reshape(-1, D), segment, causal.reshape(-1), valid)
    torch.testing.assert_close(z[P:], expected[P:], rtol=0, atol=1e-5)


def test_context_carry_survives_a_call_without_tokens():
    # a decoding call with no tokens (a layer that gets none) keeps every sequence's carried sums
    from moe_gen.routing.inputs import ContextInput
    from moe_gen.routing.tags import _segments

    torch.manual_seed(0)
    ctx = ContextInput(D, RouterConfig(strategy="context"))
    B, P = 2, 3
    x = torch.randn(B, P + 1, D)
    tags = dataclasses.replace(TokenTags.constant((B, P + 1)), causal=torch.tensor([[False] * P + [True]] * B))
    valid = torch.ones(B * (P + 1), dtype=torch.bool)
    with torch.no_grad():
        whole = ctx(x.reshape(-1, D), tags.flatten(), _segments((B, P + 1), tags.flatten(), None), valid)
        carry: dict = {}
        for part in (slice(0, P), slice(P, P), slice(P, P + 1)):
            part_tags = tags.select((slice(None), part)).flatten()
            width = part.stop - part.start
            z = ctx(x[:, part].reshape(-1, D), part_tags, _segments((B, width), part_tags, None),
                    torch.ones(B * width, dtype=torch.bool), carry=carry)
            assert carry["count"].view(-1).tolist() == [part.stop] * B
        torch.testing.assert_close(z, whole.view(B, P + 1, D)[:, P])


def test_hybrid_input_is_the_token_plus_the_attribute_input():
    from moe_gen.routing.inputs import AttributeInput, HybridInput

    torch.manual_seed(0)
    config = RouterConfig(strategy="hybrid")
    hybrid, attribute = HybridInput(D, config), AttributeInput(D, config)
    attribute.load_state_dict(hybrid.state_dict())
    x, tags = torch.randn(12, D), random_tags((12,))
    with torch.no_grad():
        torch.testing.assert_close(hybrid(x, tags, None, None), x + attribute(x, tags, None, None))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_topk_weights_normalisation(k):
    x = torch.randn(32, D)
    renorm = make_moe(top_k=k, router=RouterConfig(normalize=True))
    raw = make_moe(top_k=k, router=RouterConfig(normalize=False))
    raw.load_state_dict(renorm.state_dict())
    r1, r2 = renorm(x).routing, raw(x).routing
    assert torch.equal(r1.topk_ids, r2.topk_ids)
    torch.testing.assert_close(r1.topk_weights.sum(-1), torch.ones(32))
    torch.testing.assert_close(r2.topk_weights, r2.probs.gather(1, r2.topk_ids))
    # ids are the k largest probabilities, in order
    top = r2.probs.topk(k, dim=-1)
    assert torch.equal(r2.topk_ids, top.indices)


def test_k1_default_keeps_probability_so_router_learns():
    moe = make_moe(top_k=1)
    out = moe(torch.randn(32, D))
    assert not torch.allclose(out.routing.topk_weights, torch.ones(32, 1))
    out.output.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ROUTERS.list())
def test_router_receives_gradients_through_gate_weights(strategy):
    moe = make_moe(router=RouterConfig(strategy=strategy, z_loss_weight=0.0, balance_loss_weight=0.0))
    out = moe(torch.randn(40, D), tags=random_tags((40,)))
    assert out.aux_losses == {}
    out.output.pow(2).sum().backward()
    router_grads = [p.grad for n, p in moe.named_parameters() if n.startswith("router.")]
    assert router_grads and all(g is not None for g in router_grads)
    assert sum(float(g.abs().sum()) for g in router_grads) > 0


def test_gate_is_fp32_under_bf16_autocast():
    moe = make_moe()
    x = torch.randn(32, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.routing.logits.dtype == torch.float32
    assert out.routing.probs.dtype == torch.float32
    assert out.routing.topk_weights.dtype == torch.float32
    assert out.output.dtype == torch.bfloat16
    (out.output.float().sum() + out.aux_loss).backward()
    assert moe.router.weight.grad.dtype == torch.float32
    assert moe.experts.w_in.grad is not None and x.grad is not None
    # The fp32 routing equals routing computed without autocast, and the token router's logits are
    # x · Wᵀ in fp32 (in bf16 they would be off by up to ~1e-2)
    assert torch.equal(out.routing.topk_ids, moe(x).routing.topk_ids)
    expected = torch.nn.functional.linear(x.detach().double(), moe.router.weight.detach().double())
    torch.testing.assert_close(out.routing.logits.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("noise", ["gaussian", "gumbel", "jitter"])
def test_noise_only_in_training(noise):
    moe = make_moe(router=RouterConfig(noise=noise, noise_std=0.5))
    x = torch.randn(256, D)
    moe.eval()
    a, b = moe(x).routing, moe(x).routing
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)
    moe.train()
    c = moe(x).routing
    assert not torch.equal(a.topk_weights, c.topk_weights)
    if noise == "gumbel":  # weights stay the clean probabilities of the chosen experts
        torch.testing.assert_close(c.probs, a.probs)


def test_jitter_scales_the_router_input_by_uniform_factors_around_one():
    # Switch: z·U(1-ε, 1+ε). With an identity projection the logits are z itself, so logits / x
    # shows the factors: within [1-ε, 1+ε] and spread to both sides of 1.
    moe = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, top_k=1,
                        router=RouterConfig(noise="jitter", jitter_eps=0.5))).train()
    moe.router.weight.data.copy_(torch.eye(4))
    x = torch.rand(500, 4) + 0.5
    factors = moe(x).routing.logits.detach() / x
    assert float(factors.min()) >= 0.5 - 1e-6 and float(factors.max()) <= 1.5 + 1e-6
    assert float(factors.min()) < 0.6 and float(factors.max()) > 1.4
    assert abs(float(factors.mean()) - 1.0) < 0.05


def test_gaussian_noise_default_sigma_is_one_over_e():
    moe = make_moe(router=RouterConfig(noise="gaussian")).train()
    moe.router.weight.data.zero_()  # clean logits are 0, so noisy probs reveal the noise scale
    probs = moe(torch.randn(4000, D)).routing.probs.detach()
    logits = probs.log() - probs.log().mean(-1, keepdim=True)  # noise minus its row mean
    expected = (1.0 / E) * math.sqrt(1 - 1 / E)
    assert abs(float(logits.std()) - expected) < 0.1 * expected


def test_expert_choice_gives_each_expert_capacity_tokens():
    moe = make_moe(top_k=2, router=RouterConfig(gate="expert_choice"))
    T = 40
    routing = moe(torch.randn(T, D)).routing
    capacity = math.ceil(2 * T / E)
    assert routing.capacity == capacity
    assert routing.mask.shape == (T, E)
    assert torch.equal(routing.expert_counts, torch.full((E,), capacity))
    # each expert took its `capacity` highest-probability tokens
    for e in range(E):
        chosen = routing.mask[:, e].nonzero().squeeze(1)
        best = routing.probs[:, e].topk(capacity).indices
        assert set(chosen.tolist()) == set(best.tolist())
    torch.testing.assert_close(routing.topk_weights, torch.where(routing.mask, routing.probs, 0.0))
    assert int(routing.dropped_tokens) == int((~routing.mask.any(-1)).sum())


def test_expert_choice_gives_each_expert_at_least_min_capacity_tokens():
    # The documented floor max(min_capacity, ceil(f·k·N/E)) holds for expert choice too (it gave
    # ceil(f·k·N/E) = 2 slots for 10 tokens of 8 experts, dropping tokens min_capacity=4 would keep).
    moe = make_moe(num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=4,
                   router=RouterConfig(gate="expert_choice"))
    routing = moe(torch.randn(10, D)).routing
    assert routing.capacity == 4
    assert torch.equal(routing.expert_counts, torch.full((8,), 4))
    # never more slots than valid tokens
    assert make_moe(num_experts=8, top_k=1, min_capacity=16,
                    router=RouterConfig(gate="expert_choice"))(torch.randn(10, D)).routing.capacity == 10


def test_expert_choice_never_picks_padding():
    moe = make_moe(top_k=2, router=RouterConfig(gate="expert_choice"))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 3:] = True
    routing = moe(torch.randn(2, 8, D), padding_mask=pad).routing
    assert not routing.mask[pad.reshape(-1)].any()


def test_balanced_assignment_is_balanced_and_optimal():
    T, E_small = 6, 3
    moe = MoE(MoEConfig(d_model=D, d_hidden=8, num_experts=E_small, top_k=1,
                        router=RouterConfig(gate="balanced"))).train()
    x = torch.randn(T, D)
    routing = moe(x).routing
    assert torch.equal(routing.expert_counts, torch.full((E_small,), T // E_small))
    logits = routing.logits.detach()
    best = max(
        sum(float(logits[t, e]) for t, e in enumerate(assignment))
        for assignment in itertools.product(range(E_small), repeat=T)
        if all(assignment.count(e) <= T // E_small for e in range(E_small))
    )
    got = sum(float(logits[t, int(routing.topk_ids[t, 0])]) for t in range(T))
    assert got == pytest.approx(best, abs=1e-5)
    moe.eval()  # BASE picks greedily at inference
    assert torch.equal(moe(x).routing.topk_ids[:, 0], logits.argmax(-1))


def test_balanced_gate_needs_k1():
    with pytest.raises(ValueError, match="top_k=1"):
        make_moe(top_k=2, router=RouterConfig(gate="balanced"))


def test_hash_gate_is_fixed_and_uniform():
    moe = make_moe(top_k=2, router=RouterConfig(gate="hash"))
    assert "router.weight" not in dict(moe.named_parameters())
    assert "router.weight" in moe.state_dict()
    x = torch.randn(30, D)
    a = moe(x)
    assert a.aux_losses == {}
    torch.testing.assert_close(a.routing.topk_weights, torch.full((30, 2), 0.5))
    assert torch.equal(a.routing.topk_ids, moe(x).routing.topk_ids)


@pytest.mark.parametrize("capacity_factor", [None, 100.0], ids=["group-routes", "token-routes"])
def test_hash_gate_tag_routes_get_no_losses(capacity_factor):
    """A hash gate learns nothing: tag routes through it get no z-loss (its logits come from a fixed
    projection of a trainable tag input) and no balance loss, whether kept per group or per token."""
    moe = make_moe(capacity_factor=capacity_factor,
                   router=RouterConfig(strategy="modality", gate="hash", z_loss_weight=0.25, balance_loss_weight=0.5))
    out = moe(torch.randn(30, D), tags=random_tags((30,)))
    assert (out.routing.groups is None) == (capacity_factor is not None)
    assert out.aux_losses == {}


# ---- capacity -------------------------------------------------------------------------------


def fixed_router_moe(capacity_factor, drop_policy="in_order", min_capacity=0, E_small=4, k=2):
    """A token router whose logits are exactly x[:, :E] (identity projection)."""
    moe = MoE(MoEConfig(d_model=E_small, d_hidden=4, num_experts=E_small, top_k=k,
                        capacity_factor=capacity_factor, min_capacity=min_capacity,
                        drop_policy=drop_policy, router=RouterConfig(normalize=False)))
    moe.router.weight.data.copy_(torch.eye(E_small))
    return moe


def test_capacity_in_order_by_hand():
    # 4 tokens, all prefer expert 0 then expert 1; capacity = ceil(0.5 * 2 * 4 / 4) = 1.
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0],
                      [4.5, 3.5, 0.0, 0.0],
                      [5.0, 1.0, 0.0, 0.0],
                      [3.0, 2.0, 0.0, 0.0]])
    routing = fixed_router_moe(0.5)(x).routing
    assert routing.capacity == 1
    assert routing.topk_ids.tolist() == [[0, 1]] * 4
    # Expert 0's slot goes to token 0 (first choices, token order); expert 1's slot to token 0's
    # second choice as well (second choices come after all first choices, in token order).
    assert routing.mask.tolist() == [[True, True], [False, False], [False, False], [False, False]]
    assert int(routing.dropped_assignments) == 6
    assert int(routing.dropped_tokens) == 3
    assert routing.expert_counts.tolist() == [1, 1, 0, 0]


def test_capacity_batch_prioritized_by_hand():
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0],
                      [4.5, 3.5, 0.0, 0.0],
                      [5.0, 1.0, 0.0, 0.0],
                      [3.0, 2.0, 0.0, 0.0]])
    moe = fixed_router_moe(0.5, "batch_prioritized")
    routing = moe(x).routing
    # Priority by top-1 weight: token 2 (p≈0.96) first, so it takes expert 0 and expert 1 goes
    # to the highest-priority token whose second choice is expert 1: token 2 again.
    assert routing.mask[2].tolist() == [True, True]
    assert int(routing.mask.sum()) == 2
    assert int(routing.dropped_tokens) == 3


def test_capacity_min_and_positions():
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0]] * 6)
    routing = fixed_router_moe(0.1, min_capacity=2)(x).routing
    assert routing.capacity == 2  # ceil(0.1·2·6/4) = 1 < min_capacity
    assert routing.mask[:, 0].tolist() == [True, True, False, False, False, False]
    assert routing.positions[:2, 0].tolist() == [0, 1]


def test_capacity_and_drops_count_valid_tokens_only():
    # 4 valid tokens and 2 padding, all preferring expert 0 then expert 1: capacity is
    # ceil(0.5·2·4/4) = 1 from the valid tokens (2 if padding counted); of the 8 valid assignments
    # 2 are kept and 6 dropped, and the 4 assignments padding never had are not drops.
    x = torch.tensor([[[4.0, 3.0, 0.0, 0.0]] * 6])
    pad = torch.tensor([[False, False, False, False, True, True]])
    routing = fixed_router_moe(0.5)(x, padding_mask=pad).routing
    assert routing.capacity == 1
    assert routing.mask.tolist() == [[True, True]] + [[False, False]] * 5
    assert int(routing.dropped_assignments) == 6
    assert int(routing.dropped_tokens) == 3


def test_dropped_token_outputs_zero_and_shared_expert_still_applies():
    from moe_gen import ExpertsConfig

    x = torch.tensor([[4.0, 3.0, 0.0, 0.0]] * 5)
    moe = fixed_router_moe(0.2, min_capacity=1)
    out = moe(x)
    dropped = ~out.routing.mask.any(-1)
    assert int(dropped.sum()) == 4 and int(out.routing.dropped_tokens) == 4
    assert torch.equal(out.output[dropped], torch.zeros(4, 4))
    shared = MoE(moe.config.replace(experts=ExpertsConfig(shared_expert=True)))
    shared.load_state_dict(moe.state_dict(), strict=False)
    with_shared = shared(x).output
    torch.testing.assert_close(with_shared[dropped], shared.shared(x[dropped]))


def test_dropless_computes_everything():
    moe = make_moe(top_k=2, capacity_factor=None)
    routing = moe(torch.randn(50, D)).routing
    assert int(routing.dropped_assignments) == 0 and int(routing.dropped_tokens) == 0
    assert int(routing.expert_counts.sum()) == 100
    assert routing.capacity == int(routing.expert_counts.max())


def test_slot_positions_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    positions, counts = slot_positions(ids, mask, 3)
    # first choices: t0→e0 (0), t1→e0 (1), t2→e1 (0); then second: t0→e1 (1), t1→e2 (0)
    assert positions.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert counts.tolist() == [2, 2, 1]


def test_capacity_rounds_a_fraction_of_a_slot_up():
    # f·k·N/E: 0.3·2·5/4 = 0.75 → 1 slot (rounded down, every assignment would be dropped)
    assert capacity_for(5, 2, 4, 0.3, 0) == 1
    assert capacity_for(10, 2, 4, 1.25, 1) == 7  # 6.25 → 7
    assert capacity_for(8, 2, 4, 1.0, 0) == 4  # whole: no extra slot
    assert capacity_for(8, 2, 4, 1.0, 5) == 5  # min_capacity wins
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0]] * 5)
    routing = fixed_router_moe(0.3)(x).routing
    assert routing.capacity == 1
    assert routing.mask.tolist() == [[True, True]] + [[False, False]] * 4


def test_slot_positions_of_absent_assignments_are_zero():
    ids = torch.tensor([[2, 1], [2, 0], [2, 1]])
    mask = torch.tensor([[False, True], [False, False], [True, False]])
    positions, counts = slot_positions(ids, mask, 3)
    # the present ones: t0→e1 (0), t2→e2 (0); the absent ones take no slot and read 0
    assert positions.tolist() == [[0, 0], [0, 0], [0, 0]]
    assert counts.tolist() == [0, 1, 1]


def _group_routes_by_hand():
    from moe_gen.routing.output import GroupRoutes, RouterOutput

    # 6 tokens in 3 tag groups, the last one padding; E = 4, K = 2
    group_T = torch.tensor([0, 1, 1, 2, 0, 2])
    valid = torch.tensor([True, True, True, True, True, False])
    ids_GK = torch.tensor([[0, 1], [1, 2], [3, 1]])
    weights_GK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    logits_GE = torch.randn(3, 4)
    groups = GroupRoutes(group_T, ids_GK, weights_GK, logits_GE.softmax(-1), logits_GE,
                         count_G=torch.tensor([2, 2, 1]))
    none = torch.zeros((), dtype=torch.long)
    return RouterOutput(valid=valid, dropped_assignments=none, dropped_tokens=none, content_dependent=False,
                        balanced_by_construction=False, learned_gate=True, groups=groups)


def test_router_output_expands_group_routes_by_hand():
    routing = _group_routes_by_hand()
    g = routing.groups
    assert (routing.num_experts, routing.top_k) == (4, 2)
    # each valid member computes its group's K experts: e0 by group 0 (2), e1 by groups 0, 1, 2
    # (2 + 2 + 1), e2 by group 1 (2), e3 by group 2 (1); dropless, the capacity is the largest load
    assert routing.expert_counts.tolist() == [2, 5, 2, 1]
    assert routing.capacity == 5
    assert routing.topk_ids.tolist() == [[0, 1], [1, 2], [1, 2], [3, 1], [0, 1], [3, 1]]
    assert routing.mask.tolist() == [[True, True]] * 5 + [[False, False]]
    expected_weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.7, 0.3], [0.5, 0.5], [0.6, 0.4], [0.0, 0.0]])
    assert torch.equal(routing.topk_weights, expected_weights)  # 0 for padding
    torch.testing.assert_close(routing.probs[:5], g.probs_GE[g.group_T[:5]])
    assert torch.equal(routing.probs[5], torch.zeros(4))
    assert torch.equal(routing.logits, g.logits_GE[g.group_T])  # logits kept for padding too
    assert repr(routing) == "RouterOutput(T=6, K=2, E=4, capacity=5, 3 tag groups)"


def test_router_output_without_groups_needs_every_per_token_tensor():
    """Every per-token tensor is required; capacity may be left out (dropless: the largest expert
    load, computed from ``expert_counts`` when first read, so the router never waits for it)."""
    from moe_gen.routing.output import RouterOutput

    none = torch.zeros((), dtype=torch.long)
    common = dict(valid=torch.ones(2, dtype=torch.bool), dropped_assignments=none, dropped_tokens=none,
                  content_dependent=True, balanced_by_construction=False, learned_gate=True,
                  topk_ids=torch.zeros(2, 1, dtype=torch.long), topk_weights=torch.ones(2, 1),
                  mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"RouterOutput needs probs, logits \(or groups= to expand"):
        RouterOutput(**common, expert_counts=torch.tensor([2]))
    probs = torch.full((2, 3), 1 / 3)
    routing = RouterOutput(**common, expert_counts=torch.tensor([2, 0, 5]), probs=probs, logits=probs.log())
    assert routing.capacity == 5
    assert RouterOutput(**common, expert_counts=torch.tensor([2, 0, 5]), probs=probs, logits=probs.log(),
                        capacity=7).capacity == 7
    assert RouterOutput(**common, expert_counts=torch.zeros(0, dtype=torch.long), probs=probs[:, :0],
                        logits=probs[:, :0]).capacity == 0


# ---- tags ------------------------------------------------------------------------------------


def test_attribute_vector_layout():
    tags = TokenTags.constant(2, modality="AUDIO", role="target", causal=True, pass_="contrastive",
                              task_modalities=("AUDIO", "TEXT"))
    vec = tags.attribute_vector(9, 3, 3)
    assert vec.shape == (2, attribute_dim(9, 3, 3))
    expected = torch.zeros(attribute_dim(9, 3, 3))
    expected[[0, 2]] = 1  # task uses TEXT, AUDIO
    expected[9 + 2] = 1  # token modality AUDIO
    expected[18 + 1] = 1  # role target
    expected[21] = 1  # causal
    expected[22 + 1] = 1  # contrastive pass
    assert torch.equal(vec[0], expected)


def test_attribute_vector_places_every_tag_with_vocabularies_of_different_sizes():
    # M=5, R=4, P=3 and [B, S] tokens whose role and pass differ: a width or an index taken from the
    # wrong vocabulary, or one tag read for another, moves a bit (the built-in R = P = 3 hides it)
    M, R, P = 5, 4, 3
    modality = torch.tensor([[4, 0, 3], [1, 2, 4]])
    role = torch.tensor([[0, 1, 2], [3, 2, 1]])
    causal = torch.tensor([[True, False, True], [False, False, True]])
    pass_id = torch.tensor([[2, 0, 1], [1, 2, 0]])
    used = torch.zeros(2, 3, M, dtype=torch.bool)
    used[0, :, 0] = used[0, :, 4] = used[1, :, 3] = True
    tags = TokenTags(task=torch.zeros(2, 3, dtype=torch.long), modality=modality, role=role,
                     task_modalities=used, causal=causal, pass_id=pass_id)
    vec = tags.attribute_vector(M, R, P)
    assert vec.dtype == torch.float32 and vec.shape == (2, 3, attribute_dim(M, R, P)) == (2, 3, 18)
    # token [0, 0]: task uses modalities 0 and 4 | modality 4 | role 0 | causal | pass 2
    assert vec[0, 0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1]
    for b, s in itertools.product(range(2), range(3)):
        expected = torch.zeros(18)
        expected[:M] = used[b, s].float()
        expected[M + modality[b, s]] = 1
        expected[2 * M + role[b, s]] = 1
        expected[2 * M + R] = float(causal[b, s])
        expected[2 * M + R + 1 + pass_id[b, s]] = 1
        assert torch.equal(vec[b, s], expected), (b, s)


def test_group_key_distinguishes_every_tag():
    base = dict(task=1, modality="IMAGE", role="input", causal=False, pass_="generative")
    variants = [dict(base), {**base, "task": 2}, {**base, "modality": "TEXT"},
                {**base, "role": "target"}, {**base, "causal": True}, {**base, "pass_": "masked"},
                {**base, "task_modalities": ("IMAGE", "TEXT")}]
    keys = [int(TokenTags.constant(1, **v).group_key()[0]) for v in variants]
    assert len(set(keys)) == len(keys)


def test_constant_tags_default_to_the_tokens_own_modality_and_refuse_modalities_outside_the_vocabulary():
    # task_modalities defaults to the token's own modality alone, on every token of the shape
    tags = TokenTags.constant((2, 3), modality="AUDIO")
    expected = torch.zeros(2, 3, 9, dtype=torch.bool)
    expected[..., 2] = True
    assert torch.equal(tags.task_modalities, expected)
    listed = TokenTags.constant(2, modality="IMAGE", task_modalities=("TEXT", "BOX"), num_modalities=6)
    assert listed.task_modalities.tolist() == [[True, False, False, False, False, True]] * 2
    # -1 would set the last modality's bit (Python indexing), 9 would index past the multi-hot
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=rf"task modality index {bad} is outside \[0, 9\)"):
            TokenTags.constant(2, task_modalities=("TEXT", bad))


def test_cat_keeps_sample_only_when_every_part_has_it():
    with_sample = dataclasses.replace(TokenTags.constant(2, task=1), sample=torch.tensor([0, 1]))
    without = TokenTags.constant(3, task=2, modality="IMAGE")
    mixed = TokenTags.cat([with_sample, without])
    assert mixed.sample is None
    assert mixed.task.tolist() == [1, 1, 2, 2, 2] and mixed.modality.tolist() == [0, 0, 1, 1, 1]
    assert mixed.task_modalities.shape == (5, 9)
    both = TokenTags.cat([with_sample, dataclasses.replace(without, sample=torch.tensor([0, 0, 1]))])
    assert both.sample.tolist() == [0, 1, 0, 0, 1]


def test_group_key_packs_at_most_40_modalities():
    # 17 bits of modality, role, causal and pass, then M bits: with 40 modalities the 64 tasks that
    # RouterConfig allows still fit a signed 64-bit key; one modality more does not
    keys = TokenTags.cat([TokenTags.constant(1, task=t, task_modalities=range(40), num_modalities=40)
                          for t in range(64)]).group_key()
    assert (keys >= 0).all() and len(torch.unique(keys)) == 64
    with pytest.raises(ValueError, match="group_key supports at most 40 modalities, got 41"):
        TokenTags.constant(1, num_modalities=41).group_key()


@pytest.mark.parametrize("padded", [True, False])
def test_tag_batch_groups_and_derived_attributes_match_a_per_token_reference(padded):
    B, S = 4, 9
    tags = random_tags((B, S))
    sample = torch.tensor([0] * 5 + [1] * 4).repeat(B, 1)  # two samples packed per row
    tags = dataclasses.replace(tags, sample=sample)
    padding = torch.zeros(B, S, dtype=torch.bool)
    if padded:
        padding[1, 6:] = padding[3, 2:] = True
    batch = TagBatch(tags, padding, vocab=(9, 3, 3, 3), valid_rows=True)
    assert TagBatch(tags, padding, vocab=(9, 3, 3, 3), segments=False).segment is None
    assert TagBatch(tags, padding, vocab=(9, 3, 3, 3)).valid_rows is None  # only when asked for

    fields = ("task", "modality", "role", "causal", "pass_id")
    token_keys = [tuple(int(getattr(tags, f)[b, s]) for f in fields) + tuple(tags.task_modalities[b, s].tolist())
                  for b in range(B) for s in range(S)]
    distinct = sorted(set(token_keys), key=lambda k: token_keys.index(k))  # in order of first appearance
    key_of = {k: int(tags.group_key().reshape(-1)[token_keys.index(k)]) for k in distinct}
    assert batch.group_keys == tuple(sorted(key_of.values()))
    expected_ids = [batch.group_keys.index(key_of[k]) for k in token_keys]
    assert batch.group_ids.tolist() == expected_ids
    valid = [not bool(p) for p in padding.reshape(-1)]
    for g in range(len(batch.group_keys)):
        members = [t for t, i in enumerate(expected_ids) if i == g]
        assert int(batch.first_G[g]) == members[0]
        assert int(batch.group_counts[g]) == sum(valid[t] for t in members)
        for f in fields:
            assert int(getattr(batch.group_tags, f)[g]) == int(getattr(tags, f).reshape(-1)[members[0]])
    # one segment per (row, packed sample)
    segment = batch.segment.tolist()
    pairs = [(b, int(sample[b, s])) for b in range(B) for s in range(S)]
    assert all((segment[i] == segment[j]) == (pairs[i] == pairs[j]) for i in range(B * S) for j in range(B * S))
    index_N, group_N = batch.valid_rows
    if padded:
        assert index_N.tolist() == [t for t in range(B * S) if valid[t]]
        assert group_N.tolist() == [expected_ids[t] for t in range(B * S) if valid[t]]
    else:
        assert index_N is None and group_N is batch.group_ids


@pytest.mark.parametrize("strategy", ["token", "modality", "task", "attribute", "hybrid", "instruction", "context"])
def test_only_routers_that_pool_sequences_need_the_batch_segments(strategy):
    moe = make_moe(router=strategy).eval()
    x, tags = torch.randn(2, 6, D), random_tags((2, 6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    with torch.no_grad():
        reference = moe(x, tags=tags).output  # the layer builds its own TagBatch
        if strategy == "context":
            for call in (lambda b: moe(x, tags=b), lambda b: moe.router(x.reshape(12, D), b)):
                with pytest.raises(ValueError, match="pools each sequence; build the TagBatch with segments=True"):
                    call(TagBatch(tags, padding, segments=False))
        else:
            assert torch.equal(moe(x, tags=TagBatch(tags, padding, segments=False)).output, reference)


@pytest.mark.parametrize("strategy", ["token", "context", "attribute"])
@pytest.mark.parametrize("shared", [False, True])
def test_padding_that_holds_nan_leaves_every_gradient_finite(strategy, shared):
    """Padding may hold anything: the router scored it and the shared expert ran on it, and though
    the outputs were masked, 0 · NaN made the router's and shared expert's gradients NaN."""
    from moe_gen.config import ExpertsConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=6, num_experts=4, top_k=2, router=RouterConfig(strategy=strategy),
                        experts=ExpertsConfig(shared_expert=shared))).train()
    x = torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    clean = moe(x, tags=TokenTags.constant((2, 5)), padding_mask=padding).output[~padding]
    x[1, 3:] = float("nan")
    x.requires_grad_(True)
    out = moe(x, tags=TokenTags.constant((2, 5)), padding_mask=padding)
    torch.testing.assert_close(out.output[~padding], clean)
    (out.output[~padding].sum() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)


def test_a_row_wise_gate_that_may_choose_fewer_than_k_is_checked_before_routes_stay_per_group():
    """The router keeps tag routes per group (every valid member computes all K) without reading the
    gate's mask back only for gates that declare ``k_per_valid_row``; a registered row-wise gate that
    leaves some rows' second choice out keeps per-token routes, and only what it chose is computed."""
    from moe_gen.registry import GATES
    from moe_gen.routing.gates import GateChoice, TopKGate

    class FirstChoiceForEvenExperts(TopKGate):
        k_per_valid_row = False  # rows whose first expert is even drop their second assignment

        def choose(self, scores_TE, probs_TE, valid_T, *, capacity_factor, training):
            choice = super().choose(scores_TE, probs_TE, valid_T, capacity_factor=capacity_factor,
                                    training=training)
            mask_TK = choice.mask_TK.clone()
            mask_TK[:, 1] &= choice.ids_TK[:, 0] % 2 == 1
            return GateChoice(choice.ids_TK, torch.where(mask_TK, choice.weights_TK, 0.0), mask_TK)

    GATES.register("first_for_even_experts")(FirstChoiceForEvenExperts)
    try:
        x, tags = torch.randn(40, 16), random_tags((40,))
        for gate, per_group in (("first_for_even_experts", False), ("topk", True)):
            torch.manual_seed(0)
            moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=6, top_k=2,
                                router=RouterConfig(strategy="attribute", gate=gate)))
            routing = moe(x, tags=tags).routing
            assert (routing.groups is not None) == per_group, gate
            if not per_group:
                assert not routing.mask.all()  # (the inputs give some rows an even first expert)
                assert torch.equal(routing.mask[:, 1], routing.topk_ids[:, 0] % 2 == 1)
    finally:
        GATES.unregister("first_for_even_experts")
