"""Dense Hugging Face checkpoints loaded into moe_gen's own transformer.

The weights are copied into moe_gen's blocks, not wrapped: every FFN stays a moe_gen module that
``upcycle`` can turn into a tag-routed MoE, and the tags reach every layer as in a model trained
from scratch. Three families, each general over its sizes:

    family   layout            blocks                                        positions
    bert     encoder-decoder   post-norm LayerNorm, GELU MLP, biases         learned (+ token type 0)
             (the decoder is new, trained from scratch)
    llama    decoder-only      pre-norm RMSNorm, SwiGLU, no biases, GQA      rotary (rope_theta)
             (a prefix LM; ``prefix_attention="causal"`` by default, as pretrained)
    whisper  encoder-decoder   pre-norm LayerNorm, GELU MLP, biases          conv stem + sinusoidal
                                                                             (encoder), learned (decoder)

``from_hf(source, tasks)`` reads a checkpoint (a transformers model, a folder with
``config.json`` and safetensors weights, a ``.gguf`` file, or a CTranslate2 Whisper folder),
builds a ``GeneralistModel`` for ``tasks`` with the checkpoint's tokenizer extended by moe_gen's
own tokens, and copies the weights. The modality embedding starts at zero and token-type 0 is
folded into the position table, so the converted model computes what the checkpoint computes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from moe_gen.config import ExpertsConfig
from moe_gen.model.config import ModelConfig, flavour

__all__ = ["HFCheckpoint", "read_checkpoint", "dense_config", "load_weights", "from_hf", "FAMILIES"]

FAMILIES = ("bert", "llama", "whisper")
_MODEL_TYPES = {"bert": "bert", "llama": "llama", "whisper": "whisper"}


@dataclasses.dataclass
class HFCheckpoint:
    """A dense checkpoint as read from disk or from a transformers model.

    Attributes:
        family: ``bert``, ``llama`` or ``whisper``.
        config: the transformers configuration object.
        weights: parameter name → tensor, names as the family's base model has them (no
            ``bert.`` / ``model.`` prefix; Llama's untied head as ``lm_head.weight``).
        tokenizer: the checkpoint's transformers tokenizer (None when ``read_checkpoint`` was
            given a model object without one).
        source: where it came from (for messages).
    """

    family: str
    config: Any
    weights: dict[str, torch.Tensor]
    tokenizer: Any
    source: str


def _family(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"checkpoint model_type {model_type!r} is not a family moe_gen converts "
                         f"({', '.join(FAMILIES)}: BERT-style encoders, Llama-style decoders, Whisper)")
    return _MODEL_TYPES[model_type]


def _strip(weights: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Names relative to the base model (``BertModel``, ``LlamaModel``, ``WhisperModel``)."""
    prefixes = {"bert": ("bert.",), "llama": ("model.",), "whisper": ("model.",)}[family]
    out = {}
    for name, value in weights.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value.detach().float()
    return out


def read_checkpoint(source, *, gguf_file: Optional[str] = None) -> HFCheckpoint:
    """Reads a dense checkpoint.

    Args:
        source: a transformers ``PreTrainedModel``; a folder with ``config.json`` and weights
            (``AutoModel.from_pretrained`` reads it, offline); a ``.gguf`` file (transformers
            dequantises it; needs the ``gguf`` package); or a CTranslate2 Whisper folder
            (``model.bin``).
        gguf_file: the GGUF file inside folder ``source`` (or give the file as ``source``).
    """
    from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        family = _family(source.config)
        return HFCheckpoint(family, source.config, _strip(source.state_dict(), family), None,
                            type(source).__name__)
    path = os.fspath(source)
    if path.endswith(".gguf") and gguf_file is None:
        path, gguf_file = os.path.dirname(path) or ".", os.path.basename(path)
    if not os.path.exists(path):
        from moe_gen.pretrained.checkpoints import CHECKPOINTS

        raise ValueError(f"checkpoint {path} does not exist (a folder or .gguf file; shipped checkpoints are "
                         f"named hf:{', hf:'.join(CHECKPOINTS)} on the command line, "
                         "moe_gen.pretrained.locate(name) from Python)")
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        raise ValueError(f"checkpoint {os.path.join(path, gguf_file)} does not exist")
    if gguf_file is not None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
        except ImportError as exc:
            raise ImportError(f"reading {gguf_file} needs the gguf and accelerate packages: "
                              f"pip install -e '.[pretrained]' ({exc})") from None
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        family = _family(model.config)
        return HFCheckpoint(family, model.config, _strip(model.state_dict(), family), tokenizer,
                            os.path.join(path, gguf_file))
    if os.path.isfile(os.path.join(path, "model.bin")) and not os.path.isfile(os.path.join(path, "model.safetensors")):
        from moe_gen.pretrained.ctranslate2 import load_whisper

        model, tokenizer, _ = load_whisper(path)
        return HFCheckpoint("whisper", model.config, _strip(model.state_dict(), "whisper"), tokenizer, path)
    _check_checkpoint_folder(path)
    config = AutoConfig.from_pretrained(path)
    family = _family(config)
    weights = _read_weights(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return HFCheckpoint(family, config, _strip(weights, family), tokenizer, path)


def _check_checkpoint_folder(path: str) -> None:
    """Refuses a folder that is not a transformers checkpoint, naming what it is instead."""
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = f"; pass the GGUF file itself ({os.path.join(path, ggufs[0])}) or gguf_file=" if ggufs else ""
        raise ValueError(f"{path} holds no config.json (nor a CTranslate2 model.bin): not a checkpoint folder{hint}")
    if _is_moe_gen_config(os.path.join(path, "config.json")):
        raise ValueError(f"{path} is a moe_gen model folder (save_pretrained's): load it with "
                         "GeneralistModel.from_pretrained, not from_hf")


def _is_moe_gen_config(config_path: str) -> bool:
    """Whether ``config_path`` is a moe_gen ``ModelConfig`` (its fields; no transformers ``model_type``)."""
    import json

    try:
        with open(config_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" not in data and {"d_model", "moe"} <= set(data)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(os.path.join(path, name)))
    return _legacy_names(weights, path)


# Names of checkpoints ported from TensorFlow (bert-base-cased's LayerNorm.gamma / .beta), renamed on
# load as transformers' "legacy" conversion rule does (conversion_mapping.py; as a regex there, ending
# on a name boundary). The rule's other entries (weight-norm ``.weight_g`` / ``.weight_v``, audio-LM
# ``model.language_model``) name modules no family moe_gen converts has.
_LEGACY_NAMES = ((re.compile(r"LayerNorm\.gamma(?!\w)"), "LayerNorm.weight"),
                 (re.compile(r"LayerNorm\.beta(?!\w)"), "LayerNorm.bias"))


def _legacy_names(weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``weights`` with legacy names renamed; refuses a folder holding a weight under both names."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, value in weights.items():
        new = name
        for pattern, replacement in _LEGACY_NAMES:
            new = pattern.sub(replacement, new)
        if new in out:
            raise ValueError(f"{path}: weights {origin[new]} and {name} are both {new} (one of them under its "
                             "legacy name)")
        out[new], origin[new] = value, name
    return out


# ModelConfig fields a checkpoint's weights fix (an override must agree with the checkpoint)
ARCHITECTURE = frozenset({
    "d_model", "num_heads", "encoder_layers", "decoder_layers", "ffn_hidden", "positions", "max_positions",
    "layout", "prefix_attention", "norm", "norm_eps", "norm_position", "embedding_norm", "final_norm",
    "num_kv_heads", "attention_bias", "rotary_base", "tie_embeddings", "positions_on_features"})


def dense_config(checkpoint: HFCheckpoint, *, decoder_layers: Optional[int] = None, **overrides) -> ModelConfig:
    """The dense ``ModelConfig`` of the checkpoint's architecture (``moe.every=0``); ``overrides`` replace
    fields the weights do not fix (``ARCHITECTURE`` fields and the kind, activation and bias of ``moe.experts``
    must agree with the checkpoint), ``moe`` being a dict of the ``MoELayers`` fields to change (``decoder_layers``
    sizes BERT's new decoder: 2 by default; other families' must be the checkpoint's)."""
    c = checkpoint.config
    if checkpoint.family == "bert":
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{checkpoint.source}: BERT position_embedding_type "
                             f"{c.position_embedding_type!r} is not supported (absolute only)")
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
        fields = dict(
            d_model=c.hidden_size, num_heads=c.num_attention_heads, encoder_layers=c.num_hidden_layers,
            decoder_layers=2 if decoder_layers is None else decoder_layers, ffn_hidden=c.intermediate_size,
            positions="learned",
            max_positions=c.max_position_embeddings, norm="layer", norm_eps=c.layer_norm_eps,
            norm_position="post", embedding_norm=True, final_norm=False,
            moe=dict(expert_hidden=c.intermediate_size, every=0, experts=ExpertsConfig(
                kind="mlp", activation=_activation(act, c.hidden_act, checkpoint), bias=True)))
    elif checkpoint.family == "llama":
        rope = getattr(c, "rope_scaling", None) or getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{checkpoint.source}: rope scaling {rope} is not supported (plain rotary only)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head_dim * c.num_attention_heads != c.hidden_size:
            raise ValueError(f"{checkpoint.source}: head_dim {head_dim} x {c.num_attention_heads} heads != "
                             f"hidden size {c.hidden_size} (moe_gen's attention needs them equal)")
        if getattr(c, "mlp_bias", False):
            raise ValueError(f"{checkpoint.source}: mlp_bias=True is not supported")
        fields = dict(
            layout="decoder-only", prefix_attention="causal", d_model=c.hidden_size,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, encoder_layers=0,
            decoder_layers=c.num_hidden_layers, ffn_hidden=c.intermediate_size,
            positions="rotary", rotary_base=float(_rope_theta(c)), norm="rms", norm_eps=c.rms_norm_eps,
            attention_bias=bool(getattr(c, "attention_bias", False)), tie_embeddings=bool(c.tie_word_embeddings),
            moe=dict(expert_hidden=c.intermediate_size, every=0, experts=ExpertsConfig(
                kind="glu", activation=_activation({"silu": "silu"}, c.hidden_act, checkpoint), bias=False)))
    else:  # whisper
        fields = dict(
            d_model=c.d_model, num_heads=c.encoder_attention_heads, encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers, ffn_hidden=c.encoder_ffn_dim,
            positions="learned", max_positions=c.max_target_positions, norm="layer",
            norm_eps=1e-5, positions_on_features=False,
            moe=dict(expert_hidden=c.encoder_ffn_dim, every=0, experts=ExpertsConfig(
                kind="mlp", activation=_activation({"gelu": "gelu"}, c.activation_function, checkpoint), bias=True)))
        if c.decoder_attention_heads != c.encoder_attention_heads or c.decoder_ffn_dim != c.encoder_ffn_dim:
            raise ValueError(f"{checkpoint.source}: encoder and decoder differ in heads or FFN width")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown ModelConfig keys {sorted(set(overrides) - known)} (MoE settings go in "
                         f"moe={{...}}); known: {', '.join(sorted(known))}")
    # no location features unless asked for: a random projection added to the output rows would
    # outweigh the checkpoint's own logits until trained (greedy Whisper then writes <bin_k>)
    base = flavour("debug").replace(location_frequencies=0)
    if checkpoint.family != "bert" and decoder_layers is not None:
        overrides["decoder_layers"] = decoder_layers  # BERT's decoder is new; the others' are the checkpoint's
    _refuse_contradictions(checkpoint, {**dataclasses.asdict(base), **fields}, overrides)
    moe = _dense_moe(checkpoint, fields.pop("moe"), overrides.pop("moe", None) or {})
    fields.update(overrides)
    return base.replace(**fields, moe={**base.moe.to_dict(), **moe})  # ModelConfig names unknown moe keys


def _dense_moe(checkpoint: HFCheckpoint, implied: dict, moe: dict) -> dict:
    """The MoE fields of a loaded checkpoint's config (``implied``, the family's) with ``moe`` changed:
    refused where they would make MoE layers (the dense weights then met an MoE layer: AttributeError
    'fc_in') or change the dense FFNs' computation."""
    if moe.get("every") or moe.get("layers"):
        raise ValueError(f"{checkpoint.source}: a checkpoint loads as a dense model (moe every=0, no layers); "
                         "make MoE layers of its FFNs with moe_gen.pretrained.upcycle(model, num_experts=..., "
                         "layers=...) after loading (model.upcycle on the command line)")
    if "experts" in moe:
        moe = {**moe, "experts": _dense_experts(checkpoint, implied["experts"], moe["experts"])}
    return {**implied, **moe}


# ExpertsConfig fields the dense FFNs are built with (DenseFFN: kind, activation, bias); the shared-expert
# fields only shape MoE layers, which upcycle builds from the dense FFNs
_DENSE_EXPERTS = ("kind", "activation", "bias")


def _dense_experts(checkpoint: HFCheckpoint, implied: ExpertsConfig, experts: Any) -> Any:
    """An override of ``moe.experts``: a dict (or a kind name) changes those fields of the family's
    ``implied`` experts; a kind, activation or bias other than the checkpoint's is refused."""
    if isinstance(experts, str):
        experts = {"kind": experts}
    if isinstance(experts, dict):
        experts = ExpertsConfig.from_dict({**implied.to_dict(), **experts})
    if not isinstance(experts, ExpertsConfig):
        return experts  # MoELayers names the wrong type
    for key in _DENSE_EXPERTS:
        if getattr(experts, key) != getattr(implied, key):
            raise ValueError(f"{checkpoint.source}: moe.experts.{key}={getattr(experts, key)!r} contradicts the "
                             f"checkpoint, whose weights fix moe.experts.{key}={getattr(implied, key)!r} (the dense "
                             "FFNs compute with the checkpoint's kind, activation and bias)")
    return experts


def _refuse_contradictions(checkpoint: HFCheckpoint, implied: dict, overrides: dict) -> None:
    """Refuses overrides of ``ARCHITECTURE`` fields that differ from the checkpoint's (``implied``)."""
    for key in sorted(ARCHITECTURE & set(overrides)):
        if overrides[key] != implied[key]:
            raise ValueError(f"{checkpoint.source}: {key}={overrides[key]!r} contradicts the checkpoint, whose weights "
                             f"fix {key}={implied[key]!r} (architecture fields cannot be overridden)")


def _rope_theta(c) -> float:
    theta = getattr(c, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it with the scaling settings
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", 10000.0)
    return theta


def _activation(table: dict, name: str, checkpoint: HFCheckpoint) -> str:
    if name not in table:
        raise ValueError(f"{checkpoint.source}: activation {name!r} is not supported for {checkpoint.family} "
                         f"(supported: {', '.join(table)})")
    return table[name]


# ---- weight copying ------------------------------------------------------------------------------


def _set(param: Optional[nn.Parameter], value: torch.Tensor, name: str) -> None:
    if param is None:
        raise ValueError(f"the model has no parameter for checkpoint weight {name}")
    if param.shape != value.shape:
        raise ValueError(f"checkpoint weight {name} has shape {tuple(value.shape)}, the model's "
                         f"parameter {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


class _Weights:
    """The checkpoint's weights, each consumed once (``unused`` lists what was not copied)."""

    def __init__(self, weights: dict[str, torch.Tensor], source: str) -> None:
        self.weights, self.source, self.used = weights, source, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise ValueError(f"{self.source}: weight {name} is missing")
        self.used.add(name)
        return self.weights[name]

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self(name) if name in self.weights else None

    def unused(self) -> list[str]:
        return sorted(set(self.weights) - self.used)


def _linear(module: nn.Linear, w: _Weights, prefix: str, bias: bool = True) -> None:
    _set(module.weight, w(f"{prefix}.weight"), f"{prefix}.weight")
    if bias and module.bias is not None:
        _set(module.bias, w(f"{prefix}.bias"), f"{prefix}.bias")


def _norm(module: nn.Module, w: _Weights, prefix: str, weight: str = "weight", bias: str = "bias") -> None:
    _set(module.weight, w(f"{prefix}.{weight}"), f"{prefix}.{weight}")
    if getattr(module, "bias", None) is not None:
        _set(module.bias, w(f"{prefix}.{bias}"), f"{prefix}.{bias}")


def _fused_kv(attn, w: _Weights, k: str, v: str, bias: bool) -> None:
    """Keys and values into moe_gen's fused ``kv`` projection (a missing key bias is zero:
    Whisper's key projection has none)."""
    _set(attn.kv.weight, torch.cat([w(f"{k}.weight"), w(f"{v}.weight")]), f"{k}+{v}.weight")
    if bias and attn.kv.bias is not None:
        v_bias = w(f"{v}.bias")
        k_bias = w.get(f"{k}.bias")
        _set(attn.kv.bias, torch.cat([torch.zeros_like(v_bias) if k_bias is None else k_bias, v_bias]),
             f"{k}+{v}.bias")


def _ffn(ffn, w: _Weights, fc_in: Sequence[str], fc_out: str, bias: bool) -> None:
    _set(ffn.fc_in.weight, torch.cat([w(f"{n}.weight") for n in fc_in]), "+".join(fc_in))
    if bias:
        _set(ffn.fc_in.bias, torch.cat([w(f"{n}.bias") for n in fc_in]), "+".join(fc_in) + ".bias")
    _linear(ffn.fc_out, w, fc_out, bias)


def _token_rows(model, w: _Weights, name: str) -> None:
    """The checkpoint's vocabulary rows; the rows of moe_gen's added tokens start at their mean.
    Rows past the tokenizer's own vocabulary (Whisper pads its table to 51864 rows for 50363
    tokens) are left out: moe_gen's tokens take those ids."""
    rows = w(name)
    own = getattr(model.tokenizer, "base_vocab_size", None)
    if own is None or own > rows.shape[0]:
        held = "is not a checkpoint's (HFTokenizer)" if own is None else f"has {own} tokens of its own"
        raise ValueError(f"checkpoint {name} has {rows.shape[0]} rows but the tokenizer {held}: use the "
                         "checkpoint's tokenizer (HFTokenizer.from_pretrained of the checkpoint)")
    rows = rows[:own]
    table = model.token_embedding.weight
    if rows.shape[1] != table.shape[1]:
        raise ValueError(f"checkpoint {name} has width {rows.shape[1]}, the model {table.shape[1]}")
    from moe_gen.tasks.hf_tokenizer import resize_token_rows

    _set(table, resize_token_rows(rows, table.shape[0]), name)


def load_weights(model, checkpoint: HFCheckpoint) -> list[str]:
    """Copies the checkpoint into ``model`` (built from ``dense_config(checkpoint)``); returns
    the checkpoint weights it had no place for (e.g. BERT's pooler). The modality embedding is
    zeroed so the model computes what the checkpoint computes."""
    w = _Weights(checkpoint.weights, checkpoint.source)
    with torch.no_grad():
        model.modality_embedding.weight.zero_()
    {"bert": _load_bert, "llama": _load_llama, "whisper": _load_whisper}[checkpoint.family](model, w, checkpoint.config)
    return w.unused()


def _load_bert(model, w: _Weights, c) -> None:
    _token_rows(model, w, "embeddings.word_embeddings.weight")
    positions, types = w("embeddings.position_embeddings.weight"), w("embeddings.token_type_embeddings.weight")
    if types.dim() != 2 or types.shape[1:] != positions.shape[1:]:
        raise ValueError(f"checkpoint weight embeddings.token_type_embeddings.weight has shape {tuple(types.shape)}; "
                         f"its rows must be as wide as embeddings.position_embeddings.weight's "
                         f"{tuple(positions.shape)}")
    positions = positions + types[0]
    _set(model.position_embedding.weight, positions, "embeddings.position_embeddings+token_type_embeddings[0]")
    _norm(model.embedding_norm, w, "embeddings.LayerNorm")
    for i, block in enumerate(model.encoder.blocks):
        p = f"encoder.layer.{i}"
        attn = block.self_attn
        _linear(attn.q, w, f"{p}.attention.self.query")
        _fused_kv(attn, w, f"{p}.attention.self.key", f"{p}.attention.self.value", bias=True)
        _linear(attn.out, w, f"{p}.attention.output.dense")
        _norm(block.norm_self, w, f"{p}.attention.output.LayerNorm")
        _ffn(block.ffn, w, [f"{p}.intermediate.dense"], f"{p}.output.dense", bias=True)
        _norm(block.norm_ffn, w, f"{p}.output.LayerNorm")


def _load_llama(model, w: _Weights, c) -> None:
    _token_rows(model, w, "embed_tokens.weight")
    bias = bool(getattr(c, "attention_bias", False))
    for i, block in enumerate(model.decoder.blocks):
        p = f"layers.{i}"
        attn = block.self_attn
        _linear(attn.q, w, f"{p}.self_attn.q_proj", bias)
        _fused_kv(attn, w, f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj", bias)
        _linear(attn.out, w, f"{p}.self_attn.o_proj", bias)
        _norm(block.norm_self, w, f"{p}.input_layernorm")
        _ffn(block.ffn, w, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.down_proj", bias=False)
        _norm(block.norm_ffn, w, f"{p}.post_attention_layernorm")
    _norm(model.decoder.norm, w, "norm")
    if model.lm_head is not None:
        head = w("lm_head.weight")[:model.tokenizer.base_vocab_size]  # checked by _token_rows
        from moe_gen.tasks.hf_tokenizer import resize_token_rows

        _set(model.lm_head.weight, resize_token_rows(head, model.lm_head.weight.shape[0]), "lm_head.weight")
    else:
        w.get("lm_head.weight")  # tied: the same tensor as embed_tokens


def _load_whisper_attention(attn, w: _Weights, p: str, q: str = "q_proj") -> None:
    _linear(attn.q, w, f"{p}.{q}")
    _fused_kv(attn, w, f"{p}.k_proj", f"{p}.v_proj", bias=True)
    _linear(attn.out, w, f"{p}.out_proj")


def _load_whisper(model, w: _Weights, c) -> None:
    stem = model.adapters["whisper_conv"] if "whisper_conv" in model.adapters else None
    if stem is not None:
        stem.load_checkpoint(w)
    else:  # a generalist without a Whisper audio slot keeps only the transformer
        for name in list(w.weights):
            if name.startswith("encoder.conv") or name == "encoder.embed_positions.weight":
                w.used.add(name)
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, block in enumerate(stack.blocks):
            p = f"{side}.layers.{i}"
            _load_whisper_attention(block.self_attn, w, f"{p}.self_attn")
            _norm(block.norm_self, w, f"{p}.self_attn_layer_norm")
            if side == "decoder":
                _load_whisper_attention(block.cross_attn, w, f"{p}.encoder_attn")
                _norm(block.norm_cross, w, f"{p}.encoder_attn_layer_norm")
            _ffn(block.ffn, w, [f"{p}.fc1"], f"{p}.fc2", bias=True)
            _norm(block.norm_ffn, w, f"{p}.final_layer_norm")
        _norm(stack.norm, w, f"{side}.layer_norm")
    _token_rows(model, w, "decoder.embed_tokens.weight")
    table = w("decoder.embed_positions.weight")
    _set(model.position_embedding.weight, table, "decoder.embed_positions.weight")
    w.get("proj_out.weight")  # tied to the token embedding


def from_hf(source, tasks: Sequence = (), *, tokenizer=None, gguf_file: Optional[str] = None,
            decoder_layers: Optional[int] = None, **overrides):
    """A ``GeneralistModel`` for ``tasks`` initialised from a dense checkpoint.

    Args:
        source: see ``read_checkpoint`` (a model object, a folder, a ``.gguf`` file, a shipped
            checkpoint's name: ``"minilm"``, ``"smollm2"``, ``"whisper-tiny.en"``).
        tasks: ``Task`` objects (their feature slots get adapters; they must be encoded with the
            returned model's tokenizer: the checkpoint's).
        tokenizer: an ``HFTokenizer`` (default: the checkpoint's, extended with moe_gen's tokens).
        decoder_layers: BERT's new decoder depth (other families keep theirs).
        overrides: ``ModelConfig`` fields (dropout, ``moe``: a dict of ``MoELayers`` fields, ...).
            Architecture fields (``ARCHITECTURE``) and an FFN kind, activation or bias
            (``moe.experts``) that contradict the checkpoint are refused.

    Returns:
        The dense model (``upcycle`` turns its FFNs into MoE layers); its ``pretrained_unused``
        lists the checkpoint weights it has no place for (BERT's sentence pooler).
    """
    from moe_gen.model.model import GeneralistModel
    from moe_gen.pretrained.checkpoints import CHECKPOINTS, locate
    from moe_gen.tasks.hf_tokenizer import HFTokenizer

    if isinstance(source, str) and source in CHECKPOINTS:
        source = locate(source)
    checkpoint = read_checkpoint(source, gguf_file=gguf_file)
    if tokenizer is None:
        if checkpoint.tokenizer is None:
            raise ValueError("the checkpoint came without a tokenizer; pass tokenizer=HFTokenizer.from_pretrained(...)")
        tokenizer = HFTokenizer.from_pretrained(checkpoint.tokenizer)  # (Whisper's BOS: <|startoftranscript|>)
    config = dense_config(checkpoint, decoder_layers=decoder_layers, **overrides)
    model = GeneralistModel.build(config, list(tasks), tokenizer)
    unused = load_weights(model, checkpoint)
    model.pretrained_unused = unused
    return model

