"""MoE layers frozen for inference: merge_for_inference copies, merged weights per route and per set of
expert routes, kept plans and route caches, all equal to the unmerged layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_tags, with_backend
from torch import nn

from moe_gen import (
    ExpertsConfig,
    MoE,
    MoEConfig,
    RouterConfig,
    TokenTags,
    merge_for_inference,
)

D, H = 16, 24


def test_merge_for_inference_is_a_snapshot_that_keeps_routes_and_merged_weights():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    x, tags = torch.randn(40, D), random_tags((40,))
    with torch.no_grad():
        torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
        assert merged.backend._cache and merged.router._routes  # kept per route / per set of tag groups
        again = merged(x, tags=random_tags((40,)))  # other tag groups: new routes, same kept weights
        assert again.output.shape == (40, D)
        # the original is untouched and still trains; the copy is a snapshot of its weights
        assert not moe.frozen and moe.config.backend == "torch" and moe.experts.w_out.requires_grad
        before = merged(x, tags=tags).output
        moe.experts.w_out.mul_(2.0)
        assert torch.equal(merged(x, tags=tags).output, before)
        merged.load_state_dict(moe.state_dict())  # new weights: what was kept is dropped
        torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in merged.parameters())
    with pytest.raises(ValueError, match="frozen for inference by merge_for_inference; train the original"):
        merged.train()


def test_merge_for_inference_leaves_content_routed_layers_and_refuses_them_alone():
    model = nn.ModuleDict({"tag": MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="modality")),
                           "content": MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="token"))})
    merged = merge_for_inference(model)
    assert merged["tag"].frozen and merged["tag"].config.backend == "merged"
    assert not merged["content"].frozen and merged["content"].config.backend == "torch"
    with pytest.raises(ValueError, match="'token' routes every token by its content; only tag-routed"):
        model["content"].freeze_for_inference()


def test_merged_backend_follows_data_writes_without_any_cache_to_clear():
    # Only a layer frozen by merge_for_inference keeps merged weights; the merged backend itself
    # builds them on every call, so even writes through .data are seen.
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router="modality", backend="merged")).eval()
    x, tags = torch.randn(12, D), random_tags((12,))
    with torch.no_grad():
        moe(x, tags=tags)
        moe.experts.w_out.data.mul_(2.0)
        merged = moe(x, tags=tags).output
        moe.set_backend("torch")
        torch.testing.assert_close(merged, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,activation,bias", [("mlp", "gelu", True), ("glu", "silu", True),
                                                  ("mlp", "relu", False), ("linear", "gelu", True)])
@pytest.mark.parametrize("strategy", ["modality", "task", "attribute", "instruction"])
def test_merged_inference_by_expert_set_equals_unmerged(kind, activation, bias, strategy):
    # Inference groups tag groups that use the same set of experts (with different gate weights)
    # into one matmul pair and scales each row's hidden units (and output biases) by its own weights.
    torch.manual_seed(0)
    experts = ExpertsConfig(kind=kind, activation=activation, bias=bias)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router=strategy, experts=experts)).eval()
    merged = with_backend(moe, "merged")
    x, tags = torch.randn(3, 30, D), random_tags((3, 30))
    pad = torch.zeros(3, 30, dtype=torch.bool)
    pad[1, 20:], pad[2, 5:] = True, True
    x[pad] = float("nan")  # padding may hold anything
    with torch.no_grad():
        reference = moe(x, tags=tags, padding_mask=pad)
        out = merged(x, tags=tags, padding_mask=pad)
    torch.testing.assert_close(out.output, reference.output, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.output[pad], torch.zeros(int(pad.sum()), out.output.shape[-1]))
    assert torch.equal(out.routing.expert_counts, reference.routing.expert_counts)
    torch.testing.assert_close(out.aux_losses, reference.aux_losses)
    if strategy == "attribute" and kind != "linear":
        # what this test is about: several routes share one set of experts
        groups = out.routing.groups
        live = groups.count_G > 0
        routes = {(tuple(i), tuple(w)) for i, w in zip(groups.ids_GK[live].tolist(), groups.weights_GK[live].tolist())}
        sets = {tuple(sorted(i)) for i, _ in routes}
        assert len(sets) < len(routes)


def test_grouped_routes_expand_to_the_per_token_decision():
    # Dropless tag routing keeps routes per tag group; its per-token tensors (expanded on first
    # access) and z-loss equal the per-token path the router takes under a capacity limit that drops
    # nothing.
    torch.manual_seed(0)
    config = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router=RouterConfig(strategy="attribute",
                                                                                        z_loss_weight=0.1))
    grouped = MoE(config)
    per_token = MoE(config.replace(capacity_factor=100.0))
    per_token.load_state_dict(grouped.state_dict())
    x, tags = torch.randn(2, 25, D), random_tags((2, 25))
    pad = torch.zeros(2, 25, dtype=torch.bool)
    pad[1, 12:] = True
    a, b = grouped(x, tags=tags, padding_mask=pad), per_token(x, tags=tags, padding_mask=pad)
    assert a.routing.groups is not None and b.routing.groups is None
    for name in ("topk_ids", "topk_weights", "mask", "probs", "logits", "valid", "expert_counts"):
        torch.testing.assert_close(getattr(a.routing, name), getattr(b.routing, name), msg=name)
    assert int(a.routing.dropped_tokens) == int(b.routing.dropped_tokens) == 0
    torch.testing.assert_close(a.aux_losses["z"], b.aux_losses["z"])
    torch.testing.assert_close(a.output, b.output, atol=1e-6, rtol=1e-6)
    # without autograd the losses are computed when read, with the same values
    with torch.no_grad():
        lazy = grouped(x, tags=tags, padding_mask=pad)
    torch.testing.assert_close(lazy.aux_losses["z"], a.aux_losses["z"].detach())


def test_frozen_layer_keeps_one_route_entry_per_set_of_tag_groups():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    x = torch.randn(40, D)
    with torch.no_grad():
        for step in range(3):
            tags = random_tags((40,), generator=torch.Generator().manual_seed(step % 2))  # fresh tags objects
            torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
        assert len(merged.router._routes) == 2  # one entry per set of tag groups
        # the original's router changes in place; the frozen copy is a snapshot
        moe.router.weight.mul_(-1.0)
        moe.router.input.attributes.norm.bias.add_(0.5)
        assert not torch.allclose(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-3)
        merged.load_state_dict(moe.state_dict())  # loading drops the kept routes
        assert not merged.router._routes
        torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
    merged.to(torch.float64)  # moving or casting drops them too
    assert not merged.router._routes and not merged.backend._cache


def test_a_frozen_layers_route_cache_keeps_at_most_its_limit_evicting_the_oldest():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    merged.router.MAX_CACHED_ROUTES = 2  # an instance attribute, so three sets of tag groups overflow it
    x = torch.randn(20, D)
    keys = []
    with torch.no_grad():
        for seed in range(3):
            tags = random_tags((20,), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
            keys.append(list(merged.router._routes)[-1])
    assert len(set(keys)) == 3
    assert list(merged.router._routes) == keys[1:]  # the first set was evicted, the newest two kept


def test_a_frozen_layer_forgets_what_it_kept_when_a_part_of_it_loads_weights(tmp_path):
    import copy
    import pickle

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    other = copy.deepcopy(moe)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    merged = merge_for_inference(moe)
    x, tags = torch.randn(40, D), random_tags((40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged(x, tags=tags)  # keeps routes and merged weights
        merged.experts.load_state_dict(other.experts.state_dict())  # the experts alone
        assert not merged.backend._cache and not merged.router._routes
        merged.router.input.load_state_dict(other.router.input.state_dict())  # part of the router
        merged.router.weight.copy_(other.router.weight)  # (a plain write: not seen, so before the next call)
        torch.testing.assert_close(merged(x, tags=tags).output, other(x, tags=tags).output, atol=1e-5, rtol=1e-5)
        merged.router.input.load_state_dict(moe.router.input.state_dict())
        assert not merged.router._routes and not merged.backend._plans
    # the hooks survive copies and pickling, bound to the copy's own layer
    for again in (copy.deepcopy(merged), pickle.loads(pickle.dumps(merged))):
        with torch.no_grad():
            again(x, tags=tags)
            again.experts.load_state_dict(moe.experts.state_dict())
        assert not again.backend._cache and merged.backend._cache is not again.backend._cache


def test_copies_around_in_place_blocks_race_free_and_freezing_twice_adds_no_hooks():
    import copy
    from unittest import mock

    from moe_gen.moe import merged_in_place
    from moe_gen.routing.router import Router

    layer = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    own = type(layer.backend)
    # another thread's infer enters a block after the layer's state was read, before its router's:
    # the copy's router still comes out as outside the block
    block, entered = merged_in_place(layer), []
    original = Router.__getstate__

    def entering(router):
        if not entered:
            entered.append(block.__enter__())
        return original(router)

    with mock.patch.object(Router, "__getstate__", entering):
        other = copy.deepcopy(layer)
    assert layer.frozen and layer.router.cache_routes  # the block runs the original merged
    assert type(other.backend) is own and not other.frozen and not other.router.cache_routes
    # a shallow copy inside the block leaves the original's state (shared router) alone
    x, tags = torch.randn(12, D), random_tags((12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer(x, tags=tags)
    copy.copy(layer)
    assert layer.router.cache_routes and layer.router._routes
    block.__exit__(None, None, None)
    assert type(layer.backend) is own and not layer.frozen
    merged = merge_for_inference(merge_for_inference(layer))  # merged twice: one hook per part
    assert all(len(m._load_state_dict_post_hooks) == 1 for m in merged.modules() if m is not merged)


@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("mlp", "gelu_tanh"), ("mlp", "relu"), ("mlp", "silu"),
                                             ("glu", "silu")])
def test_frozen_layer_runs_small_batches_as_one_group_over_the_union_of_their_experts(kind, activation):
    # A frozen layer may run the rows of several expert sets as one group through every expert
    # their tag groups use, each row's other experts weighted 0 (fewer, larger matmuls); per expert
    # set or as one group, the outputs are the unmerged layer's, and padding outputs zeros. (Every
    # activation: inference applies plain ones in place.)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute",
                        experts=ExpertsConfig(kind=kind, activation=activation))).eval()
    x, tags = torch.randn(4, 10, D), random_tags((4, 10))
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[1, 6:] = pad[3, 2:] = True
    per_set, union = merge_for_inference(moe), merge_for_inference(moe)
    per_set.backend.UNION_MAX_EXTRA_MACS, union.backend.UNION_MAX_EXTRA_MACS = 0, 1 << 40
    with torch.no_grad():
        reference = moe(x, tags=tags, padding_mask=pad).output
        for layer in (per_set, union):
            out = layer(x, tags=tags, padding_mask=pad).output
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
            assert not out[pad].any()
    # merged weights kept: of the union (more than K experts), or only of K-expert sets
    assert max(len(key[1]) for key in union.backend._cache) > 2
    assert {len(key[1]) for key in per_set.backend._cache} == {2}
    # float16 keeps one group per expert set: an unused expert's overflow times 0 would be NaN
    half = merge_for_inference(moe).to(torch.float16)
    half.backend.UNION_MAX_EXTRA_MACS = 1 << 40
    with torch.no_grad():
        out = half(x.half(), tags=tags, padding_mask=pad).output
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    assert {len(key[1]) for key in half.backend._cache} == {2}


def test_unfrozen_merged_layer_sees_writes_through_data():
    # no cache outside a frozen layer: router and expert writes through .data take effect at once
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router="attribute", backend="merged")).eval()
    x, tags = torch.randn(30, D), random_tags((30,))
    with torch.no_grad():
        before = moe(x, tags=tags).output
        moe.router.weight.data.mul_(-1.0)
        moe.experts.w_out.data.mul_(3.0)
        after = moe(x, tags=tags).output
        reference = with_backend(moe, "torch")(x, tags=tags).output
    assert not moe.router._routes and not moe.backend._cache
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before)
    # and with autograd (merged per route, not per set of experts)
    torch.testing.assert_close(moe(x, tags=tags).output, reference, atol=1e-5, rtol=1e-5)




def _plan_tags(shape, case: str) -> TokenTags:
    """Tags of one tag group; of several (task, role vary) that a modality router sends down one
    route; or of several routes (random)."""
    tags = random_tags(shape)
    if case == "one group":
        ones = torch.ones(shape, dtype=torch.long)
        return dataclasses.replace(tags, task=ones * 0, modality=ones, role=ones, causal=ones.bool(),
                                   task_modalities=tags.task_modalities[0, 0].expand(*shape, -1).clone())
    if case == "groups of one route":
        return dataclasses.replace(tags, modality=torch.ones(shape, dtype=torch.long))
    return tags


_PLAN_CASES = ["one group", "groups of one route", "union", "union, shared expert"]


@pytest.mark.parametrize("kind,activation,bias,case", [
    (kind, activation, bias, case)
    for kind, activation, bias in [("mlp", "gelu", True), ("glu", "silu", True), ("mlp", "relu", False),
                                   ("linear", "gelu", True)]
    for case in _PLAN_CASES if not (kind == "linear" and case.startswith("union"))  # one matrix per route
])
@pytest.mark.parametrize("padded", [False, True])
def test_frozen_layer_runs_its_kept_plan_like_the_unmerged_layer(kind, activation, bias, case, padded):
    # A frozen layer keeps a plan per set of tag groups, from its second call on runs it (one
    # merged FFN with the gate weights folded in, or one FFN over the union of the groups' experts
    # with each row's gate weights) without the router: outputs, routing and losses are the unmerged
    # layer's, padding (even NaN) outputs zeros, and (check_finite) a non-finite real token is refused.
    torch.manual_seed(0)
    strategy = "attribute" if case.startswith("union") else "modality"
    experts = ExpertsConfig(kind=kind, activation=activation, bias=bias, shared_expert="shared" in case)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router=strategy, experts=experts,
                        check_finite=True)).eval()
    merged = merge_for_inference(moe)
    shape = (3, 7)
    tags = _plan_tags(shape, case)
    x = torch.randn(*shape, D)
    pad = torch.zeros(shape, dtype=torch.bool)
    if padded:
        pad[1, 4:] = pad[2, 2:] = True
        x[pad] = float("nan")  # padding may hold anything
    mask = pad if padded else None
    router_calls = []
    merged.router.register_forward_hook(lambda *args: router_calls.append(1))
    with torch.no_grad():
        reference = moe(x, tags=tags, padding_mask=mask)
        first = merged(x, tags=tags, padding_mask=mask)  # routes the groups, keeps the plan and runs it
        assert len(merged.backend._plans) == 1 and len(router_calls) == 1
        kept = merged(x, tags=dataclasses.replace(tags), padding_mask=mask)  # new tags objects, same groups
        assert len(router_calls) == 1  # the plan ran without the router
        for out in (first, kept):
            torch.testing.assert_close(out.output, reference.output, atol=1e-5, rtol=1e-5)
            assert torch.equal(out.output[pad], torch.zeros(int(pad.sum()), out.output.shape[-1]))
        torch.testing.assert_close(kept.aux_losses, reference.aux_losses)
        assert torch.equal(kept.routing.expert_counts, reference.routing.expert_counts)
        plan = merged.backend._plans[next(iter(merged.backend._plans))]
        assert (plan.scale_GU is None) == (not case.startswith("union"))
        bad = x.clone()
        bad[0, 1] = float("inf")
        refused = r"non-finite values in 1 token\(s\); first at \(batch, position\) \(0, 1\)"
        with pytest.raises(ValueError, match=refused):
            merged(bad, tags=tags, padding_mask=mask)
        # new weights or a new dtype: the plans go with the merged weights
        merged.to(torch.float64)
        assert not merged.backend._plans
        merged(x.double(), tags=tags, padding_mask=mask)
        torch.testing.assert_close(merged(x.double(), tags=tags, padding_mask=mask).output.float(),
                                   reference.output, atol=1e-5, rtol=1e-5)
        merged.load_state_dict(moe.to(torch.float64).state_dict())
        assert not merged.backend._plans


def test_frozen_layer_keeps_no_union_plan_for_batches_too_large_for_the_union():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    merged.backend.UNION_MAX_EXTRA_MACS = 0  # every union costs more than allowed
    x, tags = torch.randn(40, D), random_tags((40,))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)
    assert not merged.backend._plans


def test_a_kept_union_plan_declined_for_a_larger_batch_of_the_same_groups_leaves_it_to_the_full_path():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    tags = random_tags((40,))
    x = torch.randn(40, D)
    with torch.no_grad():
        merged(x, tags=tags)  # a union plan for these groups, made for 40 rows
        (plan,) = merged.backend._plans.values()
        assert plan.scale_GU is not None
        merged.backend.UNION_MAX_EXTRA_MACS = 40 * plan.extra_per_row  # 40 rows fit the union, 160 do not
        big_tags, big_x = TokenTags.cat([tags] * 4), torch.randn(160, D)
        torch.testing.assert_close(merged(big_x, tags=big_tags).output, moe(big_x, tags=big_tags).output,
                                   atol=1e-5, rtol=1e-5)
        assert merged.backend.run_kept(merged.experts, big_x, merged._tag_batch(big_x, big_tags, None)) is None
        assert list(merged.backend._plans.values()) == [plan]  # kept, not replaced
        torch.testing.assert_close(merged(x, tags=tags).output, moe(x, tags=tags).output, atol=1e-5, rtol=1e-5)


def test_a_frozen_layer_gives_zeros_for_a_batch_of_padding_only_and_routing_of_its_call():
    # (a review found: an all-padding batch crashed a union plan; the routing read after the layer
    # changed described the new weights, not the ones the output used)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    tags, x = random_tags((3, 7)), torch.randn(3, 7, D)
    padding = torch.ones(3, 7, dtype=torch.bool)
    with torch.no_grad():
        for warm in (False, True):  # the plan made by this batch, and one kept from a batch with rows
            merged = merge_for_inference(moe)
            if warm:
                merged(x, tags=tags)
                assert any(p.scale_GU is not None for p in merged.backend._plans.values())  # a union plan
            out = merged(x, tags=tags, padding_mask=padding).output
            assert torch.equal(out, torch.zeros_like(out))
            assert torch.equal(out, moe(x, tags=tags, padding_mask=padding).output)
        merged = merge_for_inference(moe)
        merged(x, tags=tags)
        out = merged(x, tags=tags)  # from the kept plan: routing computed only when read
        expected = moe(x, tags=tags).routing
        other = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute"))
        merged.load_state_dict(other.state_dict())
        assert torch.equal(out.routing.topk_ids, expected.topk_ids)
        torch.testing.assert_close(out.routing.topk_weights, expected.topk_weights)


def test_freezing_a_layer_alone_takes_its_gradients_and_training_mode():
    """``freeze_for_inference`` on its own (not through ``merge_for_inference``, whose copy already
    has no gradients) leaves no parameter of the layer requiring a gradient, in eval mode."""
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="attribute",
                        experts=ExpertsConfig(shared_expert=True, shared_gate=True)))
    moe.freeze_for_inference()
    assert not moe.training and moe.frozen
    assert [n for n, p in moe.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("vocab", [None, (9, 3, 3, 64)])  # checked against nothing, or another layer's sizes
def test_a_tag_batch_is_checked_against_the_layers_own_vocabularies(vocab):
    from moe_gen.routing.tags import TagBatch

    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4,
                        router=RouterConfig(strategy="attribute", num_tasks=4)))
    tags = TokenTags.constant((2, 5), task=5)
    with pytest.raises(ValueError, match=r"tags.task values must lie in \[0, 4\)"):
        moe(torch.randn(2, 5, D), tags=TagBatch(tags, shape=(2, 5), vocab=vocab))


@pytest.mark.parametrize("warm", [False, True])
def test_a_frozen_layers_output_holds_no_reference_cycle_and_reads_its_routing_once(warm):
    # (found 2026-12-07: the output's lazy auxiliary losses referred back to the output, so every
    # frozen call left a cycle that held its tensors until the garbage collector ran; greedy
    # generation then ran about 2% slower than it needs to)
    import gc

    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router="attribute")).eval()
    merged = merge_for_inference(moe)
    x, tags = torch.randn(3, 7, D), random_tags((3, 7))
    with torch.no_grad():
        if warm:
            merged(x, tags=tags)  # the plan is kept: the next call runs it without the router
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            out = merged(x, tags=tags)
            del out
            assert gc.collect() == 0 and not gc.garbage
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        out, reference = merged(x, tags=tags), moe(x, tags=tags)
        losses = out.aux_losses  # computed from the routing, which is then kept for .routing
        assert out.routing is out.routing
        assert torch.equal(out.routing.topk_ids, reference.routing.topk_ids)
        torch.testing.assert_close(losses, reference.aux_losses)
