"""Property tests (hypothesis): slot assignment and dispatch hold for arbitrary routings."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_gen import BACKENDS, ExpertsConfig, RouterOutput
from moe_gen.experts import GLUExperts, MLPExperts
from moe_gen.routing import slot_positions


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), K=st.integers(1, 4), E=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       prioritise=st.booleans())
def test_slot_positions_fill_each_expert_in_priority_order(T, K, E, seed, prioritise):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    mask = torch.rand(T, K, generator=g) < 0.8
    priority = torch.randperm(T, generator=g) if prioritise else None
    positions, counts = slot_positions(ids, mask, E, priority)
    assert torch.equal(counts, torch.bincount(ids[mask], minlength=E))
    rank = torch.empty(T, dtype=torch.long)
    rank[priority if priority is not None else torch.arange(T)] = torch.arange(T)
    for e in range(E):
        t, k = ((ids == e) & mask).nonzero(as_tuple=True)
        # slots 0..n-1, each used once
        assert sorted(positions[t, k].tolist()) == list(range(len(t)))
        # a lower slot never belongs to a later (choice, priority) than a higher slot
        order = sorted(range(len(t)), key=lambda i: int(positions[t[i], k[i]]))
        keys = [(int(k[i]), int(rank[t[i]])) for i in order]
        assert keys == sorted(keys)


def hand_routing(T, K, E, g) -> RouterOutput:
    """An arbitrary routing decision (distinct experts per token, random weights and drops)."""
    ids = torch.zeros(0, K, dtype=torch.long)
    if T:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    mask = torch.rand(T, K, generator=g) < 0.7
    valid = torch.rand(T, generator=g) < 0.9
    mask &= valid.unsqueeze(1)
    positions, counts = slot_positions(ids, mask, E)
    return RouterOutput(
        topk_ids=ids, topk_weights=torch.where(mask, weights, 0.0), mask=mask, positions=positions,
        capacity=int(counts.max()) if T else 0, probs=torch.zeros(T, E), logits=torch.zeros(T, E),
        valid=valid, expert_counts=counts, dropped_assignments=torch.tensor(0),
        dropped_tokens=torch.tensor(0), content_dependent=False, balanced_by_construction=False,
        learned_gate=True,
    )


def run_backend(name, experts, x, routing):
    backend = BACKENDS.get(name)()
    dispatched = backend.dispatch(x, routing)
    y = backend.combine(backend.run(experts, dispatched), dispatched, x)
    return torch.zeros(x.shape[0], experts.d_out) if y is None else y


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 30), K=st.integers(1, 3), E=st.integers(3, 6), seed=st.integers(0, 2**31 - 1),
       gated=st.booleans())
def test_every_backend_computes_the_weighted_expert_sum(T, K, E, seed, gated):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = (GLUExperts if gated else MLPExperts)(8, 6, E, ExpertsConfig(activation="silu"))
    x = torch.randn(T, 8, generator=g)
    routing = hand_routing(T, K, E, g)
    expected = torch.zeros(T, 8)
    for t in range(T):
        for k in range(K):
            if routing.mask[t, k]:
                e = int(routing.topk_ids[t, k])
                expected[t] += routing.topk_weights[t, k] * experts.forward_expert(e, x[t:t + 1])[0]
    for name in BACKENDS.list():
        if BACKENDS.get(name).unavailable_reason(x.device) is not None:
            continue  # an optional backend that is not installed here (its own tests say why they skip)
        torch.testing.assert_close(run_backend(name, experts, x, routing), expected, atol=1e-5, rtol=1e-5)
