"""Every dispatch backend computes the same function as the eager oracle (outputs and grads)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tags, run_with_grads, with_backend

from moe_gen import BACKENDS, ROUTERS, MoE, MoEConfig, RouterConfig

D, H, E, T = 16, 24, 8, 48
CONTENT_FREE = [s for s in ROUTERS.list() if not ROUTERS.get(s).content_dependent]


def _cases():
    for backend in ("torch", "einsum", "merged"):
        for strategy in ROUTERS.list():
            if backend == "merged" and strategy not in CONTENT_FREE:
                continue  # merged needs shared routes; MoE refuses it (tested in test_moe)
            for k in (1, 2, 4):
                for cf in (None, 1.0):
                    yield backend, strategy, k, cf


def assert_same(reference, candidate, atol=1e-5):
    out_r, aux_r, gx_r, grads_r = reference
    out_c, aux_c, gx_c, grads_c = candidate
    torch.testing.assert_close(out_c, out_r, atol=atol, rtol=1e-5)
    assert aux_c.keys() == aux_r.keys()
    for name in aux_r:
        torch.testing.assert_close(aux_c[name], aux_r[name], atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx_c, gx_r, atol=atol, rtol=1e-5)
    assert grads_c.keys() == grads_r.keys(), (grads_c.keys(), grads_r.keys())
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend,strategy,k,cf", list(_cases()))
def test_backend_equals_eager(backend, strategy, k, cf):
    config = MoEConfig(
        d_model=D, d_hidden=H, num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1,
        router=RouterConfig(strategy=strategy, balance_loss_groups=("modality",)), backend="eager",
    )
    eager = MoE(config)
    x = torch.randn(T, D)
    tags = random_tags((T,))
    reference = run_with_grads(eager, x, tags)
    candidate = run_with_grads(with_backend(eager, backend), x, tags)
    assert_same(reference, candidate)
    # The router must receive a gradient through the gate weights (and losses).
    assert any(name.startswith("router.") for name in reference[3])


@pytest.mark.parametrize("backend", ["torch", "einsum"])
@pytest.mark.parametrize("gate,k", [("expert_choice", 1), ("expert_choice", 2), ("balanced", 1),
                                    ("hash", 1), ("hash", 2), ("hash", 4)])
@pytest.mark.parametrize("cf", [None, 0.75])
def test_gates_equal_eager(backend, gate, k, cf):
    config = MoEConfig(
        d_model=D, d_hidden=H, num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1,
        router=RouterConfig(strategy="token", gate=gate), backend="eager",
    )
    eager = MoE(config)
    x = torch.randn(T, D)
    assert_same(run_with_grads(eager, x, None), run_with_grads(with_backend(eager, backend), x, None))


@pytest.mark.parametrize("backend", ["torch", "einsum", "merged"])
@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("mlp", "relu"), ("glu", "silu"),
                                             ("glu", "gelu_tanh"), ("linear", "gelu")])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_kinds_equal_eager(backend, kind, activation, bias):
    from moe_gen import ExpertsConfig

    config = MoEConfig(
        d_model=D, d_hidden=H, num_experts=E, top_k=2, router="attribute", backend="eager",
        experts=ExpertsConfig(kind=kind, activation=activation, bias=bias, shared_expert=True),
    )
    eager = MoE(config)
    x = torch.randn(2, T // 2, D)
    tags = random_tags((2, T // 2))
    padding = torch.zeros(2, T // 2, dtype=torch.bool)
    padding[1, -5:] = True
    assert_same(run_with_grads(eager, x, tags, padding),
                run_with_grads(with_backend(eager, backend), x, tags, padding))


def test_every_registered_backend_is_covered():
    # triton and tutel have their equivalence tests in test_gpu_backends.py
    assert set(BACKENDS.list()) == {"eager", "torch", "einsum", "merged", "triton", "tutel"}


def test_sort_assignments_counts_every_expert_and_orders_rows_stably():
    """``sort_assignments`` (what expert parallelism moves rows by): rows per expert for all E
    experts, the last ones unused included (the all-to-all splits by them), and the computed
    assignments grouped by expert, in token order within one; dropped assignments left out
    (mutation audit r15)."""
    from moe_gen.experts.dispatch import EagerDispatch
    from moe_gen.routing.output import RouterOutput

    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    probs = torch.full((4, 6), 1 / 6)
    routing = RouterOutput(valid=torch.ones(4, dtype=torch.bool), dropped_assignments=torch.tensor(1),
                           dropped_tokens=torch.tensor(0), content_dependent=False, balanced_by_construction=False,
                           learned_gate=True, capacity=4, expert_counts=torch.tensor([3, 1, 3, 0, 0, 0]),
                           topk_ids=ids, topk_weights=torch.full((4, 2), 0.5) * mask, mask=mask, probs=probs,
                           logits=probs.log())
    flat, counts = EagerDispatch().sort_assignments(routing)
    assert counts.tolist() == [3, 1, 3, 0, 0, 0]
    assert flat.tolist() == [1, 2, 6, 5, 0, 4, 7]  # t·K + k: expert 0 (tokens 0, 1, 3), 1 (token 2), 2 (0, 2, 3)
