"""The MoE layer: equivalence with dense FFNs and Mixtral, shapes, padding, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_tags, run_with_grads

from moe_gen import (
    BACKENDS,
    EXPERTS,
    GATES,
    ROUTERS,
    DenseFFN,
    ExpertsConfig,
    MoE,
    MoEConfig,
    Registry,
    RouterConfig,
    TokenTags,
    moe_from_mixtral,
)
from moe_gen.experts import grouped_ffn
from moe_gen.registry import did_you_mean

D, H = 16, 24


@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("glu", "silu"), ("linear", "gelu")])
@pytest.mark.parametrize("backend", ["eager", "torch", "grouped", "einsum"])
def test_one_expert_equals_dense_ffn(kind, activation, backend):
    cfg = ExpertsConfig(kind=kind, activation=activation)
    dense = DenseFFN(D, H, cfg)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=1, top_k=1, experts=cfg, backend=backend))
    with torch.no_grad():
        if kind == "linear":
            moe.experts.weight[0].copy_(dense.fc_in.weight.t())
            moe.experts.bias[0].copy_(dense.fc_in.bias)
        else:
            moe.experts.w_in[0].copy_(dense.fc_in.weight.t())
            moe.experts.b_in[0].copy_(dense.fc_in.bias)
            moe.experts.w_out[0].copy_(dense.fc_out.weight.t())
            moe.experts.b_out[0].copy_(dense.fc_out.bias)
    x = torch.randn(2, 9, D)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    probe = torch.randn(2, 9, dense.fc_in.out_features if kind == "linear" else D)
    out = moe(x1)
    assert torch.equal(out.routing.topk_weights, torch.ones(18, 1))  # softmax over one expert
    (out.output * probe).sum().backward()
    (dense(x2) * probe).sum().backward()
    torch.testing.assert_close(out.output, dense(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    if kind == "linear":
        torch.testing.assert_close(moe.experts.weight.grad[0], dense.fc_in.weight.grad.t())
    else:
        torch.testing.assert_close(moe.experts.w_in.grad[0], dense.fc_in.weight.grad.t())
        torch.testing.assert_close(moe.experts.w_out.grad[0], dense.fc_out.weight.grad.t())
        torch.testing.assert_close(moe.experts.b_out.grad[0], dense.fc_out.bias.grad)


@pytest.mark.parametrize("gated,activation", [(False, "gelu"), (True, "silu"), (False, "relu")])
def test_grouped_ffn_matches_per_expert_loop(gated, activation):
    E, N = 5, 40
    counts = [10, 0, 17, 13, 0]
    width = 2 * H if gated else H
    x = torch.randn(N, D, requires_grad=True)
    w_in = torch.randn(E, D, width, requires_grad=True)
    b_in = torch.randn(E, width, requires_grad=True)
    w_out = torch.randn(E, H, D, requires_grad=True)
    b_out = torch.randn(E, D, requires_grad=True)
    y = grouped_ffn(x, counts, w_in, b_in, w_out, b_out, activation, gated)
    from moe_gen.experts.grouped import activate

    rows, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        rows.append(activate(xe @ w_in[e] + b_in[e], activation, gated) @ w_out[e] + b_out[e])
        start += n
    ref = torch.cat(rows)
    torch.testing.assert_close(y, ref)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), (x, w_in, b_in, w_out, b_out))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (x, w_in, b_in, w_out, b_out))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # experts without rows get exactly zero gradient
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
    with pytest.raises(ValueError, match="counts sum"):
        grouped_ffn(x, [1, 2], w_in, b_in, w_out, b_out, activation, gated)


def test_grouped_relu_passes_no_gradient_where_the_pre_activation_is_exactly_zero():
    """relu'(0) = 0, as autograd (and so the eager backend) has it: a token whose hidden states are
    all zero (a zero input row, experts without biases) gets no input gradient."""
    counts = [3, 2]
    x = torch.randn(5, D)
    x[1] = 0.0
    x.requires_grad_(True)
    w_in, w_out = torch.randn(2, D, H, requires_grad=True), torch.randn(2, H, D, requires_grad=True)
    y = grouped_ffn(x, counts, w_in, None, w_out, None, "relu", False)
    ref = torch.cat([torch.relu(x[:3] @ w_in[0]) @ w_out[0], torch.relu(x[3:] @ w_in[1]) @ w_out[1]])
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), (x, w_in, w_out))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (x, w_in, w_out))
    assert torch.equal(grads[0][1], torch.zeros(D))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ["torch", "grouped", "eager", "einsum"])
def test_mixtral_block_equivalence(backend):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4,
                           num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    moe = moe_from_mixtral(block, backend=backend)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        expected = block(x.clone())
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = moe(x).output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_batch_and_padding_do_not_change_outputs():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router="hybrid"))
    lengths = [7, 3, 5]
    seqs = [torch.randn(n, D) for n in lengths]
    tag_list = [random_tags((n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    S = max(lengths)
    x = torch.zeros(3, S, D)
    pad = torch.ones(3, S, dtype=torch.bool)
    for i, n in enumerate(lengths):
        x[i, :n], pad[i, :n] = seqs[i], False
    padding_tags = TokenTags.cat([TokenTags.cat([t, TokenTags.constant(S - n)]).flatten() for t, n in
                                  zip(tag_list, lengths)]).flatten()
    tags_BS = TokenTags(**{k: (v.view(3, S, *v.shape[1:]) if v is not None else None)
                           for k, v in padding_tags.__dict__.items()})
    batched = moe(x, tags=tags_BS, padding_mask=pad).output
    for i, n in enumerate(lengths):
        alone = moe(seqs[i], tags=tag_list[i]).output
        torch.testing.assert_close(batched[i, :n], alone, atol=1e-6, rtol=1e-6)
        assert torch.equal(batched[i, n:], torch.zeros(S - n, D))
    # reversed batch order, same per-example outputs
    flipped = moe(x.flip(0), tags=TokenTags(**{k: (v.flip(0) if v is not None else None)
                                                  for k, v in tags_BS.__dict__.items()}),
                  padding_mask=pad.flip(0)).output
    torch.testing.assert_close(flipped.flip(0), batched, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["modality", "task", "attribute", "instruction"])
def test_merged_equals_unmerged(strategy):
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=8, top_k=2, router=strategy,
                        experts=ExpertsConfig(kind="glu", activation="silu")))
    x, tags = torch.randn(64, D), random_tags((64,))
    reference = run_with_grads(moe, x, tags)
    moe.set_backend("merged")
    merged = run_with_grads(moe, x, tags)
    torch.testing.assert_close(merged[0], reference[0], atol=1e-5, rtol=1e-5)
    for name in reference[3]:
        torch.testing.assert_close(merged[3][name], reference[3][name], atol=1e-5, rtol=1e-4)


def test_merged_backend_refuses_content_routing():
    with pytest.raises(ValueError, match="use a tag strategy"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="token", backend="merged"))
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="context"))
    with pytest.raises(ValueError, match="content"):
        moe.set_backend("merged")


def test_shared_expert_adds_a_dense_ffn():
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2,
                    experts=ExpertsConfig(shared_expert=True, shared_hidden=10))
    moe = MoE(cfg)
    plain = MoE(cfg.replace(experts=ExpertsConfig()))
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared.")})
    x = torch.randn(12, D)
    assert moe.shared.fc_in.out_features == 10
    torch.testing.assert_close(moe(x).output, plain(x).output + moe.shared(x))


def test_linear_experts_change_width():
    moe = MoE(MoEConfig(d_model=D, d_hidden=3 * D, num_experts=4, top_k=2, experts="linear"))
    assert moe(torch.randn(2, 5, D)).output.shape == (2, 5, 3 * D)


@pytest.mark.parametrize("kind", ["mlp", "glu", "linear"])
def test_expert_weights_start_like_nn_linear_of_each_expert(kind):
    # nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, with the
    # fan-in of each projection: D into the hidden units, H out of them (D and H far apart here)
    torch.manual_seed(0)
    d_model, d_hidden = 64, 16
    experts = EXPERTS.get(kind)(d_model, d_hidden, 8, ExpertsConfig(kind=kind))
    fan_in = {"w_in": d_model, "b_in": d_model, "w_out": d_hidden, "b_out": d_hidden,
              "weight": d_model, "bias": d_model}
    names = [name for name, _ in experts.named_parameters()]
    assert names == (["weight", "bias"] if kind == "linear" else ["w_in", "w_out", "b_in", "b_out"])
    for name, p in experts.named_parameters():
        bound = 1.0 / fan_in[name] ** 0.5
        assert 0.9 * bound < float(p.detach().abs().max()) <= bound, name


@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("glu", "silu")])
def test_merged_groups_run_each_route_through_its_own_merged_ffn(kind, activation):
    # rows sorted by route (3 rows of route 0, 2 of route 1): each equals Σ_k w_k · expert_k(row),
    # with autograd and without it (inference may take a shortcut for a single route only)
    torch.manual_seed(0)
    experts = EXPERTS.get(kind)(D, H, 4, ExpertsConfig(kind=kind, activation=activation))
    routes = [(torch.tensor([0, 2]), torch.tensor([0.7, 0.3])), (torch.tensor([3, 1]), torch.tensor([0.4, 0.6]))]
    x = torch.randn(5, D)
    with torch.no_grad():
        expected = torch.cat([sum(w * experts.forward_expert(int(e), rows) for e, w in zip(ids, weights))
                              for (ids, weights), rows in zip(routes, (x[:3], x[3:]))])
    stacked = experts.stack_merged([experts.merged_weights(ids, weights) for ids, weights in routes])
    torch.testing.assert_close(experts.forward_merged_groups(x, [3, 2], stacked), expected)
    with torch.no_grad():
        torch.testing.assert_close(experts.forward_merged_groups(x, [3, 2], stacked), expected)
        one = experts.stack_merged([experts.merged_weights(*routes[1])])
        torch.testing.assert_close(experts.forward_merged_groups(x[3:], [2], one), expected[3:])


def test_empty_and_all_padding_inputs():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="attribute"))
    out = moe(torch.randn(0, D), tags=TokenTags.constant(0))
    assert out.output.shape == (0, D)
    pad = torch.ones(2, 3, dtype=torch.bool)
    out = moe(torch.randn(2, 3, D), tags=TokenTags.constant((2, 3)), padding_mask=pad)
    assert torch.equal(out.output, torch.zeros(2, 3, D))


# ---- errors --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="attribute", check_finite=True))
    tags = TokenTags.constant((2, 5))
    with pytest.raises(ValueError, match="feature size 8 .*d_model=16"):
        moe(torch.randn(2, 5, 8), tags=tags)
    with pytest.raises(ValueError, match="routes by tags; pass tags="):
        moe(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match=r"tags.task has shape \(10,\) but the tokens are \(2, 5\)"):
        moe(torch.randn(2, 5, D), tags=TokenTags.constant(10))
    with pytest.raises(ValueError, match=r"tags.modality values must lie in \[0, 9\)"):
        bad = TokenTags(**{**tags.__dict__, "modality": torch.full((2, 5), 12)})
        moe(torch.randn(2, 5, D), tags=bad)
    # tags of mixed integer dtypes are checked one by one, with the same message
    with pytest.raises(ValueError, match=r"tags.role values must lie in \[0, 3\), got \[0, 7\]"):
        role = torch.zeros(2, 5, dtype=torch.int32)
        role[1, 2] = 7
        moe(torch.randn(2, 5, D), tags=TokenTags(**{**tags.__dict__, "role": role}))
    with pytest.raises(ValueError, match="task_modalities must have shape"):
        bad = TokenTags(**{**tags.__dict__, "task_modalities": torch.zeros(2, 5, 3, dtype=torch.bool)})
        moe(torch.randn(2, 5, D), tags=bad)
    x = torch.randn(2, 5, D)
    x[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.* 1 token\(s\); first at \(batch, position\) \(1, 3\)"):
        moe(x, tags=tags)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3] = True
    moe(x, tags=tags, padding_mask=pad)  # non-finite padding is fine
    with pytest.raises(ValueError, match="padding_mask must be shaped like the tokens"):
        moe(torch.randn(2, 5, D), tags=tags, padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        moe(torch.randn(2, 5, D), tags=tags, padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[T, D\] or \[B, S, D\]"):
        moe(torch.randn(D), tags=tags)
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.ones(2, 5, D, dtype=torch.long), tags=tags)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"unknown router strategy 'tokn' \(did you mean 'token'\?\); known: attr"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router="tokn"))
    with pytest.raises(ValueError, match="unknown dispatch backend 'fast'; known: eager, einsum, grouped, merged"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, backend="fast"))
    with pytest.raises(ValueError, match="unknown expert kind 'moe'; known: glu, linear, mlp"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, experts="moe"))
    with pytest.raises(ValueError, match="unknown gate 'top2'"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, router=RouterConfig(gate="top2")))
    with pytest.raises(ValueError, match="unknown expert activation 'tanh'"):
        MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, experts=ExpertsConfig(activation="tanh")))
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0 or None"):
        MoEConfig(d_model=D, d_hidden=H, num_experts=4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="unknown drop_policy"):
        MoEConfig(d_model=D, d_hidden=H, num_experts=4, drop_policy="random")
    with pytest.raises(ValueError, match="unknown router noise 'uniform'"):
        RouterConfig(noise="uniform")
    with pytest.raises(ValueError, match="balance_loss_groups entry 'role'"):
        RouterConfig(balance_loss_groups=("role",))
    # sizes the tag group key cannot pack (two tag sets would share a key, and a route)
    with pytest.raises(ValueError, match="num_passes must be <= 16"):
        RouterConfig(num_passes=20)
    with pytest.raises(ValueError, match="num_roles must be <= 16"):
        RouterConfig(num_roles=17)
    with pytest.raises(ValueError, match="num_tasks must be <= 64 with 40 modalities"):
        RouterConfig(num_modalities=40, num_tasks=65)


# ---- config and registry -------------------------------------------------------------------


def test_config_round_trip_through_json():
    cfg = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=1, capacity_factor=1.25,
                    router=RouterConfig(strategy="attribute", noise="gaussian",
                                        balance_loss_groups=("task",)),
                    experts=ExpertsConfig(kind="glu", activation="silu", shared_expert=True))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["router"]["strategy"] == "attribute"
    assert MoEConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['hidden'\]"):
        MoEConfig.from_dict({**data, "hidden": 3})
    with pytest.raises(ValueError, match=r"unknown RouterConfig keys \['strat'\]"):
        MoEConfig.from_dict({**data, "router": {"strat": "x"}})
    shorthand = MoEConfig(d_model=4, d_hidden=4, num_experts=2, router="task")
    assert shorthand.router == RouterConfig(strategy="task")


def test_registry_rejects_duplicates_and_lists_known_names():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and "a" in reg and reg.list() == ["a"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(A)
    with pytest.raises(ValueError, match="unknown widget 'b'; known: a"):
        reg.get("b")
    reg.unregister("a")
    assert len(reg) == 0


def test_registry_answers_misuse_with_value_errors_naming_the_known_entries():
    reg = Registry("widget")
    with pytest.raises(ValueError, match="unknown widget 'a'; known: \\(none\\)"):
        reg.get("a")
    reg.register("token")(int)
    for name in ("", 3, None):
        with pytest.raises(ValueError, match=f"widget names must be non-empty strings, got {name!r}"):
            reg.register(name)
    with pytest.raises(ValueError, match="unknown widget 'tokn' \\(did you mean 'token'\\?\\); known: token$"):
        reg.unregister("tokn")  # (and nothing is removed)
    with pytest.raises(ValueError, match=r"unknown widget \['token'\]; known: token"):
        reg.get(["token"])  # an unhashable name is an unknown one, not a TypeError
    assert reg.list() == ["token"]


def test_did_you_mean_suggests_close_names_only_and_each_once():
    # difflib's ratio 2·M / (|a| + |b|): 'tokn'/'token' 0.89 is close, 'tk'/'token' 0.57 is not (cutoff 0.75)
    assert did_you_mean(["tokn"], ["token", "task"]) == " (did you mean 'token'?)"
    assert did_you_mean(["tk"], ["token"]) == ""
    assert did_you_mean(["tokn", "tokne", 7], ["token", "task"]) == " (did you mean 'token'?)"
    assert did_you_mean(["tokn", "tsk"], ["token", "task"]) == " (did you mean 'token', 'task'?)"


def test_a_registry_loads_its_built_ins_on_the_first_use_of_any_lookup(tmp_path, monkeypatch):
    """``len``, ``in``, ``list``, ``get`` and iteration each import the module that fills the registry
    (``len(moe_gen.TASKS)`` was 0 until something else had listed it)."""
    import sys
    import types

    lookups = {"len": lambda r: len(r) == 1, "in": lambda r: "built_in" in r,
               "list": lambda r: r.list() == ["built_in"], "get": lambda r: r.get("built_in") is int,
               "iter": lambda r: list(r) == ["built_in"]}
    holder = types.ModuleType("widget_registry_holder")
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, lookup in lookups.items():
        module = f"widget_builtins_{name}"
        (tmp_path / f"{module}.py").write_text(f"import {holder.__name__} as h\nh.REG.register('built_in')(int)\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
        holder.REG = Registry("widget", builtins=module)
        assert lookup(holder.REG), name


def test_registries_hold_the_built_in_parts():
    assert ROUTERS.list() == ["attribute", "context", "hybrid", "instruction", "modality", "task", "token"]
    assert GATES.list() == ["balanced", "expert_choice", "hash", "topk"]
    assert EXPERTS.list() == ["glu", "linear", "mlp"]
    assert BACKENDS.list() == ["eager", "einsum", "grouped", "merged", "torch", "triton", "tutel"]


@pytest.mark.parametrize("strategy", ROUTERS.list())
@pytest.mark.parametrize("gate", GATES.list())
def test_every_router_and_gate_runs_forward_and_backward(strategy, gate):
    k = 1 if gate == "balanced" else 2
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=k,
                        router=RouterConfig(strategy=strategy, gate=gate)))
    x = torch.randn(3, 6, D, requires_grad=True)
    out = moe(x, tags=random_tags((3, 6)))
    (out.output.sum() + out.aux_loss).backward()
    assert out.output.shape == x.shape and torch.isfinite(out.output).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_top_level_api_names_resolve():
    import moe_gen

    for name in moe_gen.__all__:
        assert getattr(moe_gen, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        moe_gen.Nope  # noqa: B018


@pytest.mark.parametrize("strategy", ["token", "context", "hybrid", "attribute"])
def test_bf16_inputs_route_in_fp32(strategy):
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, router=strategy))
    x, tags = torch.randn(2, 5, D, dtype=torch.bfloat16), random_tags((2, 5))
    out = moe(x, tags=tags)
    assert out.routing.logits.dtype == torch.float32 and torch.isfinite(out.output.float()).all()
    # the same routing as fp32 states of the same values (the gate reads them in fp32, not bf16)
    reference = moe(x.float(), tags=tags).routing
    torch.testing.assert_close(out.routing.logits, reference.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "grouped", "eager", "einsum"])
def test_a_gated_shared_expert_takes_hidden_states_of_another_dtype(backend):
    """(Qwen2-MoE's shared-expert gate was a plain Linear left in the layer's dtype: bf16 states into an
    fp32 layer, or fp32 states into a bf16 one, raised where the experts and the shared FFN cast.)"""
    from moe_gen.config import ExpertsConfig

    config = MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, backend=backend,
                       experts=ExpertsConfig(shared_expert=True, shared_gate=True))
    moe = MoE(config)
    x = torch.randn(2, 5, D)
    reference = moe(x).output
    out = moe(x.bfloat16()).output
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    assert moe.to(torch.bfloat16)(x).output.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "grouped", "eager", "einsum"])
def test_nan_in_padding_never_reaches_real_tokens(backend):
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=4, top_k=2, backend=backend))
    x = torch.randn(2, 6, D)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    x[1, 3:], pad[1, 3:] = float("nan"), True
    out = moe(x, padding_mask=pad).output
    assert torch.isfinite(out[~pad]).all() and torch.equal(out[pad], torch.zeros(3, D))


def test_a_layer_pickled_before_it_kept_its_tag_vocabularies_still_runs():
    # (MoE keeps the router's vocabulary sizes since 2026-12-07; a layer pickled before has none)
    import pickle

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, router="attribute")).eval()
    x, tags = torch.randn(2, 5, 16), TokenTags.constant((2, 5), task=1, modality="IMAGE",
                                                         task_modalities=("IMAGE", "TEXT"))
    state = moe.__getstate__()
    del state["_tag_vocab"]
    old = MoE.__new__(MoE)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    with torch.no_grad():
        for layer in (old, again):
            assert layer._tag_vocab == moe._tag_vocab
            torch.testing.assert_close(layer(x, tags=tags).output, moe(x, tags=tags).output)
