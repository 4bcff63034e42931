"""What the thirteenth audit found in ``from_hf``, each pinned on tiny random checkpoints: a BERT folder
whose LayerNorms carry TensorFlow's legacy names (``gamma`` / ``beta``, as bert-base-cased's file does)
converts as transformers loads it."""

from __future__ import annotations

import os

import pytest
import torch

from moe_gen.tasks.batch import Side


def _tokenizers():
    """A WordLevel tokenizer of 64 ids: transformers' (saved into checkpoint folders) and moe_gen's."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moe_gen.tasks import HFTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, 64)}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]")
    return hf, HFTokenizer.from_pretrained(backend, num_bins=4, num_sentinels=2, extra_symbols=())


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
