"""Dense checkpoints converted into moe_gen's own transformer compute what transformers computes:
MiniLM (BERT family) hidden states and SmolLM2 (Llama family) logits on a padded batch, fp32,
within 1e-4. The shipped checkpoints are installed by ``make pretrained``; without them these
tests skip with the install command."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from moe_gen.pretrained import CheckpointMissing, locate
from moe_gen.routing.tags import TokenTags
from moe_gen.tasks.batch import Side

SENTENCES = ["The capital of France is Paris.", "A man is playing a guitar on the street at night.",
             "Zürich's café serves crème brûlée — naïvely.", "hi"]


def shipped(name: str) -> str:
    try:
        return locate(name)
    except CheckpointMissing as exc:
        pytest.skip(str(exc))


def text_side(model, ids: list[list[int]]) -> Side:
    """A batch of token sequences (right-padded) as an encoder-side input of ``model``."""
    B, S = len(ids), max(map(len, ids))
    tokens = torch.full((B, S), model.tokenizer.pad_id, dtype=torch.long)
    padding = torch.ones(B, S, dtype=torch.bool)
    for b, row in enumerate(ids):
        tokens[b, :len(row)] = torch.tensor(row)
        padding[b, :len(row)] = False
    tags = dataclasses.replace(TokenTags.constant((B, S), num_modalities=model.config.router.num_modalities),
                               sample=torch.zeros(B, S, dtype=torch.long))
    return Side(tokens=tokens, is_token=~padding, rows={}, index={}, positions={}, padding_mask=padding, tags=tags)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from moe_gen.pretrained.hf import from_hf

    path = shipped("minilm")
    reference = AutoModel.from_pretrained(path).eval()
    return reference, from_hf(path).eval()


def test_bert_family_hidden_states_match_transformers(minilm):
    reference, model = minilm
    hf_tok = model.tokenizer
    ids = [hf_tok.encode(s, add_bos=True, add_eos=True) for s in SENTENCES]  # [CLS] ... [SEP]
    assert model.config.norm_position == "post" and model.config.layout == "encoder-decoder"
    assert model.pretrained_unused == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"] or \
        set(model.pretrained_unused) <= {"embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"}
    side = text_side(model, ids)
    with torch.no_grad():
        ours = model.encode(side).hidden
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
    valid = ~side.padding_mask
    assert side.padding_mask.any()  # the batch has padding
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)
    # and the sentence embeddings mean-pooled from them are those of the checkpoint's recipe
    pooled = (ours * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert float(pooled[0] @ pooled[1]) < 0.3  # unrelated sentences


def test_bert_model_builds_for_tasks_and_trains(minilm):
    """A BERT-initialised generalist for a built-in task: a new decoder, the tokenizer extended by
    moe_gen's tokens (new rows), and one optimizer step that lowers the loss."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks import collate, load_preset

    task = load_preset("doc_topic", "train", limit=8)
    torch.manual_seed(0)
    model = from_hf(shipped("minilm"), [task], decoder_layers=1)
    assert model.tokenizer.vocab_size > model.tokenizer.base_vocab_size == 30522
    batch = collate(list(task.samples(model.tokenizer)), model.tokenizer, model.task_ids)
    objective = GenerativeObjective(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2 through transformers' GGUF reader, cut to its first 4 layers (the conversion is
    per layer; the full 30 are checked by scripts/bench_pretrained.py)."""
    path = shipped("smollm2")
    pytest.importorskip("gguf", reason="pip install -e '.[pretrained]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    reference.model.layers = reference.model.layers[:4]
    reference.config.num_hidden_layers = 4
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return reference, tokenizer


@pytest.mark.slow
def test_llama_family_logits_match_transformers(smollm):
    from moe_gen.pretrained.hf import from_hf
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    reference, hf_tokenizer = smollm
    model = from_hf(reference, tokenizer=HFTokenizer.from_pretrained(hf_tokenizer)).eval()
    c = model.config
    assert (c.layout, c.norm, c.num_kv_heads, c.experts.kind, c.tie_embeddings) == \
        ("decoder-only", "rms", 3, "glu", True)
    ids = [hf_tokenizer(s, add_special_tokens=False).input_ids for s in SENTENCES]
    side = text_side(model, ids)
    with torch.no_grad():
        ours = model.output_logits(model.encode(side).hidden)[..., :reference.config.vocab_size]
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).logits
    valid = ~side.padding_mask
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)
