"""Model configuration and flavours (``debug``, ``tiny``, ``small``, ``base``).

    ModelConfig (widths, heads, layers, norms, positions, saved vocabularies)
        └─ MoELayers (which blocks get an MoE FFN, experts, top-k, RouterConfig, ExpertsConfig)
              └─ ModelConfig.moe_config() → the MoEConfig of each MoE layer

``moe.every``: 1 puts an MoE FFN in every block, 2 in every other block (the 2nd, 4th, ...),
0 makes the model dense. A dense model of the same *active* size (``ffn_hidden = top_k ·
expert_hidden``) is the same class with ``moe.every=0``: the baseline every benchmark compares to.
``config.with_moe(num_experts=8, router="attribute")`` changes MoE fields of a config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

from moe_gen.config import ConfigBase, ExpertsConfig, MoEConfig, RouterConfig, unknown_keys

__all__ = ["ModelConfig", "MoELayers", "flavour", "FLAVOURS"]

_TAG_VOCABULARY = ("num_modalities", "num_roles", "num_passes", "num_tasks")  # sizes every router shares

# ModelConfig keys of configurations saved before the MoE fields moved into ``ModelConfig.moe``
_FLAT_MOE_KEYS = {"num_experts": "num_experts", "top_k": "top_k", "expert_hidden": "expert_hidden",
                  "moe_every": "every", "moe_layers": "layers", "moe_attention": "attention", "router": "router",
                  "decoder_router": "decoder_router", "experts": "experts",
                  "capacity_factor": "capacity_factor", "backend": "backend"}


@dataclasses.dataclass(kw_only=True)
class MoELayers(ConfigBase):
    """The model's mixture-of-experts layers: which blocks get one, and how each is built.

    Attributes:
        num_experts, top_k: E experts, k of them per token.
        expert_hidden: hidden width of each expert.
        every: 0 dense, 1 every block, 2 every other block.
        layers: explicit MoE blocks by name (``"encoder.blocks.1"``, ``"decoder.blocks.0"``);
            when set it decides instead of ``every`` (``upcycle`` writes it for placements
            ``every`` cannot say).
        attention: also make the attention output projection a mixture of linear experts
            (Uni-Perceiver-MoE puts MoE in attention projections too).
        router: router settings for every MoE layer (strategy, gate, noise, losses); a strategy
            name stands for ``RouterConfig(strategy=name)``. Its tag vocabulary sizes are the
            model's (dense models read them too).
        decoder_router: ``RouterConfig`` fields the decoder's MoE layers set differently from
            ``router`` (``{"strategy": "hybrid"}``: tag-and-content routing where the decoder's few
            tag groups, about one per task, could not spread its load over the experts); empty:
            the decoder routes as ``router`` says. Tag vocabulary sizes always come from ``router``.
        experts: expert kind, activation and bias (also the dense FFNs' activation and bias); a
            kind name stands for ``ExpertsConfig(kind=name)``.
        capacity_factor: ``None`` dropless.
        backend: dispatch backend of every MoE layer (``merged`` for tag routing at inference).
    """

    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 64
    every: int = 1
    layers: tuple[str, ...] = ()
    attention: bool = False
    router: Union[RouterConfig, str] = dataclasses.field(default_factory=RouterConfig)
    decoder_router: dict = dataclasses.field(default_factory=dict)
    experts: Union[ExpertsConfig, str] = dataclasses.field(default_factory=ExpertsConfig)
    capacity_factor: Optional[float] = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        if isinstance(self.router, str):
            self.router = RouterConfig(strategy=self.router)
        elif isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)
        if isinstance(self.experts, str):
            self.experts = ExpertsConfig(kind=self.experts)
        elif isinstance(self.experts, dict):
            self.experts = ExpertsConfig.from_dict(self.experts)
        if isinstance(self.decoder_router, RouterConfig) and isinstance(self.router, RouterConfig):
            mine, base = self.decoder_router.to_dict(), self.router.to_dict()  # the fields where it differs
            self.decoder_router = {k: v for k, v in mine.items() if v != base[k] and k not in _TAG_VOCABULARY}
        self.check_types()  # after the shorthands above (a strategy name, a dict of fields) became configs
        for name in ("num_experts", "top_k", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoELayers.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoELayers.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.every not in (0, 1, 2):
            raise ValueError(f"MoELayers.every must be 0 (dense), 1 or 2, got {self.every}")
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
            raise ValueError(f"MoELayers.capacity_factor must be a finite number > 0 or None (dropless), got "
                             f"{self.capacity_factor}")
        # as JSON holds it (lists, not tuples), so a config equals itself read back from config.json
        self.decoder_router = _as_json(dict(self.decoder_router))
        self.router_for("decoder")  # unknown fields and bad values are refused here, not at build

    def router_for(self, stack: str = "encoder") -> RouterConfig:
        """The router settings of ``stack``'s MoE layers (``decoder_router`` applied to the decoder's)."""
        if stack != "decoder" or not self.decoder_router:
            return self.router
        fields = {f.name for f in dataclasses.fields(RouterConfig)}
        unknown = unknown_keys("MoELayers.decoder_router", self.decoder_router, fields)
        if unknown:
            from moe_gen.registry import did_you_mean

            raise ValueError(f"MoELayers.decoder_router names unknown router field(s) {', '.join(unknown)}"
                             f"{did_you_mean(unknown, fields)}; known: {', '.join(sorted(fields))}")
        fixed = sorted(set(self.decoder_router) & set(_TAG_VOCABULARY))
        if fixed:
            raise ValueError(f"MoELayers.decoder_router cannot set {', '.join(fixed)}: the tag vocabularies "
                             f"are the model's, set them on router")
        return RouterConfig.from_dict({**self.router.to_dict(), **self.decoder_router})


@dataclasses.dataclass(kw_only=True)
class ModelConfig(ConfigBase):
    """The generalist encoder-decoder.

    Attributes:
        d_model: width D.
        num_heads: attention heads.
        encoder_layers, decoder_layers: block counts.
        ffn_hidden: hidden width of dense FFNs.
        moe: the MoE layers (``MoELayers``: placement, experts, top-k, router, backend); a dict
            of its fields is accepted too. ``with_moe(**changes)`` changes some of them.
        positions: ``learned`` (an embedding added to every position) or ``rotary`` (rotary
            embeddings in self-attention); both count positions within each packed sample, and
            adapters add their own (2-D patch, frame) positions either way.
        max_positions: size of the learned position table.
        dropout: residual and attention dropout.
        vocab_size: set from the tokenizer.
        adapters: adapter name → feature width (set from the tasks when the model is built).
        frame_adapters: adapters whose rows are also decoder targets (they get frame and stop heads).
        predict_all_features: give every adapter a frame head (masked modeling predicts any modality).
        tasks: the task vocabulary (names in tag order).
        label_smoothing: for the token cross-entropy.
        layout: ``encoder-decoder`` (an encoder over the input slots, a decoder cross-attending to
            it) or ``decoder-only`` (a prefix LM: one stack reads the input slots as a prefix,
            then the targets causally; ``encoder_layers`` is unused).
        prefix_attention: in the decoder-only layout, whether prefix positions attend to each
            other ``bidirectional``-ly (a prefix LM) or ``causal``-ly (as a causal LM was
            pretrained).
        norm: ``layer`` (LayerNorm) or ``rms`` (RMSNorm); ``norm_eps`` its epsilon.
        norm_position: ``pre`` (x + f(norm(x))) or ``post`` (norm(x + f(x)), BERT).
        embedding_norm: a norm over the summed input embeddings (BERT).
        final_norm: a norm after each stack's last block (pre-norm models; BERT has none).
        num_kv_heads: key/value heads (grouped-query attention); ``None``: ``num_heads``.
        attention_bias: biases on the query, key/value and output projections.
        rotary_base: the rotary embeddings' base (Llama's ``rope_theta``).
        tie_embeddings: the output head is the token embedding (else a separate ``lm_head``).
        positions_on_features: add the learned position table at feature positions too (else
            only at token positions: adapters that carry their own positions, e.g. Whisper's
            audio stem, get nothing added).
        location_frequencies: ``F > 0`` gives every location token ``<bin_k>`` a smooth component of
            its embedding (input and tied output): a learned projection of the Fourier features
            ``sin/cos(2^j·π·u)``, ``j < F``, of its coordinate ``u = k / (num_bins - 1)``, added to the
            token's own row, so that neighbouring coordinates start alike and what is learned for
            one bin carries to its neighbours. ``0`` (the default of a bare ``ModelConfig`` and of
            models saved before it existed): independent rows only. The flavours use 8; on the
            quality suite it lifts visual grounding from 0.14 to 0.35 IoU accuracy (README).
        modalities: the modality tag vocabulary in id order (built-in names, then modalities
            registered when the model was built), saved so that a process registering other
            modalities still tags this model's tokens with the ids it was trained on. Empty in
            models saved before it was kept: the process's vocabulary is used.
        image_tokenizers: ``"task/preprocessor"`` → the ``VQConfig`` fields of the image tokenizer
            that task's image-code slots use (``preprocess=image_vq``); the model keeps a frozen copy of each
            (``GeneralistModel.image_tokenizers``, saved with its weights), so it encodes and
            decodes those images as it was trained, wherever the tokenizer file went.
        preprocessor_statistics: task name → preprocessor name → slot column (``"slot N"`` for a
            slot filled by position) → what that preprocessor learned from the task's training
            rows when the model met the task (``Task.fit_statistics``; e.g. the STRUCT cell
            encoding's column ids, means, stds and text vocabularies), and under ``"closed_sets"``
            the label sets of its closed-set slots. JSON-serialisable, saved with the model, and
            used to encode the task and decode its closed sets in training and at inference,
            whatever rows (or none) a later ``Task`` object holds.
    """

    d_model: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_hidden: int = 128
    moe: MoELayers = dataclasses.field(default_factory=MoELayers)
    positions: str = "learned"
    max_positions: int = 1024
    dropout: float = 0.0
    vocab_size: int = 0
    adapters: dict = dataclasses.field(default_factory=dict)
    frame_adapters: tuple[str, ...] = ()
    predict_all_features: bool = False
    tasks: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    label_smoothing: float = 0.0
    layout: str = "encoder-decoder"
    prefix_attention: str = "bidirectional"
    norm: str = "layer"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    embedding_norm: bool = False
    final_norm: bool = True
    num_kv_heads: Optional[int] = None
    attention_bias: bool = True
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    positions_on_features: bool = True
    location_frequencies: int = 0
    image_tokenizers: dict = dataclasses.field(default_factory=dict)
    preprocessor_statistics: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._read_moe()
        self.check_types()  # "false" for a bool, "64" for an int: named here, before any comparison below
        for name in ("d_model", "num_heads", "ffn_hidden", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_layers", "decoder_layers", "location_frequencies"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"ModelConfig dropout and label_smoothing must be in [0, 1), got "
                             f"{self.dropout} and {self.label_smoothing}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError("rotary positions need an even head width")
        for name, allowed in (("layout", ("encoder-decoder", "decoder-only")),
                              ("prefix_attention", ("bidirectional", "causal")),
                              ("norm", ("layer", "rms")), ("norm_position", ("pre", "post"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must be >= 1 and divide num_heads={self.num_heads}")
        if not 0 < self.norm_eps < math.inf:  # (inf normalised every hidden state to zero)
            raise ValueError(f"ModelConfig.norm_eps must be a finite number > 0, got {self.norm_eps}")
        self._check_moe_layers()
        self._check_shapes()

    def _read_moe(self) -> None:
        """``moe`` as a ``MoELayers``: a dict of its fields is built into one (unknown keys refused)."""
        if isinstance(self.moe, dict):
            known = sorted(f.name for f in dataclasses.fields(MoELayers))
            unknown = unknown_keys("ModelConfig.moe", self.moe, known)
            if unknown:
                from moe_gen.registry import did_you_mean

                raise ValueError(f"unknown MoELayers keys {unknown}{did_you_mean(unknown, known)}; "
                                 f"known: {', '.join(known)}")
            self.moe = MoELayers(**self.moe)
        elif not isinstance(self.moe, MoELayers):
            raise ValueError(f"ModelConfig.moe must be a MoELayers (or a dict of its fields), got "
                             f"{type(self.moe).__name__}")

    def _check_shapes(self) -> None:
        """What the blocks need to be able to run and to see their input."""
        if self.decoder_layers < 1:  # no decoder block: no cross-attention, nor attention to the prefix
            raise ValueError("ModelConfig.decoder_layers must be >= 1: without a decoder block the answer cannot "
                             "see the input")
        if not (math.isfinite(self.rotary_base) and self.rotary_base > 0):
            raise ValueError(f"ModelConfig.rotary_base must be a finite number > 0, got {self.rotary_base}")
        if self.moe.experts.kind == "linear":  # a linear FFN outputs its hidden width, which the residual adds
            widths = {"moe.expert_hidden": self.moe.expert_hidden} if (self.moe.every or self.moe.layers) else {}
            widths.update({"ffn_hidden": self.ffn_hidden} if self._has_dense_blocks() else {})
            wrong = {name: width for name, width in widths.items() if width != self.d_model}
            if wrong:
                raise ValueError(f"linear experts as FFNs output their hidden width, which must be d_model="
                                 f"{self.d_model}; got {wrong}")

    def _has_dense_blocks(self) -> bool:
        """Whether some block has a dense FFN (``ffn_hidden`` wide)."""
        stacks = (("encoder", 0 if self.decoder_only else self.encoder_layers), ("decoder", self.decoder_layers))
        return any(not self.is_moe(i, stack) for stack, n in stacks for i in range(n))

    def _check_moe_layers(self) -> None:
        for name in self.moe.layers:
            stack, _, index = name.rpartition(".blocks.")
            layers = {"encoder": 0 if self.decoder_only else self.encoder_layers,
                      "decoder": self.decoder_layers}.get(stack)
            if layers is None or not index.isdigit() or int(index) >= layers:
                raise ValueError(f"ModelConfig.moe.layers names {name!r}, which is not a block of this model "
                                 f"(encoder.blocks.0..{self.encoder_layers - 1}, "
                                 f"decoder.blocks.0..{self.decoder_layers - 1})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """``ConfigBase.from_dict``; configurations saved before the MoE fields moved into ``moe``
        (flat ``num_experts``, ``moe_every``, ``router``, ...) are read into ``moe``."""
        return super().from_dict(nest_flat_moe_keys(data) if isinstance(data, dict) else data)

    def with_moe(self, **changes: Any) -> "ModelConfig":
        """A copy with some ``MoELayers`` fields changed: ``config.with_moe(num_experts=8)``."""
        return self.replace(moe=self.moe.replace(**changes))

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads``, or ``num_heads`` without grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

    @property
    def decoder_only(self) -> bool:
        return self.layout == "decoder-only"

    def is_moe(self, layer: int, stack: str = "encoder") -> bool:
        """Whether block ``layer`` (0-based) of ``stack`` (``encoder``/``decoder``) has an MoE FFN."""
        if self.moe.layers:
            return f"{stack}.blocks.{layer}" in self.moe.layers
        return self.moe.every == 1 or (self.moe.every == 2 and layer % 2 == 1)

    def moe_config(self, d_hidden: Optional[int] = None, kind: Optional[str] = None,
                   stack: str = "encoder") -> MoEConfig:
        """The ``MoEConfig`` of an MoE layer in ``stack`` (``kind``: the expert kind, ``linear``
        for attention output projections)."""
        moe = self.moe
        experts = moe.experts if kind is None else dataclasses.replace(moe.experts, kind=kind)
        return MoEConfig(d_model=self.d_model, d_hidden=d_hidden or moe.expert_hidden,
                         num_experts=moe.num_experts, top_k=moe.top_k, router=moe.router_for(stack),
                         experts=experts, capacity_factor=moe.capacity_factor, backend=moe.backend)

    def dense_twin(self) -> "ModelConfig":
        """The dense model with the same active parameters per token: FFN hidden = k · expert hidden
        (plus the shared expert's width, where there is one); a dense config is its own twin. The
        MoE model keeps its routers and k − 1 more output biases per MoE layer, and with routed
        attention projections (``moe.attention``) k − 1 more projections per block: those the twin
        cannot match. Refuses MoE layers beside dense blocks of another width (one FFN width)."""
        moe = self.moe
        if not (moe.every or moe.layers):
            return self
        width = moe.top_k * moe.expert_hidden
        if moe.experts.shared_expert:
            width += moe.experts.shared_hidden or moe.expert_hidden
        if self._has_dense_blocks() and self.ffn_hidden != width:
            raise ValueError(f"dense_twin: the dense blocks' ffn_hidden={self.ffn_hidden} differs from the MoE "
                             f"blocks' active width {width}; one dense width cannot match both")
        return self.replace(moe=moe.replace(every=0, layers=(), attention=False), ffn_hidden=width)


def _as_json(value: Any) -> Any:
    """``value`` with its tuples, at any depth, as lists (what JSON gives back)."""
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    return value


def nest_flat_moe_keys(data: dict) -> dict:
    """``data`` (``ModelConfig`` fields) with the keys of configurations written before the MoE fields
    moved into ``moe`` (flat ``num_experts``, ``moe_every``, ``router``, ...: ``_FLAT_MOE_KEYS``) moved
    there under their new names; a mapping merges into the one ``moe`` holds key by key, and a flat key
    wins over the field it names. ``ModelConfig.from_dict`` and the command line's run files read them so."""
    if not set(data) & set(_FLAT_MOE_KEYS):
        return data
    data = dict(data)
    moe = data.pop("moe", None) or {}
    moe = moe.to_dict() if isinstance(moe, MoELayers) else moe
    if not isinstance(moe, dict):
        raise ValueError(f"ModelConfig.moe must be a MoELayers (or a dict of its fields), got {type(moe).__name__}")
    moe = dict(moe)
    for old, new in _FLAT_MOE_KEYS.items():
        if old in data:
            value = data.pop(old)
            moe[new] = {**moe[new], **value} if isinstance(value, dict) and isinstance(moe.get(new), dict) else value
    data["moe"] = moe
    return data


FLAVOURS = {
    "debug": dict(d_model=64, num_heads=4, encoder_layers=2, decoder_layers=2, ffn_hidden=128, location_frequencies=8,
                  moe=dict(expert_hidden=64, num_experts=4, top_k=2)),
    "tiny": dict(d_model=128, num_heads=4, encoder_layers=4, decoder_layers=2, ffn_hidden=512, location_frequencies=8,
                 moe=dict(expert_hidden=256, num_experts=8, top_k=2, every=2)),
    "small": dict(d_model=256, num_heads=8, encoder_layers=6, decoder_layers=4, ffn_hidden=1024, location_frequencies=8,
                  moe=dict(expert_hidden=512, num_experts=8, top_k=2, every=2)),
    "base": dict(d_model=512, num_heads=8, encoder_layers=12, decoder_layers=6, ffn_hidden=2048, location_frequencies=8,
                 moe=dict(expert_hidden=1024, num_experts=16, top_k=2, every=2)),
}


def flavour(name: str, **overrides) -> ModelConfig:
    """A named model flavour, with ``ModelConfig`` fields overridden; ``moe`` may be a dict of the
    ``MoELayers`` fields to change (``flavour("debug", moe={"router": "attribute"})``) or a whole
    ``MoELayers``."""
    if not isinstance(name, str):
        raise ValueError(f"a model flavour is a name ({', '.join(FLAVOURS)}), got {name!r}")
    if name not in FLAVOURS:
        from moe_gen.registry import did_you_mean

        raise ValueError(f"unknown model flavour {name!r}{did_you_mean([name], FLAVOURS)}; "
                         f"known: {', '.join(FLAVOURS)}")
    fields = {**FLAVOURS[name], **overrides}
    if isinstance(overrides.get("moe"), dict):
        fields["moe"] = {**FLAVOURS[name]["moe"], **overrides["moe"]}
    return ModelConfig(**fields)
