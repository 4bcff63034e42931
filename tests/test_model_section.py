"""The ``model:`` section of a run configuration (moe_gen/model_section.py): its default flavour, the MoE
layers' names looked up whichever way a block is made MoE, each ``model.init`` check refusing the first
value past its bound and taking the bound, and a checkpoint section building what ``from_hf`` and
``upcycle`` called by hand build."""

from __future__ import annotations

import re

import pytest
import torch

from moe_gen.model import flavour
from moe_gen.model_section import _init_section, _model_config, _pretrained_model


def test_a_model_section_without_a_flavour_is_the_debug_flavour():
    assert _model_config({}) == flavour("debug")
    assert _model_config({"d_model": 48}) == flavour("debug").replace(d_model=48)


@pytest.mark.parametrize("moe, message", [
    ({"every": 0, "layers": ["encoder.blocks.0"], "router": {"strategy": "tokn"}}, "unknown router strategy 'tokn'"),
    ({"every": 1, "decoder_router": {"strategy": "tokn"}}, "unknown router strategy 'tokn'"),
    ({"every": 1, "router": {"gate": "softmx"}}, "unknown gate 'softmx'"),
    ({"every": 1, "backend": "bogus"}, "unknown dispatch backend 'bogus'"),
], ids=["named-layers", "decoder-router", "gate", "backend"])
def test_the_moe_layers_names_are_looked_up_with_the_model_section(moe, message):
    """By ``every`` or by named ``layers``, the encoder's and the decoder's router, the gate, the backend."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _model_config({"moe": moe})


_UP = {"init": "hf:minilm"}


@pytest.mark.parametrize("section, message", [
    ({"init": "hf:"}, "model.init must be 'hf:PATH'"),
    ({"init": "minilm"}, "model.init must be 'hf:PATH'"),
    ({**_UP, "flavour": "tiny"}, "model.flavour and model.init exclude each other"),
    ({**_UP, "upcycle": 4}, "model.upcycle must be a mapping (num_experts, top_k, router, layers, ...), got 4"),
    ({**_UP, "upcycle": {"num_experts": 4, "seed": 1}}, "model.upcycle: unknown keys ['seed']"),  # the run's seed
    ({**_UP, "upcycle": {"num_experts": 4, "top_k": 0}}, "top_k must be between 1 and num_experts (4), got 0"),
    ({**_UP, "upcycle": {"num_experts": 4, "top_k": 5}}, "top_k must be between 1 and num_experts (4), got 5"),
    ({**_UP, "upcycle": {"num_experts": 1}}, "top_k must be between 1 and num_experts (1), got 2"),  # upcycle's default
    ({**_UP, "upcycle": {"num_experts": 4, "layers": []}}, "model.upcycle.layers must be 'all' or 'every_other'"),
    ({**_UP, "upcycle": {"num_experts": 4, "layers": ["encoder.blocks.1x"]}}, "model.upcycle.layers must be"),
    ({**_UP, "upcycle": {"num_experts": 4, "layers": "every_third"}}, "model.upcycle.layers must be"),
], ids=["bare-hf", "no-hf", "flavour", "upcycle-int", "seed", "top_k-0", "top_k-5", "default-top_k", "no-layers",
        "block-suffix", "placement"])
def test_a_model_init_section_refuses_the_first_value_past_each_bound(section, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _init_section(section)


def test_a_model_init_section_takes_each_bound():
    """top_k = num_experts, block numbers of two digits, an ``.ffn`` suffix; the overrides come back typed."""
    layers = ["decoder.blocks.12", "encoder.blocks.0.ffn"]
    init, recipe, overrides = _init_section({**_UP, "dropout": 0.25, "upcycle": {"num_experts": 4, "top_k": 4,
                                                                                 "layers": layers}})
    assert (init, recipe, overrides) == ("hf:minilm", {"num_experts": 4, "top_k": 4, "layers": layers},
                                         {"dropout": 0.25})
    assert _init_section({**_UP, "upcycle": {"num_experts": 1, "top_k": 1}})[1] == {"num_experts": 1, "top_k": 1}
    assert _init_section({"init": "hf:x"}) == ("hf:x", None, {})


def test_a_checkpoint_section_builds_what_from_hf_and_upcycle_build(tok, monkeypatch):
    """The overrides go to ``from_hf``, the recipe to ``upcycle`` with the run's seed: bit for bit. A dense
    debug model stands in for the checkpoint (``from_hf`` is recorded), so no weights are read."""
    import moe_gen.pretrained
    from moe_gen.model import GeneralistModel
    from moe_gen.pretrained import upcycle
    from moe_gen.tasks import load_preset

    task = load_preset("table_species", "train", limit=4)

    def dense():
        torch.manual_seed(0)
        return GeneralistModel.build(flavour("debug", moe={"every": 0}), [task], tok)

    calls = []
    monkeypatch.setattr(moe_gen.pretrained, "from_hf", lambda *args, **kw: calls.append((args, kw)) or dense())
    recipe = {"num_experts": 2, "top_k": 1, "layers": ["encoder.blocks.0"], "noise": 0.1}
    got = _pretrained_model({**_UP, "decoder_layers": 1, "dropout": 0.2, "upcycle": dict(recipe)}, [task], seed=3)
    assert calls == [(("minilm", [task]), {"decoder_layers": 1, "dropout": 0.2})]
    want = dense()
    upcycle(want, **recipe, seed=3)
    assert got.config == want.config and got.config.moe.num_experts == 2
    want_sd = want.state_dict()
    assert got.state_dict().keys() == want_sd.keys()
    for name, value in got.state_dict().items():
        assert torch.equal(value, want_sd[name]), name
