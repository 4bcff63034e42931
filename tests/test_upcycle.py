"""Sparse upcycling (``moe_gen.pretrained.upcycle``): the upcycled model equals the dense one, its
experts diverge in training, noise and partial re-initialisation, save/load, placements, bare
module trees, and errors that leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import flavour_with
from torch import nn

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.experts.experts import DenseFFN
from moe_gen.model import GeneralistModel
from moe_gen.moe import MoE
from moe_gen.objectives import GenerativeObjective
from moe_gen.pretrained.upcycle import upcycle
from moe_gen.tasks import Tokenizer, collate, load_preset

TASKS = ["digit_classification", "table_to_text"]
ALL_BLOCKS = ("encoder.blocks.0", "encoder.blocks.1", "decoder.blocks.0", "decoder.blocks.1")
GLU = ExpertsConfig(kind="glu", activation="silu", bias=False)  # Llama-style FFN


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def data(tok):
    tasks = [load_preset(name, "train", limit=3) for name in TASKS]
    return tasks, [s for t in tasks for s in t.samples(tok)]


def dense_model(tasks, tok, **overrides) -> GeneralistModel:
    torch.manual_seed(0)
    overrides.setdefault("every", 0)
    return GeneralistModel.build(flavour_with("debug", **overrides), tasks, tok).eval()


def valid_logits(model: GeneralistModel, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits[~batch.decoder.padding_mask]


def blocks(model: GeneralistModel):
    return [*model.encoder.blocks, *model.decoder.blocks]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("experts", [ExpertsConfig(), GLU, ExpertsConfig(shared_expert=True, shared_gate=True)],
                         ids=["mlp", "glu", "shared-gate-config"])  # (a dense model keeps its flavour's MoE settings)
@pytest.mark.parametrize("strategy", ["token", "attribute"])
def test_upcycled_model_equals_the_dense_model(data, tok, strategy, experts, top_k):
    tasks, samples = data
    model = dense_model(tasks, tok, experts=experts)
    batch = collate(samples, tok, model.task_ids)
    reference = valid_logits(model, batch)
    upcycled, summary = upcycle(model, num_experts=4, top_k=top_k, router=strategy, seed=0)
    assert upcycled is model and summary.layers == ALL_BLOCKS
    assert all(isinstance(b.ffn, MoE) and b.ffn.config.experts.kind == experts.kind for b in blocks(model))
    assert model.config.moe.every == 1 and model.config.moe.router.strategy == strategy
    torch.testing.assert_close(valid_logits(model, batch), reference, atol=1e-5, rtol=1e-5)
    if strategy == "token":  # the small random router spreads tokens over more than k experts
        with torch.no_grad():
            used = [int((out.routing.expert_counts > 0).sum()) for out in model(batch).moe_outputs]
        assert max(used) > top_k


def test_experts_diverge_in_training_with_token_routing(data, tok):
    tasks, samples = data
    model = dense_model(tasks, tok).train()
    batch = collate(samples, tok, model.task_ids)
    dense_loss = GenerativeObjective(model)(batch)["token_loss"].detach()
    upcycle(model, num_experts=4, top_k=2, router="token", seed=0)
    objective = GenerativeObjective(model)
    torch.testing.assert_close(objective(batch)["token_loss"].detach(), dense_loss, atol=1e-5, rtol=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        loss = objective(batch)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    for block in blocks(model):
        w_in = block.ffn.experts.w_in.detach()
        for i in range(4):
            for j in range(i):
                assert not torch.allclose(w_in[i], w_in[j]), (i, j)


def test_noise_perturbs_every_expert_differently():
    torch.manual_seed(0)
    tree = nn.ModuleList([DenseFFN(16, 32, ExpertsConfig())])
    w_in_DH = tree[0].fc_in.weight.detach().t().clone()
    upcycle(tree, num_experts=4, top_k=2, noise=0.01, seed=0)
    w_in_EDH = tree[0].experts.w_in.detach()
    relative = w_in_EDH / w_in_DH - 1
    assert 0.005 < float(relative.std()) < 0.02
    assert all(not torch.equal(w_in_EDH[i], w_in_EDH[j]) for i in range(4) for j in range(i))


@pytest.mark.parametrize("experts", [ExpertsConfig(), GLU], ids=["mlp", "glu"])
def test_reinit_fraction_redraws_that_many_units_per_expert_and_keeps_the_rest(experts):
    torch.manual_seed(0)
    H = 32
    dense = DenseFFN(16, H, experts)
    w_in_DX, w_out_HD = dense.fc_in.weight.detach().t().clone(), dense.fc_out.weight.detach().t().clone()
    b_in_X = None if dense.fc_in.bias is None else dense.fc_in.bias.detach().clone()
    tree = nn.ModuleList([dense])
    upcycle(tree, num_experts=4, top_k=2, reinit_fraction=0.25, seed=0)
    moe_experts = tree[0].experts
    halves = 2 if experts.kind == "glu" else 1
    redrawn = []
    for e in range(4):
        units_H = (moe_experts.w_out[e] != w_out_HD).any(1)
        assert int(units_H.sum()) == 8  # round(0.25 · 32) rows of w_out
        columns_X = (moe_experts.w_in[e] != w_in_DX).any(0)
        assert torch.equal(columns_X, units_H.repeat(halves))  # a unit's gate and up columns together
        if b_in_X is not None:
            assert torch.equal(moe_experts.b_in[e] != b_in_X, units_H)
            assert torch.equal(moe_experts.b_out[e], dense.fc_out.bias)
        redrawn.append(tuple(units_H.tolist()))
    assert len(set(redrawn)) > 1  # each expert draws its own subset


def test_redrawn_units_follow_the_statistics_of_the_dense_matrix_they_belong_to():
    """Drop-Upcycling draws a unit's gate columns from N(mean, std) of the dense gate half, its up
    columns from the up half's, its ``b_in`` entries from the matching half of the bias and its
    ``w_out`` row from ``w_out``'s: each dense matrix here has its own mean and std, set by hand."""
    torch.manual_seed(0)
    D, H, E = 16, 64, 4
    dense = DenseFFN(D, H, ExpertsConfig(kind="glu", activation="silu", bias=True))
    with torch.no_grad():  # nn.Linear keeps [out, in]: gate rows first, then up rows
        dense.fc_in.weight[:H].normal_(2.0, 0.1)
        dense.fc_in.weight[H:].normal_(-1.0, 0.3)
        dense.fc_in.bias[:H].normal_(3.0, 0.2)
        dense.fc_in.bias[H:].normal_(-3.0, 0.4)
        dense.fc_out.weight.normal_(0.5, 0.05)
    w_in_DX, b_in_X = dense.fc_in.weight.detach().t().clone(), dense.fc_in.bias.detach().clone()
    w_out_HD = dense.fc_out.weight.detach().t().clone()
    tree = nn.ModuleList([dense])
    upcycle(tree, num_experts=E, top_k=2, reinit_fraction=0.5, seed=0)
    experts = tree[0].experts
    units_EH = torch.stack([(experts.w_out[e] != w_out_HD).any(1) for e in range(E)])
    assert units_EH.sum(1).tolist() == [H // 2] * E

    def check(new, old):  # the redrawn values against the dense matrix (population std)
        assert abs(float(new.mean() - old.mean())) < 0.25 * float(old.std(correction=0))
        assert float(new.std()) == pytest.approx(float(old.std(correction=0)), rel=0.25)

    with torch.no_grad():
        for columns in (slice(0, H), slice(H, 2 * H)):  # gate half, up half
            new_w = torch.cat([experts.w_in[e][:, columns][:, units_EH[e]].flatten() for e in range(E)])
            check(new_w, w_in_DX[:, columns])
            new_b = torch.cat([experts.b_in[e][columns][units_EH[e]] for e in range(E)])
            check(new_b, b_in_X[columns])
        check(torch.cat([experts.w_out[e][units_EH[e]].flatten() for e in range(E)]), w_out_HD)


def test_a_reinit_fraction_of_one_redraws_every_unit():
    torch.manual_seed(0)
    dense = DenseFFN(16, 32, ExpertsConfig())
    w_out_HD = dense.fc_out.weight.detach().t().clone()
    tree = nn.ModuleList([dense])
    upcycle(tree, num_experts=2, top_k=1, reinit_fraction=1.0, seed=0)
    assert all(bool((tree[0].experts.w_out[e] != w_out_HD).any(1).all()) for e in range(2))


def test_every_expert_may_be_active_and_the_layer_still_equals_the_dense_ffn():
    torch.manual_seed(0)
    tree = nn.ModuleList([DenseFFN(16, 32, GLU)])
    dense = copy.deepcopy(tree[0])
    upcycle(tree, num_experts=3, top_k=3, seed=0)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(tree[0](x).output, dense(x), atol=1e-6, rtol=1e-5)


def test_router_std_sets_the_new_routers_initial_weights():
    torch.manual_seed(0)
    tree = nn.ModuleList([DenseFFN(64, 32, ExpertsConfig()) for _ in range(2)])
    upcycle(tree, num_experts=8, top_k=2, layers=["0"], router_std=0.0, seed=0)
    upcycle(tree, num_experts=8, top_k=2, layers=["1"], router_std=0.5, seed=0)
    assert torch.equal(tree[0].router.weight, torch.zeros_like(tree[0].router.weight))
    assert float(tree[1].router.weight.detach().std()) == pytest.approx(0.5, rel=0.2)  # 512 draws


def test_the_new_layers_take_the_dense_ffns_train_or_eval_mode():
    torch.manual_seed(0)
    tree = nn.ModuleList([DenseFFN(16, 32, ExpertsConfig()) for _ in range(2)])
    tree[0].eval()
    upcycle(tree, num_experts=4, top_k=2, seed=0)
    assert not any(m.training for m in tree[0].modules()) and all(m.training for m in tree[1].modules())


def test_a_linear_ffn_has_no_units_to_redraw():
    tree = nn.ModuleList([DenseFFN(16, 16, ExpertsConfig(kind="linear"))])
    with pytest.raises(ValueError, match="is a linear FFN: it has no hidden units for reinit_fraction"):
        upcycle(tree, num_experts=4, top_k=2, reinit_fraction=0.5)
    assert isinstance(tree[0], DenseFFN)


def test_a_given_router_config_takes_the_models_tag_vocabularies_and_task_words(data, tok):
    """Tag embeddings sized by a RouterConfig's defaults (64 tasks, 9 modalities...) would not cover
    the model's tag ids; the new routers take the model's sizes and its tasks' prompt words."""
    tasks, samples = data
    model = dense_model(tasks, tok, router={"num_tasks": 80, "num_roles": 5, "num_passes": 4, "num_modalities": 12})
    ours = model.config.moe.router
    assert ours.task_words  # the model's tasks' words
    _, summary = upcycle(model, num_experts=4, top_k=2, router=RouterConfig(strategy="instruction"), seed=0)
    fields = ("num_tasks", "num_roles", "num_passes", "num_modalities", "task_words")
    for router in [summary.router, model.config.moe.router, *(b.ffn.config.router for b in blocks(model))]:
        assert router.strategy == "instruction"
        assert [getattr(router, f) for f in fields] == [getattr(ours, f) for f in fields]


def test_a_seed_makes_upcycling_reproducible_and_spares_the_global_rng():
    torch.manual_seed(0)
    tree = nn.ModuleList([DenseFFN(16, 32, ExpertsConfig())])
    twin = copy.deepcopy(tree)
    state = torch.get_rng_state()
    upcycle(tree, num_experts=4, top_k=2, router="attribute", noise=0.01, reinit_fraction=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    upcycle(twin, num_experts=4, top_k=2, router="attribute", noise=0.01, reinit_fraction=0.5, seed=7)
    ours, theirs = tree.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("layers,moe_every", [("every_other", 2), (list(ALL_BLOCKS), 1),
                                              (["encoder.blocks.0", "decoder.blocks.1"], 1)])
def test_save_and_load_rebuild_the_upcycled_model(data, tok, tmp_path, layers, moe_every):
    tasks, samples = data
    model = dense_model(tasks, tok, experts=GLU)
    batch = collate(samples, tok, model.task_ids)
    reference = valid_logits(model, batch)
    _, summary = upcycle(model, num_experts=4, top_k=2, router="attribute", layers=layers, seed=0)
    config = model.config
    assert config.moe.every == moe_every and (config.moe.num_experts, config.moe.top_k) == (4, 2)
    assert config.moe.expert_hidden == config.ffn_hidden and config.moe.experts == GLU
    expected = ALL_BLOCKS[1::2] if moe_every == 2 else ALL_BLOCKS if layers == list(ALL_BLOCKS) else tuple(layers)
    assert summary.layers == expected
    assert set(config.moe.layers) == (set() if expected in (ALL_BLOCKS, ALL_BLOCKS[1::2]) else set(expected))
    torch.testing.assert_close(valid_logits(model, batch), reference, atol=1e-5, rtol=1e-5)
    model.save_pretrained(str(tmp_path))
    loaded = GeneralistModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config
    assert [type(b.ffn) for b in blocks(loaded)] == [type(b.ffn) for b in blocks(model)]
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_upcycling_the_dense_blocks_of_a_mixed_model_completes_it(data, tok):
    tasks, samples = data
    model = dense_model(tasks, tok, every=2, expert_hidden=128)  # = ffn_hidden
    batch = collate(samples, tok, model.task_ids)
    reference = valid_logits(model, batch)
    _, summary = upcycle(model, num_experts=4, top_k=2, seed=0)
    assert summary.layers == ALL_BLOCKS[0::2] and model.config.moe.every == 1
    torch.testing.assert_close(valid_logits(model, batch), reference, atol=1e-5, rtol=1e-5)

    other = dense_model(tasks, tok, every=2, expert_hidden=128)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(other, num_experts=8, top_k=2)


def test_summary_counts_parameters(data, tok):
    tasks, _ = data
    model = dense_model(tasks, tok)
    before = model.num_parameters()
    ffn_params = sum(p.numel() for p in model.decoder.blocks[1].ffn.parameters())
    _, summary = upcycle(model, num_experts=4, top_k=2, layers="every_other", seed=0)
    routers = [b.ffn.router for b in blocks(model) if isinstance(b.ffn, MoE)]
    router_params = sum(p.numel() for r in routers for p in r.parameters())
    assert summary.parameters_before == summary.active_parameters_before == before
    assert summary.parameters_after == model.num_parameters() == before + 2 * 3 * ffn_params + router_params
    assert summary.active_parameters_after == model.num_parameters(active=True) \
        == before + 2 * ffn_params + router_params


def test_a_model_without_encoder_blocks_upcycles_its_decoder(data, tok):
    tasks, _ = data
    model = dense_model(tasks, tok, encoder_layers=0)
    _, summary = upcycle(model, num_experts=2, top_k=1, layers="all", seed=0)
    assert summary.layers == ("decoder.blocks.0", "decoder.blocks.1") and model.config.moe.every == 1
    assert summary.router.normalize is True  # k = 1: renormalised, so the one weight is 1


class _Holder(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn


@pytest.mark.parametrize("router", ["token", RouterConfig(gate="hash")], ids=["topk", "hash"])
def test_a_bare_module_tree_upcycles_its_dense_ffns_in_their_dtype(router):
    torch.manual_seed(0)
    shared = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=2, experts=ExpertsConfig(shared_expert=True)))
    tree = nn.ModuleDict({"head": DenseFFN(16, 32, GLU), "moe": shared,
                          "layers": nn.ModuleList(_Holder(DenseFFN(16, 32, ExpertsConfig())) for _ in range(3))})
    tree = tree.double()
    dense = copy.deepcopy(tree)
    _, summary = upcycle(tree, num_experts=4, top_k=2, router=router, layers="every_other", seed=0)
    assert summary.layers == ("layers.1",)
    _, summary = upcycle(tree, num_experts=4, top_k=2, router=router, layers=["head", "layers.0.ffn"], seed=0)
    assert summary.layers == ("head", "layers.0") and isinstance(tree["layers"][2].ffn, DenseFFN)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for new, old in [(tree["head"], dense["head"]), (tree["layers"][1].ffn, dense["layers"][1].ffn)]:
        assert isinstance(new, MoE) and new.experts.w_in.dtype == torch.float64
        # the gate runs in fp32: its k weights sum to 1 within fp32 rounding
        torch.testing.assert_close(new(x).output, old(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=["encoder.blocks.7"]), r"not an upcyclable FFN.*encoder\.blocks\.0, encoder\.blocks\.1"),
    (dict(layers="every-other"), r"'all' or 'every_other' or names among: encoder\.blocks\.0"),
    (dict(layers=[]), "non-empty list"),
    (dict(router=RouterConfig(gate="expert_choice")), "gate 'expert_choice'"),
    (dict(router=RouterConfig(gate="balanced")), "gate 'balanced'"),
    (dict(router=RouterConfig(normalize=False)), "normalize=False"),
    (dict(router="nonsense"), "unknown router strategy 'nonsense'; known: attribute"),
    (dict(expert_hidden=64), "expert_hidden=64 but encoder.blocks.0's FFN has hidden width 128"),
    (dict(top_k=5), "top_k=5 exceeds num_experts=4"),
    (dict(noise=-0.1), "noise must be >= 0"),
    (dict(reinit_fraction=1.5), r"reinit_fraction must be in \[0, 1\]"),
    (dict(router_std=-0.01), "router_std must be >= 0"),
    (dict(top_k=True), "top_k must be a positive int, got True"),
], ids=lambda value: None if isinstance(value, dict) else value[:24])
def test_bad_settings_raise_and_leave_the_model_as_it_was(data, tok, kwargs, message):
    tasks, _ = data
    model = dense_model(tasks, tok)
    config = model.config
    with pytest.raises(ValueError, match=message):
        upcycle(model, **{"num_experts": 4, "top_k": 2, **kwargs})
    assert model.config is config and all(isinstance(b.ffn, DenseFFN) for b in blocks(model))


def test_naming_an_moe_layer_says_it_is_one(data, tok):
    tasks, _ = data
    model = dense_model(tasks, tok)
    upcycle(model, num_experts=4, top_k=2, layers="every_other", seed=0)
    with pytest.raises(ValueError, match="'encoder.blocks.1' is already an MoE layer"):
        upcycle(model, num_experts=4, top_k=2, layers=["encoder.blocks.1"])


@pytest.mark.skipif("weight_scale" not in RouterConfig.__dataclass_fields__,
                    reason="RouterConfig.weight_scale (DeepSeek-V3 routing) is not in this tree yet")
def test_a_gate_weight_scale_is_refused():
    tree = nn.ModuleList([DenseFFN(16, 32, ExpertsConfig())])
    with pytest.raises(ValueError, match="weight_scale=2.5"):
        upcycle(tree, num_experts=4, top_k=2, router=RouterConfig(score="sigmoid", weight_scale=2.5))
    assert isinstance(tree[0], DenseFFN)


def test_upcycling_clears_decoder_router_and_refuses_to_complete_a_model_that_uses_it(data, tok):
    """Upcycling writes one router configuration for every layer: a dense model's decoder_router
    is cleared (its decoder experts route as ``router`` says), and a model whose decoder already
    has MoE layers routed by decoder_router is refused, not silently re-routed."""
    tasks, _ = data
    model = dense_model(tasks, tok, decoder_router={"strategy": "hybrid"})
    upcycle(model, num_experts=4, top_k=2, router="attribute", seed=0)
    assert model.config.moe.decoder_router == {}
    decoder_moes = [m for m in model.decoder.modules() if isinstance(m, MoE)]
    assert decoder_moes and all(m.config.router.strategy == "attribute" for m in decoder_moes)

    mixed = dense_model(tasks, tok, every=2, expert_hidden=128, decoder_router={"strategy": "hybrid"})
    with pytest.raises(ValueError, match="route by decoder_router"):
        upcycle(mixed, num_experts=4, top_k=2, seed=0)
