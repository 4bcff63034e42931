"""Where a model's MoE layers go and how each is built (ModelConfig: ``every``, named layers, routed
attention widths, flavours, old flat keys, the dense twin); moved from test_model.py."""

from __future__ import annotations

import pytest
import torch

from moe_gen.model import flavour
from moe_gen.moe import MoE


def test_every_places_moe_ffns_in_every_block_every_other_block_or_none():
    """``every=2`` puts them in the 2nd, 4th, ... block (0-based 1, 3, ...), as the blocks build them."""
    from moe_gen.model.transformer import Stack

    for every, expected in [(0, [False] * 4), (1, [True] * 4), (2, [False, True, False, True])]:
        config = flavour("debug", encoder_layers=4, moe={"every": every})
        assert [config.is_moe(i) for i in range(4)] == expected
        assert [config.is_moe(i, "decoder") for i in range(4)] == expected
        stack = Stack(config, 4, cross=False)
        assert [isinstance(block.ffn, MoE) for block in stack.blocks] == expected
    named = flavour("debug", encoder_layers=4, moe={"layers": ["encoder.blocks.0", "decoder.blocks.1"]})
    assert [named.is_moe(i) for i in range(4)] == [True, False, False, False]
    assert [named.is_moe(i, "decoder") for i in range(2)] == [False, True]


def test_routed_attention_projections_are_d_model_wide_whatever_the_experts_hidden_width():
    """The attention output projection's linear experts map D to D (``moe_config(d_hidden=D)``),
    while the FFN experts are ``expert_hidden`` wide."""
    from helpers import random_tags

    from moe_gen.model.transformer import Stack

    config = flavour("debug", d_model=32, moe={"attention": True, "expert_hidden": 48})
    projection = config.moe_config(d_hidden=32, kind="linear")
    assert (projection.d_hidden, projection.experts.kind) == (32, "linear")
    assert (config.moe_config().d_hidden, config.moe_config().experts.kind) == (48, "mlp")
    torch.manual_seed(0)
    stack = Stack(config, 2, cross=False)
    out = stack(torch.randn(2, 5, 32), torch.ones(2, 5, 5, dtype=torch.bool), random_tags((2, 5)),
                torch.zeros(2, 5, dtype=torch.bool))
    assert out.hidden.shape == (2, 5, 32)


def test_flavours_are_as_documented_and_a_moe_override_changes_only_the_fields_it_names():
    assert (flavour("debug").encoder_layers, flavour("debug").d_model, flavour("debug").moe.num_experts) == (2, 64, 4)
    tiny = flavour("tiny")
    assert (tiny.moe.num_experts, tiny.moe.every, tiny.moe.top_k) == (8, 2, 2)  # README: 8 experts, every other block
    for name in ("tiny", "small", "base"):
        assert flavour(name, moe={"num_experts": 16}).moe == flavour(name).moe.replace(num_experts=16)
        assert flavour(name).with_moe(num_experts=16) == flavour(name, moe={"num_experts": 16})


def test_flat_moe_keys_of_old_configs_win_over_the_moe_fields_they_name():
    """A flat ``router:`` mapping merges into ``moe.router`` key by key, its keys winning."""
    from moe_gen.model import ModelConfig

    config = ModelConfig.from_dict({"moe": {"router": {"strategy": "task", "noise": "jitter"}, "num_experts": 8},
                                    "router": {"strategy": "attribute"}, "num_experts": 6, "moe_every": 2})
    assert (config.moe.router.strategy, config.moe.router.noise) == ("attribute", "jitter")
    assert (config.moe.num_experts, config.moe.every) == (6, 2)


def test_the_dense_twin_of_a_decoder_only_model_ignores_the_unused_encoder_blocks():
    """In the decoder-only layout ``encoder_layers`` builds nothing: MoE in every decoder block leaves
    no dense block whose ``ffn_hidden`` the twin must match."""
    config = flavour("debug", layout="decoder-only", ffn_hidden=100,
                     moe={"layers": ["decoder.blocks.0", "decoder.blocks.1"]})
    twin = config.dense_twin()
    assert twin.ffn_hidden == 2 * 64 and not twin.moe.layers and twin.moe.every == 0
    with pytest.raises(ValueError, match="ffn_hidden=100 differs from the MoE blocks' active width 128"):
        flavour("debug", layout="decoder-only", ffn_hidden=100, moe={"layers": ["decoder.blocks.0"]}).dense_twin()
