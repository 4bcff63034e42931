"""What an audit of low-precision paths found (2026-12-05, eighth session), each pinned: a model
cast to bf16/fp16/fp64 runs every kind of input, keeps its routing balance state in fp32, decodes
under bf16 autocast, keeps its EMA and its saved dtype, and an fp16 loss is not NaN where every
term is finite."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import flavour_with, random_tags

from moe_gen import MoE, MoEConfig, RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, collate, load_preset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _model(tok, names, limit=4, **overrides):
    tasks = [load_preset(n, "train", limit=limit) for n in names]
    torch.manual_seed(0)
    overrides.setdefault("router", RouterConfig(strategy="attribute"))
    return GeneralistModel.build(flavour_with("debug", **overrides), tasks, tok), tasks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_cast_model_reads_images_tables_and_motion(tok, dtype):
    model, tasks = _model(tok, ["digit_classification", "table_species", "motion_classification"])
    model = model.to(dtype)
    for task in tasks:  # the batches' feature rows are fp32; the adapters were not
        assert torch.isfinite(model(collate([task.encode(0, tok)], tok, model.task_ids)).logits).all()
        assert model.infer(task, task.data[:1])[0].text in set(sum(task.closed_sets().values(), []))


def test_the_routing_balance_state_stays_fp32(tok):
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=8, top_k=2,
                        router=RouterConfig(strategy="modality", tag_balance="loss+bias",
                                                   tag_balance_window=4))).train()
    moe = moe.to(torch.float16)
    assert {moe.router.balance_bias.dtype, moe.router.load_average.dtype, moe.router.load_weight.dtype} == \
        {torch.float32}
    T = 70_000  # one tag group's count beyond fp16's 65504: was inf, then a NaN bias for good
    tags = dataclasses.replace(random_tags((T,)), modality=torch.zeros(T, dtype=torch.long))
    with torch.no_grad():
        for _ in range(2):
            out = moe(torch.randn(T, 8).to(torch.float16), tags=tags)
    assert torch.isfinite(moe.router.balance_bias).all() and torch.isfinite(out.output).all()


def test_decoding_under_bf16_autocast(tok):
    """Greedy, beam and unmerged decoding under bf16 autocast give the fp32 answers, their scores
    within bf16's rounding (a closed set of two labels: "assert", "assignment")."""
    model, tasks = _model(tok, ["doc_topic"])
    rows = tasks[0].data[:3]
    for options in ({}, {"beams": 2}, {"merged": False}):
        expected = model.infer(tasks[0], rows, **options)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caches are fp32, the projections bf16
            got = model.infer(tasks[0], rows, **options)
        assert [p.text for p in got] == [p.text for p in expected]
        assert [p.score for p in got] == pytest.approx([p.score for p in expected], abs=2e-2)


def test_image_codes_in_bf16(tok):
    model, tasks = _model(tok, ["text_to_image_maskgit"], limit=2)
    task = tasks[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.infer(task, task.data[:1])[0].image.dtype.name == "uint8"
    cast = copy.deepcopy(model).to(torch.bfloat16)
    assert cast.infer(task, task.data[:1])[0].image is not None
    assert cast.plan(task).encode(task.data[0], 0, training=True) is not None  # its VQ copy is bf16 too


def test_an_fp16_loss_is_finite_when_its_terms_are(tok):
    from moe_gen.objectives import GenerativeObjective

    model, tasks = _model(tok, ["doc_topic"], limit=8)
    model = model.to(torch.float16)
    batch = collate([tasks[0].encode(i, tok) for i in range(8)], tok, model.task_ids)
    with torch.no_grad():
        out = model(batch)
        shifted = dataclasses.replace(out, logits=out.logits - 2.0)  # the same softmax; their sum overflows fp16
        assert not torch.isfinite(shifted.logits.sum())
        assert torch.isfinite(GenerativeObjective(model).loss(batch, shifted)["loss"])


def test_a_bf16_models_weight_average_follows_it(tok, tmp_path):
    from moe_gen.trainer import TrainConfig, Trainer

    model, tasks = _model(tok, ["table_species"], limit=8)
    model = model.to(torch.bfloat16)
    trainer = Trainer(model, tasks, TrainConfig(steps=12, batch_size=4, ema_decay=0.5, lr=1e-2, progress=False,
                                                tensorboard=False), output_dir=str(tmp_path))
    for step in range(1, 4):
        trainer.train_step(step)
    average = trainer.trained_model()
    before = {n: p.detach().clone() for n, p in average.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step(4)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in average.named_parameters())
    changed = sum(int((p.detach() != weights[n]).sum()) for n, p in model.named_parameters())
    # in bf16, 0.5·change rounded the average back: it moved where a few percent of the model did
    assert next(average.parameters()).dtype == torch.float32 and changed > 0 and moved >= changed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_loads_in_the_dtype_it_was_saved_in(tok, tmp_path, dtype):
    model, _ = _model(tok, ["table_species"])
    model = model.to(dtype)
    with torch.no_grad():
        model.token_embedding.weight[5, 0] = 1 + 2 ** -40  # lost in fp32
    model.save_pretrained(str(tmp_path))
    back = GeneralistModel.from_pretrained(str(tmp_path))
    assert back.token_embedding.weight.dtype == dtype
    assert torch.equal(back.token_embedding.weight, model.token_embedding.weight)


def test_a_bf16_deepseek_block_keeps_its_fp32_gate_and_routes_as_transformers_does():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from moe_gen import from_hf_moe

    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3,
                              n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                              n_shared_experts=2)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    block = block.to(torch.bfloat16)
    block.gate.float()  # as transformers loads it
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.2)
        block.gate.e_score_correction_bias.normal_(0, 0.2)
    moe = from_hf_moe(block)
    assert moe.router.weight.dtype == torch.float32 and moe.router.balance_bias.dtype == torch.float32
    x = torch.randn(4096, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = block.gate(x)
        theirs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.dtype == torch.long][0]
        ours = moe(x).routing.topk_ids
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)  # 11 of 4096 differed


@pytest.mark.parametrize("kind", ["mlp", "glu", "linear"])
def test_every_backend_returns_one_dtype_under_bf16_autocast(kind):
    from helpers import with_backend

    from moe_gen import ExpertsConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, router="attribute",
                        experts=ExpertsConfig(kind=kind)))
    x, tags = torch.randn(2, 5, 16), random_tags((2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # eager added fp32 biases to bf16 matmuls: fp32 out
        dtypes = {b: with_backend(moe, b)(x, tags=tags).output.dtype
                  for b in ("eager", "torch", "grouped", "einsum", "merged")}
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("kind", ["mlp", "glu", "linear"])
def test_an_fp32_layer_takes_bf16_hidden_states_on_every_backend(kind):
    from moe_gen import ExpertsConfig

    x, tags = torch.randn(2, 5, 16, dtype=torch.bfloat16), random_tags((2, 5))
    for backend in ("torch", "grouped", "eager", "einsum", "merged"):  # eager/einsum, and linear experts, raised
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, router="attribute", backend=backend,
                            experts=ExpertsConfig(kind=kind)))
        assert moe(x, tags=tags).output.dtype == torch.bfloat16, backend


# ---- a second routing audit (2026-12-05, ninth session) -------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "torch", "grouped", "einsum"])
def test_a_shared_expert_takes_bf16_states_into_an_fp32_layer(backend):
    """The routed experts computed in the input's dtype; the shared expert's plain nn.Linear
    refused bf16 rows against fp32 weights."""
    from moe_gen.config import ExpertsConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, backend=backend,
                        experts=ExpertsConfig(kind="mlp", shared_expert=True))).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = moe(x.to(torch.bfloat16)).output
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), moe(x).output, atol=0.05, rtol=0.05)


def test_merged_routes_of_unequal_expert_counts_take_bf16_states():
    """expert_choice gives tokens 0, 1 or 2 experts: the merged backend's per-route FFNs (and a
    merge_for_inference copy) multiplied bf16 rows by fp32 weights."""
    from moe_gen import TokenTags, merge_for_inference

    T = 12
    tags = TokenTags(task=torch.arange(T) % 3, modality=(torch.arange(T) // 3) % 3,
                     role=torch.zeros(T, dtype=torch.long), task_modalities=torch.ones(T, 9, dtype=torch.bool),
                     causal=torch.zeros(T, dtype=torch.bool), pass_id=torch.zeros(T, dtype=torch.long))
    x = torch.randn(T, 16)
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=1, backend="torch",
                        router=RouterConfig(strategy="attribute", gate="expert_choice"))).eval()
    with torch.no_grad():
        reference = moe(x, tags=tags).output
        assert len(set(moe(x, tags=tags).routing.mask.sum(-1).tolist())) > 1  # unequal counts
        for layer in (merge_for_inference(moe), moe):
            if layer is moe:
                moe.set_backend("merged")
            y = layer(x.to(torch.bfloat16), tags=tags).output
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), reference, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("backend", ["eager", "torch", "grouped", "einsum", "merged"])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_an_all_padding_batch_comes_back_in_the_autocast_dtype(backend, kind):
    from moe_gen import TokenTags

    tags = TokenTags.constant((2, 4), task=1, modality="IMAGE")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, top_k=2, backend=backend, experts=kind,
                        router=RouterConfig(strategy="attribute"))).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(torch.randn(2, 4, 16), tags=tags, padding_mask=torch.ones(2, 4, dtype=torch.bool)).output
    assert out.dtype == torch.bfloat16 and not out.any()


# ---- exact feature rows (2026-12, STRUCT text ids in a cast model) --------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_model_looks_up_struct_text_ids_above_256(tok, dtype):
    """STRUCT rows hold text-value ids as floats: embed cast them to a bf16 model's dtype, which holds
    integers exactly only up to 256, so towns 500-503 (ids 501-504) embedded as ids 500, 502, 504, 504.
    The rows now reach the adapter in fp32 (``Adapter.exact_features``)."""
    from helpers import build

    from moe_gen.tasks import Task

    rows = [{"t": {"city": f"town{i:03d}"}, "y": "yes"} for i in range(600)] * 2  # 600 text values, each seen twice
    task = Task("cities", "[STRUCT:t] which city? -> [TEXT:y]", rows)
    model = build([task], tok).eval()
    plan = model.plan(task)
    samples = [plan.encode({"t": {"city": f"town{i}"}, "y": "yes"}, 0, training=False) for i in range(500, 504)]
    ids = [int(s.encoder[0].rows[0, 3]) for s in samples]
    assert min(ids) > 256 and len(set(ids)) == 4
    side = collate(samples, tok, model.task_ids).encoder
    cast = copy.deepcopy(model).to(dtype)
    seen = []
    cast.adapters["struct_cells"].text.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
    with torch.no_grad():
        reference, embedded = model.embed(side), cast.embed(side)
    assert seen == [ids]
    cells = ~side.is_token & ~side.padding_mask  # the STRUCT positions
    torch.testing.assert_close(embedded[cells].float(), reference[cells], atol=0.03, rtol=0.02)
