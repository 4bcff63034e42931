"""Every dispatch backend computes the same function as the eager oracle (outputs and grads)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tags, run_with_grads, with_backend

from moe_gen import BACKENDS, ROUTERS, MoE, MoEConfig, RouterConfig

D, H, E, T = 16, 24, 8, 48
CONTENT_FREE = [s for s in ROUTERS.list() if not ROUTERS.get(s).content_dependent]


def _cases():
    for backend in ("torch", "grouped", "einsum", "merged"):
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


@pytest.mark.parametrize("backend", ["torch", "grouped", "einsum"])
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


@pytest.mark.parametrize("backend", ["torch", "grouped", "einsum", "merged"])
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
    assert set(BACKENDS.list()) == {"eager", "torch", "grouped", "einsum", "merged", "triton", "tutel"}


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


def _on_meta(routing):
    """``routing`` with every tensor on the meta device (shapes and dtypes, no values); gate weights
    become leaves that take a gradient."""
    import dataclasses

    from moe_gen.routing.output import GroupRoutes, RouterOutput

    def meta(t):
        return t.detach().to("meta").requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t

    common = dict(valid=meta(routing.valid), dropped_assignments=meta(routing.dropped_assignments),
                  dropped_tokens=meta(routing.dropped_tokens), content_dependent=routing.content_dependent,
                  balanced_by_construction=routing.balanced_by_construction, learned_gate=routing.learned_gate)
    if routing.groups is not None:
        g = routing.groups
        return RouterOutput(groups=GroupRoutes(**{f.name: meta(getattr(g, f.name)) for f in dataclasses.fields(g)}),
                            **common)
    return RouterOutput(**common, capacity=routing.capacity, expert_counts=meta(routing.expert_counts),
                        topk_ids=meta(routing.topk_ids), topk_weights=meta(routing.topk_weights),
                        mask=meta(routing.mask), probs=meta(routing.probs), logits=meta(routing.logits))


@pytest.mark.parametrize("strategy,cf,kind", [("token", None, "mlp"), ("token", 1.0, "glu"),
                                              ("attribute", None, "mlp"), ("token", None, "linear")])
def test_grouped_backend_reads_nothing_back_to_the_host(strategy, cf, kind):
    """A meta tensor has a shape and no values, so any read back to the host (``tolist``, ``item``,
    ``nonzero``, an output size that depends on values) raises on it. The ``grouped`` backend's
    dispatch, experts and combine run there, forward and backward, for dropless and capacity routing,
    per-token and per-group routes; the ``torch`` backend, which reads the rows per expert, does not."""
    import copy

    from moe_gen import ExpertsConfig
    from moe_gen.experts.dispatch import GroupedDispatch, TorchDispatch

    config = MoEConfig(d_model=D, d_hidden=H, num_experts=E, top_k=2, capacity_factor=cf, min_capacity=1,
                       router=strategy, backend="eager", experts=ExpertsConfig(kind=kind, bias=True))
    moe = MoE(config)
    padding = torch.zeros(2, T // 2, dtype=torch.bool)
    padding[1, -5:] = True
    routing = moe(torch.randn(2, T // 2, D), tags=random_tags((2, T // 2)), padding_mask=padding).routing
    assert (routing.groups is not None) == (strategy == "attribute")
    experts = copy.deepcopy(moe.experts).to(device="meta", dtype=torch.bfloat16)  # meta grouped_mm: bf16
    x_TD = torch.empty(T, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    meta_routing = _on_meta(routing)
    backend = GroupedDispatch()
    dispatched = backend.dispatch(x_TD, meta_routing)
    y_TD = backend.combine(backend.run(experts, dispatched), dispatched, x_TD)
    assert y_TD.shape == (T, experts.d_out) and y_TD.device.type == "meta"
    y_TD.sum().backward()
    assert x_TD.grad.shape == x_TD.shape
    assert all(p.grad is not None for p in experts.parameters())
    with pytest.raises((RuntimeError, NotImplementedError)):
        TorchDispatch().dispatch(x_TD, meta_routing)


def test_grouped_backend_runs_each_projection_as_one_grouped_gemm(monkeypatch):
    """The ``grouped`` backend's experts are two ``grouped_mm`` calls (not a matmul per expert), and
    widths ``grouped_mm`` cannot take (rows not a multiple of 16 bytes) fall back to the loop with
    the same result."""
    import torch.nn.functional as F

    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x, tags = torch.randn(T, D), random_tags((T,))
    for d_hidden, expected in ((H, [(E, D, H), (E, H, D)]), (H + 2, [])):  # 26 · 4 bytes: not a multiple of 16
        eager = MoE(MoEConfig(d_model=D, d_hidden=d_hidden, num_experts=E, top_k=2, router="token",
                              backend="eager"))
        calls.clear()
        candidate = run_with_grads(with_backend(eager, "grouped"), x, tags)
        assert [tuple(s) for s in calls] == expected
        assert_same(run_with_grads(eager, x, tags), candidate)


def test_grouped_mm_is_taken_on_cuda_only_where_it_is_one_kernel(monkeypatch):
    """On CUDA, PyTorch runs ``grouped_mm`` as one kernel for bf16 on capability 9.x and 10.x; in
    fp32 its fallback reads the offsets back at every call and in fp16 it may refuse, so there the
    experts take the loop after one read. Elsewhere (CPU, meta) any of the three dtypes, aligned."""
    from moe_gen.experts import grouped

    assert grouped.grouped_mm_fits(torch.float32, 16, 24) and grouped.grouped_mm_fits(torch.float16, 8, device="meta")
    assert not grouped.grouped_mm_fits(torch.float32, 16, 26) and not grouped.grouped_mm_fits(torch.int32, 16)
    for major, expected in ((8, False), (9, True), (10, True), (12, False)):
        grouped._cuda_major.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert grouped.grouped_mm_fits(torch.bfloat16, 16, 24, device="cuda:0") is expected
        assert not grouped.grouped_mm_fits(torch.float32, 16, 24, device="cuda:0")
        assert not grouped.grouped_mm_fits(torch.float16, 16, 24, device="cuda:0")
    grouped._cuda_major.cache_clear()
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")  # PyTorch < 2.9: the loop everywhere
    assert not grouped.grouped_mm_fits(torch.float32, 16, 24)


def test_a_grouped_layer_reads_nothing_back_and_its_matmuls_do_not_grow_with_experts():
    """The benchmark's count (``bench_moe_layer.py --count-ops``: one forward + backward of the token-
    routed, dropless layer under ``torch.profiler``): with the ``grouped`` backend the whole layer,
    router and auxiliary losses included, makes no host read, and runs 9 matmuls whatever E is (the
    gate forward and backward, and per projection one grouped GEMM forward and two backward); the
    ``torch`` backend reads the rows per expert back and runs a matmul per expert and projection."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench_moe_layer.py")
    spec = importlib.util.spec_from_file_location("bench_moe_layer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for num_experts in (4, 16):
        grouped = bench.count_ops("grouped", 64, D, H, num_experts, 2)
        loop = bench.count_ops("moe_gen", 64, D, H, num_experts, 2)
        assert (grouped["host_reads"], grouped["matmuls"]) == (0, 9)
        assert loop["host_reads"] > 0 and loop["matmuls"] > 3 + 3 * num_experts


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_an_empty_batch_gives_the_grouped_backend_zero_gradients(kind):
    """No token at all: ``grouped_mm`` refuses empty operands in backward, so the grouped layer takes a
    plain empty matmul instead; output ``[0, D']`` and zero expert gradients, as the ``torch`` backend."""
    from moe_gen import ExpertsConfig

    for backend in ("torch", "grouped"):
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, backend=backend,
                            experts=ExpertsConfig(kind=kind)))
        out = moe(torch.randn(0, D, requires_grad=True))
        (out.output.sum() + out.aux_loss).backward()
        assert out.output.shape == (0, moe.experts.d_out)
        assert all(p.grad is None or not p.grad.any() for p in moe.experts.parameters()), backend
