"""What the thirteenth audit found in ``from_hf``, each pinned on tiny random checkpoints: a BERT folder
whose LayerNorms carry TensorFlow's legacy names (``gamma`` / ``beta``, as bert-base-cased's file does)
converts as transformers loads it, and an override of the dense FFNs' kind, activation or bias, which
would make the converted model compute something else than the checkpoint, is refused."""

from __future__ import annotations

import os

import pytest
import torch

from moe_gen.config import ExpertsConfig
from moe_gen.tasks.batch import Side


def _tokenizers():
    """A WordLevel tokenizer of 64 ids: transformers' (saved into checkpoint folders) and moe_gen's."""
    from helpers import wordlevel_tokenizers

    return wordlevel_tokenizers()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=40)).eval()


def _hidden_states(model, reference, ids):
    """moe_gen's encoder states and transformers' for the same right-padded rows, at the real tokens."""
    side = Side.from_token_ids(ids, model.tokenizer.pad_id, model.config.moe.router.num_modalities)
    with torch.no_grad():
        ours = model.encode(side).hidden
        theirs = reference(input_ids=side.tokens, attention_mask=(~side.padding_mask).long()).last_hidden_state
    valid = ~side.padding_mask
    return ours[valid], theirs[valid]


def test_a_bert_folder_with_legacy_layernorm_names_converts_as_transformers_loads_it(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from moe_gen.pretrained import from_hf

    bert = _tiny_bert()
    bert.save_pretrained(tmp_path)
    hf_tokenizer, tokenizer = _tokenizers()
    hf_tokenizer.save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    legacy = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
              for name, value in load_file(file).items()}
    assert "embeddings.LayerNorm.gamma" in legacy and "encoder.layer.1.output.LayerNorm.beta" in legacy
    save_file(legacy, file, metadata={"format": "pt"})
    reference = AutoModel.from_pretrained(tmp_path).eval()  # transformers renames them on load
    model = from_hf(str(tmp_path), tokenizer=tokenizer).eval()  # was "weight embeddings.LayerNorm.weight is missing"
    assert not any("LayerNorm" in name for name in model.pretrained_unused)
    ours, theirs = _hidden_states(model, reference, [[2, 5, 9, 17, 3], [2, 40, 3]])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # a weight stored under both names is named, not taken from whichever file came last
    save_file({**legacy, "embeddings.LayerNorm.weight": legacy["embeddings.LayerNorm.gamma"].clone()}, file,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights embeddings.LayerNorm.gamma and embeddings.LayerNorm.weight "
                                         r"are both embeddings.LayerNorm.weight"):
        from_hf(str(tmp_path), tokenizer=tokenizer)


@pytest.mark.parametrize("experts, key", [
    (ExpertsConfig(kind="mlp", activation="relu", bias=True), "activation='relu'"),
    ({"activation": "gelu_tanh"}, "activation='gelu_tanh'"),
    ({"bias": False}, "bias=False"),
    ("glu", "kind='glu'"),
])
def test_from_hf_refuses_an_ffn_kind_activation_or_bias_other_than_the_checkpoints(experts, key):
    """The dense FFNs are built from ``moe.experts``: another activation gave hidden states 2.0 away
    from the checkpoint's (relu), silently."""
    from moe_gen.pretrained import from_hf

    _, tokenizer = _tokenizers()
    with pytest.raises(ValueError, match=rf"moe.experts.{key} contradicts the checkpoint, whose weights fix "
                                         rf"moe.experts.{key.split('=')[0]}="):
        from_hf(_tiny_bert(), tokenizer=tokenizer, moe={"experts": experts})


def test_from_hf_takes_experts_settings_that_leave_the_dense_ffns_as_the_checkpoints():
    """Settings the dense FFNs do not compute with (the shared expert's) stay allowed; a dict changes
    those fields of the checkpoint's experts (it was read over ExpertsConfig's defaults: a Llama's
    SwiGLU FFN became an MLP)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moe_gen.pretrained import from_hf

    _, tokenizer = _tokenizers()
    bert = _tiny_bert()
    for experts in ({"shared_expert": True}, "mlp",
                    ExpertsConfig(kind="mlp", activation="gelu", bias=True, shared_expert=True)):
        model = from_hf(bert, tokenizer=tokenizer, moe={"experts": experts}).eval()
        ours, theirs = _hidden_states(model, bert, [[2, 5, 9, 17, 3], [2, 40, 3]])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2))
    model = from_hf(llama, tokenizer=tokenizer, moe={"experts": {"shared_expert": True}})
    experts = model.config.moe.experts
    assert (experts.kind, experts.activation, experts.bias, experts.shared_expert) == ("glu", "silu", False, True)
