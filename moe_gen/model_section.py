"""The ``model:`` section of a run configuration (``moe-gen pretrain``, ``load_run_config``): a
flavour with ``ModelConfig`` overrides, or a dense checkpoint (``init: hf:PATH``) with overrides and
an optional ``upcycle`` recipe. Every key, name and range is checked here, before any data is read;
``moe_gen.cli`` builds the run from it."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from moe_gen.config import merge


def _model_section(section: dict) -> dict:
    """A run's ``model`` section with the flat MoE keys of configurations written before ``model.moe``
    (``num_experts``, ``moe_every``, ``router``, ...) moved into ``moe``, as ``ModelConfig.from_dict``
    reads them. Refuses a key that is neither a ``ModelConfig`` field nor ``flavour``, ``init`` or
    ``upcycle``, naming it with a guess (``flavor``: did you mean ``flavour``)."""
    from moe_gen.config import unknown_keys
    from moe_gen.model import ModelConfig
    from moe_gen.model.config import nest_flat_moe_keys

    section = nest_flat_moe_keys(section)
    known = sorted({f.name for f in dataclasses.fields(ModelConfig)} | {"flavour", "init", "upcycle"})
    unknown = unknown_keys("model", section, known)
    if unknown:  # (ModelConfig's own message left out flavour, init and upcycle, and guessed nothing)
        from moe_gen.registry import did_you_mean

        raise ValueError(f"unknown model keys {unknown}{did_you_mean(unknown, known)}; known: {', '.join(known)}")
    return section


def _model_config(section: dict):
    from moe_gen.model import ModelConfig, flavour

    section = dict(_model_section(section))
    name = section.pop("flavour", "debug")
    config = ModelConfig.from_dict(merge(flavour(name).to_dict(), section))
    _check_names(config)
    if config.moe.every or config.moe.layers:  # the MoE layers' settings (strategy, gate, capacity) too
        from moe_gen.registry import BACKENDS, GATES, ROUTERS

        for stack in ("encoder", "decoder"):
            layer = config.moe_config(stack=stack)
            ROUTERS.get(layer.router.strategy)
            GATES.get(layer.router.gate)
        if config.moe.backend != "auto":
            BACKENDS.get(config.moe.backend)
    return config


def _check_names(config) -> None:
    """Refuses an unknown ``model.moe.experts`` kind or activation (of the MoE layers and the dense
    FFNs) or ``model.adapters`` name now: the model that looks them up is built after every task's
    splits are read."""
    from moe_gen.experts.grouped import ACTIVATIONS
    from moe_gen.registry import ADAPTERS, EXPERTS, did_you_mean

    experts = config.moe.experts
    names = [("moe.experts.kind", "expert kind", experts.kind, EXPERTS.list()),
             ("moe.experts.activation", "expert activation", experts.activation, list(ACTIVATIONS))]
    names += [("adapters", "adapter", name, ADAPTERS.list()) for name in config.adapters]
    for key, kind, name, known in names:
        if name not in known:
            raise ValueError(f"model.{key}: unknown {kind} {name!r}{did_you_mean([name], known)}; "
                             f"known: {', '.join(known)}")


def _pretrained_model(section: dict, tasks, seed: int):
    """A model initialised from a dense checkpoint: ``model.init: hf:PATH`` (a folder, a ``.gguf``
    file, a CTranslate2 Whisper folder, or a shipped checkpoint's name: ``hf:minilm``), optionally
    upcycled (``model.upcycle: {num_experts, top_k, router, layers, noise, reinit_fraction}``);
    the other keys are ``ModelConfig`` overrides (``flavour`` does not apply)."""
    from moe_gen.pretrained import from_hf, upcycle

    init, recipe, overrides = _init_section(section)
    model = from_hf(init[3:], tasks, **overrides)
    if recipe:
        upcycle(model, **{"seed": seed, **recipe})
    return model


def _init_section(section: dict) -> tuple[str, Optional[dict], dict]:
    """A ``model.init`` section checked before any data or weights are read: the checkpoint, the
    upcycling recipe (its keys and value types; ``num_experts`` required, ``1 <= top_k <=
    num_experts``) and the ``ModelConfig`` overrides (known fields, value types)."""
    import typing

    from moe_gen.config import _typed, unknown_keys
    from moe_gen.model import ModelConfig
    from moe_gen.pretrained import upcycle
    from moe_gen.registry import did_you_mean

    section = dict(_model_section(section))
    init = section.pop("init")
    if not isinstance(init, str) or not init.startswith("hf:") or len(init) == 3:
        raise ValueError(f"model.init must be 'hf:PATH' (a checkpoint folder, .gguf file, or a shipped "
                         f"checkpoint: hf:minilm, hf:smollm2, hf:whisper-tiny.en), got {init!r}")
    if "flavour" in section:
        raise ValueError("model.flavour and model.init exclude each other: the checkpoint sets the architecture")
    recipe = section.pop("upcycle", None)
    if recipe is not None and not isinstance(recipe, dict):
        raise ValueError(f"model.upcycle must be a mapping (num_experts, top_k, router, layers, ...), got {recipe!r}")
    for owner, values, hints in (("model.upcycle", recipe or {}, typing.get_type_hints(upcycle)),
                                 ("model", section, typing.get_type_hints(ModelConfig))):
        known = sorted(set(hints) - {"model", "seed", "return"})
        unknown = unknown_keys(owner, values, known)
        if unknown:
            raise ValueError(f"{owner}: unknown keys {unknown}{did_you_mean(unknown, known)}; "
                             f"known: {', '.join(known)}")
        for key, value in values.items():
            if owner == "model" and key == "moe" and isinstance(value, dict):
                continue  # MoE fields to change, as from_hf takes them (checked when the config is made)
            values[key] = _typed(owner, key, hints[key], value)
    config = _init_stand_in(section)
    if recipe is not None:
        if "num_experts" not in recipe:
            raise ValueError("model.upcycle needs num_experts (the experts each upcycled FFN becomes)")
        if not 1 <= recipe.get("top_k", 2) <= recipe["num_experts"]:
            raise ValueError(f"model.upcycle: top_k must be between 1 and num_experts ({recipe['num_experts']}), "
                             f"got {recipe.get('top_k', 2)}")
        _check_upcycle_names(recipe, config)
    return init, recipe, section


def _init_stand_in(section: dict):
    """The ``ModelConfig`` overrides beside ``model.init`` (typed), checked for ranges and names
    (``dropout: 2.0``, an unknown expert activation) on a stand-in before the checkpoint is read: the
    dense ``debug`` flavour ``from_hf`` starts from. Architecture fields are left out: the checkpoint's
    weights fix them, and ``from_hf`` refuses one that contradicts it."""
    from moe_gen.model import MoELayers, flavour
    from moe_gen.pretrained.hf import ARCHITECTURE

    base = flavour("debug").replace(location_frequencies=0)
    moe = section.get("moe") or {}
    moe = moe.to_dict() if isinstance(moe, MoELayers) else moe
    if moe.get("every") or moe.get("layers"):  # (the stand-in's blocks are not the checkpoint's)
        raise ValueError("model.moe: a checkpoint (model.init) loads as a dense model (moe every=0, no layers); make "
                         "MoE layers of its FFNs with model.upcycle (layers: all, every_other or block names)")
    moe = {**base.moe.to_dict(), "every": 0, **moe}
    config = base.replace(**{k: v for k, v in section.items() if k not in ARCHITECTURE and k != "moe"}, moe=moe)
    _check_names(config)
    return config


def _check_upcycle_names(recipe: dict, config) -> None:
    """``model.upcycle``'s router strategy (or ``model.moe.router``'s, which it keeps without one) and
    its ``layers``: a placement or block names (``encoder.blocks.1``), refused before any data is read."""
    from moe_gen.pretrained.upcycle import PLACEMENTS
    from moe_gen.registry import ROUTERS, did_you_mean

    key, strategy = ("model.upcycle.router", recipe["router"]) if recipe.get("router") is not None else \
        ("model.moe.router.strategy", config.moe.router.strategy)
    if strategy not in ROUTERS:
        raise ValueError(f"{key}: unknown router strategy {strategy!r}{did_you_mean([strategy], ROUTERS.list())}; "
                         f"known: {', '.join(ROUTERS.list())}")
    layers = recipe.get("layers", "all")
    names = [layers] if isinstance(layers, str) else layers
    block = re.compile(r"(encoder|decoder)\.blocks\.\d+(\.ffn)?")
    if not (isinstance(layers, str) and layers in PLACEMENTS) and not (
            isinstance(names, (list, tuple)) and names
            and all(isinstance(n, str) and block.fullmatch(n) for n in names)):
        raise ValueError(f"model.upcycle.layers must be {' or '.join(map(repr, PLACEMENTS))} or a list of block "
                         f"names such as 'encoder.blocks.1' or 'decoder.blocks.0', got {layers!r}")
