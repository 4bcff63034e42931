"""Block variants and the decoder-only (prefix LM) layout: the invariants the default
encoder-decoder keeps (cached decoding = full forward, padding and packing do not change
outputs, save/load, training) hold for every architecture the pretrained families need."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import ExpertsConfig, RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.cached_decoder import with_target
from moe_gen.objectives import GenerativeObjective
from moe_gen.tasks import Tokenizer, collate, load_preset

ARCHITECTURES = {
    # Llama-like: one stack, RMSNorm, SwiGLU without biases, grouped-query attention, rotary.
    "prefix_lm": dict(layout="decoder-only", norm="rms", num_kv_heads=2, attention_bias=False,
                      positions="rotary", rotary_base=50000.0, experts=ExpertsConfig(kind="glu", activation="silu",
                                                                                      bias=False)),
    "causal_prefix_untied": dict(layout="decoder-only", prefix_attention="causal", tie_embeddings=False),
    # BERT-like: post-norm, a norm over the embeddings, no final norm.
    "post_norm": dict(norm_position="post", embedding_norm=True, final_norm=False, norm_eps=1e-12),
    "gqa_features_unpositioned": dict(num_kv_heads=1, positions_on_features=False),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def build(tasks, tok, arch: str, **overrides) -> GeneralistModel:
    torch.manual_seed(0)
    return GeneralistModel.build(flavour_with("debug", **ARCHITECTURES[arch], **overrides), tasks, tok)


def test_decoder_only_has_one_stack_without_cross_attention(tok):
    task = load_preset("digit_classification", "train", limit=2)
    model = build([task], tok, "prefix_lm")
    assert len(model.encoder.blocks) == 0 and all(b.cross_attn is None for b in model.decoder.blocks)
    assert model.decoder.blocks[0].self_attn.kv.weight.shape == (2 * 2 * 16, 64)  # 2 kv heads of width 16
    with pytest.raises(ValueError, match="num_kv_heads=3 must be >= 1 and divide num_heads=4"):
        flavour("debug", num_kv_heads=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        flavour("debug", layout="decoder")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("name", ["digit_captioning", "digit_classification"])
def test_cached_greedy_decoding_matches_full_forward(name, arch, tok):
    """Incremental decoding (the decoder-only layout caches the input prefix's keys and values)
    picks the argmax of a full teacher-forced pass at every step, with that pass's likelihood."""
    task = load_preset(name, "train", limit=3)
    model = build([task], tok, arch, router=RouterConfig(strategy="token")).eval()
    predictions = model.infer(task, task.data[:3], max_new_tokens=5)
    plan = task.plan(tok)
    spec = plan.decode_specs()[0]
    for i, prediction in enumerate(predictions):
        sample = plan.encode(task.data[i], i, training=False, inference=True, template=0)
        tokens = prediction.tokens
        fed = tokens + ([tok.eos_id] if spec.kind == "closed_set" or len(tokens) < 5 else [])
        batch = collate([with_target(sample, "TEXT", fed + [tok.pad_id])], tok, model.task_ids)
        with torch.no_grad():
            logp = model(batch).logits.float().log_softmax(-1)[0]
        start = sum(len(c) for c in sample.decoder)
        node, total = spec.trie, 0.0
        for j, token in enumerate(fed):
            row = logp[start + j]
            if spec.kind == "closed_set":
                allowed = sorted(node)
                assert token == allowed[int(row[allowed].argmax())]
                node = node[token]
            else:
                assert token == int(row.argmax())
            total += float(row[token])
        assert prediction.score == pytest.approx(total, abs=1e-3)


@pytest.mark.parametrize("arch", ["prefix_lm", "causal_prefix_untied", "post_norm"])
def test_outputs_do_not_depend_on_batch_order_padding_or_packing(arch, tok):
    task = load_preset("doc_topic", "train", limit=5)
    model = build([task], tok, arch, router=RouterConfig(strategy="attribute")).eval()
    samples = list(task.samples(tok, training=False))
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    padded = collate(samples, tok, model.task_ids)
    shuffled = collate([samples[i] for i in order], tok, model.task_ids)
    packed = collate(samples, tok, model.task_ids, pack=True, max_length=400)
    assert packed.decoder.tokens.shape[0] < len(samples)
    with torch.no_grad():
        a, b, c = model(padded).logits, model(shuffled).logits, model(packed).logits
    for new, old in enumerate(order):
        n = int((~padded.decoder.padding_mask[old]).sum())
        torch.testing.assert_close(b[new, :n], a[old, :n], atol=1e-4, rtol=1e-4)

    def per_sample(batch, logits):
        out = []
        for row in range(batch.labels.shape[0]):
            for sample_id in batch.decoder.tags.sample[row].unique().tolist():
                where = (batch.decoder.tags.sample[row] == sample_id) & ~batch.decoder.padding_mask[row]
                out.append(logits[row, where])
        return sorted(out, key=lambda t: (t.shape[0], float(t.sum())))

    for x, y in zip(per_sample(padded, a), per_sample(packed, c), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_decoder_only_frame_generation_matches_full_forward(tok):
    task = load_preset("text_to_speech", "train", limit=2)
    model = build([task], tok, "prefix_lm").eval()
    plan = task.plan(tok)
    for i, prediction in enumerate(model.infer(task, task.data[:2], max_frames=4)):
        sample = plan.encode(task.data[i], i, training=False, inference=True, template=0)
        rows = torch.cat([prediction.frames, torch.zeros(1, prediction.frames.shape[1])])
        batch = collate([with_target(sample, "AUDIO", rows=rows, adaptor="audio_tgt_fbank")], tok, model.task_ids)
        with torch.no_grad():
            predicted = model(batch).frames["audio_tgt_fbank"]
        torch.testing.assert_close(predicted[: len(prediction.frames)], prediction.frames, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_save_load_round_trip_and_training_lowers_the_loss(arch, tok, tmp_path):
    task = load_preset("digit_classification", "train", limit=8)
    model = build([task], tok, arch, every=1, router=RouterConfig(strategy="attribute"))
    batch = collate(list(task.samples(tok)), tok, model.task_ids)
    objective = GenerativeObjective(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0]
    model.eval().save_pretrained(str(tmp_path))
    again = GeneralistModel.from_pretrained(str(tmp_path)).eval()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(model(batch).logits, again(batch).logits)


def test_contrastive_and_masked_objectives_run_on_the_decoder_only_layout(tok):
    """MaMMUT's two passes (the prefix pass and the bidirectional pass of the one stack) and 4M's
    masked modeling train the decoder-only layout too."""
    from moe_gen.objectives import ContrastiveObjective, MaskedObjective

    task = load_preset("image_text_retrieval", "train", limit=6)
    model = build([task], tok, "prefix_lm", router=RouterConfig(strategy="attribute"), predict_all_features=True)
    batch = collate(list(task.samples(tok)), tok, model.task_ids)
    result = ContrastiveObjective(model)(batch)
    assert torch.isfinite(result["loss"]) and result["contrastive_loss"] > 0
    result["loss"].backward()
    assert model.contrastive_image.weight.grad.abs().sum() > 0 and model.decoder.blocks[0].self_attn.q.weight.grad \
        .abs().sum() > 0
    model.zero_grad()
    objective = MaskedObjective(model, input_budget=12, target_budget=8)
    masked = objective(objective.prepare(list(task.samples(tok)), random.Random(0)))
    assert torch.isfinite(masked["loss"])
    masked["loss"].backward()
    assert model.decoder.blocks[-1].ffn.experts.w_in.grad.abs().sum() > 0


def test_decoder_only_beam_search_scores_are_teacher_forced_likelihoods(tok):
    task = load_preset("doc_topic", "train", limit=2)
    model = build([task], tok, "prefix_lm", router=RouterConfig(strategy="token")).eval()
    wide = model.infer(task, task.data[:1], beams=3, max_new_tokens=5)[0]
    sample = task.plan(tok).encode(task.data[0], 0, training=False, inference=True, template=0)
    fed = wide.tokens + [tok.eos_id]  # a closed-set answer ends with EOS
    batch = collate([with_target(sample, "TEXT", fed + [tok.pad_id])], tok, model.task_ids)
    with torch.no_grad():
        logp = model(batch).logits.float().log_softmax(-1)[0]
    start = sum(len(c) for c in sample.decoder)
    assert wide.score == pytest.approx(sum(float(logp[start + j, t]) for j, t in enumerate(fed)), abs=1e-3)
