"""``from_hf_moe``: transformers' sparse MoE blocks become equal moe_gen layers (issue 14, item 4).

Each family is built from a tiny random transformers config (nothing downloaded), its weights
randomised, imported, and compared in eval mode: outputs, and gradients of inputs and weights.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import random_tags
from torch import nn

from moe_gen import ExpertsConfig, MoE, MoEConfig, RouterConfig, from_hf_moe, moe_from_mixtral

pytest.importorskip("transformers")

D = 32

# name -> (transformers model module, config class, block class, config settings)
FAMILIES = {
    "mixtral": ("mixtral", "MixtralConfig", "MixtralSparseMoeBlock",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                  dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                       num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen2_moe_renormalised": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                               dict(moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                    num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                  dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen3_moe_not_renormalised": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                                   dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                        norm_topk_prob=False)),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
                    dict(moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                         topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=2)),
    "deepseek_v3_ungrouped": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
                              dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                   n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                   n_shared_experts=1)),
}


def hf_block(name: str, **overrides) -> nn.Module:
    """The family's block with random weights (routers start at zero in transformers), in eval mode;
    ``overrides`` are further config settings (``hidden_act``)."""
    module_name, config_name, block_name, settings = FAMILIES[name]
    config = getattr(importlib.import_module("transformers"), config_name)(hidden_size=D, **settings, **overrides)
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    block = getattr(module, block_name)(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        if hasattr(block.gate, "e_score_correction_bias"):  # big enough to change some choices
            block.gate.e_score_correction_bias.normal_(0, 0.2)
    return block


def block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", FAMILIES)
def test_imported_block_gives_the_same_outputs(name):
    block = hf_block(name)
    moe = from_hf_moe(block)
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        expected = block_output(block, x.clone())
        got = moe(x).output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_qwen2_moe_router_weights_are_not_renormalised_and_the_shared_expert_is_gated():
    block = hf_block("qwen2_moe")
    moe = from_hf_moe(block)
    assert moe.config.router.normalize is False and moe.shared_gate is not None
    assert moe.shared.fc_in.out_features == 2 * 40
    x = torch.randn(40, D)
    with torch.no_grad():
        expected = block_output(block, x.view(1, 40, D)).view(40, D)
        routing = moe(x).routing
        assert float(routing.topk_weights.sum(-1).max()) < 0.99  # softmax over all 6 experts
        assert float(torch.sigmoid(moe.shared_gate(x)).std()) > 0.05  # a per-token share
        moe.shared_gate.weight.zero_()  # every token takes half of the shared expert
        halved = moe(x).output
    assert not torch.allclose(halved, expected, atol=1e-3)


def test_deepseek_v3_bias_chooses_experts_and_groups_limit_them():
    block = hf_block("deepseek_v3")
    moe = from_hf_moe(block)
    rc = moe.config.router
    assert (rc.score, rc.expert_groups, rc.topk_groups, rc.weight_scale, rc.selection_bias) == \
        ("sigmoid", 4, 2, 2.5, True)
    assert torch.equal(moe.router.balance_bias, block.gate.e_score_correction_bias)
    x = torch.randn(64, D)
    with torch.no_grad():
        routing = moe(x).routing
        expected = block_output(block, x.view(1, 64, D)).view(64, D)
        # at most topk_groups = 2 of the 4 groups of 4 experts per token
        assert int((routing.topk_ids // 4).sort(-1).values.diff(dim=-1).ne(0).sum(-1).max()) <= 1
        torch.testing.assert_close(routing.topk_weights.sum(-1), torch.full((64,), 2.5))
        moe.router.balance_bias.zero_()
        unbiased = moe(x).output
    assert not torch.allclose(unbiased, expected, atol=1e-4)  # the bias changed some choices


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_imported_block_gives_the_same_gradients(name):
    block = hf_block(name)
    moe = from_hf_moe(block)
    x = torch.randn(2, 9, D)
    probe = torch.randn(2, 9, D)
    x_hf, x_moe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (block_output(block, x_hf) * probe).sum().backward()
    (moe(x_moe).output * probe).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_hf.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.router.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.experts.w_in.grad, block.experts.gate_up_proj.grad.transpose(1, 2),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.experts.w_out.grad, block.experts.down_proj.grad.transpose(1, 2),
                               atol=1e-5, rtol=1e-4)
    if name == "qwen2_moe":
        torch.testing.assert_close(moe.shared_gate.weight.grad, block.shared_expert_gate.weight.grad,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_training_backward_reaches_router_experts_and_shared_expert(name):
    moe = from_hf_moe(hf_block(name)).train()
    bias = None if moe.router.balance_bias is None else moe.router.balance_bias.clone()
    out = moe(torch.randn(4, 8, D))
    assert set(out.aux_losses) == {"balance", "z"}
    (out.output.square().mean() + out.aux_loss).backward()
    trained = [moe.router.weight, moe.experts.w_in, moe.experts.w_out, moe.shared.fc_in.weight]
    trained += [] if moe.shared_gate is None else [moe.shared_gate.weight]
    for p in trained:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0
    if bias is not None:  # a content router's loaded selection bias is not rebalanced
        assert torch.equal(moe.router.balance_bias, bias)


class _MixtralExpertMLP(nn.Module):
    """The per-expert MLP of older transformers releases (w1 gate, w3 up, w2 down)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.act_fn = nn.SiLU()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_modulelist_experts_import_like_stacked_ones(name):
    block = hf_block(name)
    stacked = from_hf_moe(block)
    E, X, _ = block.experts.gate_up_proj.shape
    H = X // 2
    mlps = nn.ModuleList()
    for e in range(E):
        if name == "mixtral":
            mlp = _MixtralExpertMLP(D, H)
            gate, up, down = mlp.w1, mlp.w3, mlp.w2
        else:
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

            mlp = Qwen3MoeMLP(block.experts.config, intermediate_size=H)
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        with torch.no_grad():
            gate.weight.copy_(block.experts.gate_up_proj[e, :H])
            up.weight.copy_(block.experts.gate_up_proj[e, H:])
            down.weight.copy_(block.experts.down_proj[e])
        mlps.append(mlp)
    block.experts = mlps
    listed = from_hf_moe(block)
    for key, value in stacked.state_dict().items():
        assert torch.equal(listed.state_dict()[key], value), key


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu_new", "gelu", "relu"])
def test_blocks_of_other_activations_give_the_same_outputs(hidden_act):
    """Each activation class transformers builds is named as the moe_gen activation that computes it
    (gelu_pytorch_tanh's GELUTanh is the tanh approximation, not the exact gelu)."""
    block = hf_block("qwen3_moe", hidden_act=hidden_act)
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(from_hf_moe(block)(x).output, block_output(block, x.clone()), atol=1e-5, rtol=0)


def test_the_imported_layer_is_in_the_blocks_train_or_eval_mode():
    block = hf_block("qwen2_moe")
    assert not any(m.training for m in from_hf_moe(block.eval()).modules())
    assert all(m.training for m in from_hf_moe(block.train()).modules())


def test_a_subclass_of_a_known_block_imports_as_its_family():
    block = hf_block("mixtral")
    block.__class__ = type("MyMixtralBlock", (type(block),), {})
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(from_hf_moe(block)(x).output, block_output(block, x.clone()), atol=1e-5, rtol=0)


def test_a_shared_expert_is_imported_only_with_the_routed_experts_activation():
    """moe_gen gives the routed and shared experts one activation: another class computing the same
    function (torch's SiLU for transformers' SiLUActivation) is accepted, a different function refused."""
    block = hf_block("qwen2_moe")
    block.shared_expert.act_fn = nn.SiLU()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(from_hf_moe(block)(x).output, block_output(block, x.clone()), atol=1e-5, rtol=0)
    block.shared_expert.act_fn = nn.ReLU()
    with pytest.raises(ValueError, match="shared expert uses ReLU and its routed experts SiLUActivation"):
        from_hf_moe(block)


@pytest.mark.parametrize("flag, value, what", [
    ("is_transposed", True, "transposed weights"),
    ("is_concatenated", False, "interleaved gate/up rows"),
    ("has_post_expert_norm", True, "a norm after each expert"),
])
def test_stacked_expert_layouts_moe_gen_cannot_hold_are_refused(flag, value, what):
    block = hf_block("qwen3_moe")
    setattr(block.experts, flag, value)
    with pytest.raises(ValueError, match=f"has {what}, which moe_gen's glu experts cannot hold"):
        from_hf_moe(block)


def test_per_expert_mlps_with_biases_are_refused():
    block = hf_block("mixtral")
    H = block.experts.down_proj.shape[2]
    mlps = nn.ModuleList(_MixtralExpertMLP(D, H) for _ in range(block.experts.down_proj.shape[0]))
    mlps[1].w2 = nn.Linear(H, D, bias=True)
    block.experts = mlps
    with pytest.raises(ValueError, match="_MixtralExpertMLP has biases; moe_gen imports bias-free SwiGLU MLPs only"):
        from_hf_moe(block)


def test_moe_from_mixtral_is_from_hf_moe():
    block = hf_block("mixtral")
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(moe_from_mixtral(block)(x).output, from_hf_moe(block)(x).output,
                                   atol=0, rtol=0)


def test_unknown_blocks_and_layouts_raise_clear_errors():
    with pytest.raises(ValueError, match=r"does not know Linear; supported transformers blocks: "
                                         r"MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, .*DeepseekV3MoE"):
        from_hf_moe(nn.Linear(4, 4))
    block = hf_block("qwen3_moe")
    block.experts.has_bias = True
    with pytest.raises(ValueError, match="expert biases"):
        from_hf_moe(block)


# ---- the router and expert options the importer added ----------------------------------------------

def test_sigmoid_grouped_routing_of_tag_groups_equals_the_per_token_decision():
    """Tag routes are decided once per tag group; with sigmoid scores, groups, scaling and a
    selection bias the merged backend still equals per-token dispatch."""
    router = RouterConfig(strategy="attribute", score="sigmoid", expert_groups=2, topk_groups=1,
                          weight_scale=1.5, normalize=True, selection_bias=True, tag_balance="loss")
    moe = MoE(MoEConfig(d_model=D, d_hidden=16, num_experts=8, top_k=2, router=router, experts="glu")).eval()
    with torch.no_grad():
        moe.router.balance_bias.normal_(0, 0.1)
    x, tags = torch.randn(3, 7, D), random_tags((3, 7))
    with torch.no_grad():
        expected = moe(x, tags=tags).output
        routing = moe(x, tags=tags).routing
        moe.set_backend("merged")
        torch.testing.assert_close(moe(x, tags=tags).output, expected, atol=1e-5, rtol=1e-5)
    assert bool(((routing.topk_ids // 4)[:, 0] == (routing.topk_ids // 4)[:, 1]).all())


@pytest.mark.parametrize("kwargs, message", [
    (dict(router=RouterConfig(expert_groups=3)), "does not split into expert_groups=3"),
    (dict(router=RouterConfig(expert_groups=4, topk_groups=1), top_k=3), "larger than the 2 experts"),
    (dict(router=RouterConfig(gate="expert_choice", expert_groups=2)), "'topk' gate only"),
    (dict(router=RouterConfig(gate="hash", weight_scale=2.0)), "'topk' gate only"),
])
def test_bad_group_settings_raise_clear_errors(kwargs, message):
    settings = dict(d_model=D, d_hidden=16, num_experts=8, top_k=2) | kwargs
    with pytest.raises(ValueError, match=message):
        MoEConfig(**settings)


@pytest.mark.parametrize("build, message", [
    (lambda: RouterConfig(score="tanh"), "unknown router score 'tanh'"),
    (lambda: RouterConfig(score="sigmoid", noise="gumbel"), "samples from the softmax"),
    # experts pick tokens by the clean probabilities: the noise changed nothing, without a word
    (lambda: RouterConfig(gate="expert_choice", noise="gumbel"), "gate 'expert_choice' lets experts select"),
    (lambda: RouterConfig(weight_scale=0.0), "weight_scale must be a finite number > 0"),
    (lambda: RouterConfig(expert_groups=2, topk_groups=3), "topk_groups in"),
    (lambda: ExpertsConfig(shared_gate=True), "set shared_expert=True"),
])
def test_bad_router_and_expert_options_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_new_options_round_trip_through_dicts():
    config = MoEConfig(d_model=D, d_hidden=16, num_experts=8, top_k=2,
                       router=RouterConfig(score="sigmoid", expert_groups=4, topk_groups=2, weight_scale=2.5,
                                           selection_bias=True),
                       experts=ExpertsConfig(kind="glu", shared_expert=True, shared_gate=True))
    assert MoEConfig.from_dict(config.to_dict()) == config
