"""Transformer blocks whose FFN (and optionally attention output) is a tag-routed MoE.

Shape legend: B batch, S query positions, K key positions, D width, H heads, G key/value heads.

Pre-norm (the default; Llama, Whisper):

    x = x + Attn(N(x))                       self-attention (bidirectional or causal, within sample)
    x = x + CrossAttn(N(x), memory)          decoder only, within sample
    x = x + FFN(N(x))  or  MoE(N(x), tags)   routed by the tokens' tags

Post-norm (BERT): ``x = N(x + Attn(x))`` and so on. N is LayerNorm or RMSNorm; attention may
group its key/value heads (G < H heads, grouped-query attention) and drop its biases, so that
dense checkpoints of those families load into these blocks (``moe_gen.pretrained``).

Every MoE call returns its auxiliary losses and routing decision (``MoEOutput``); blocks hand them
up as a list, collected in ``StackOutput.moe_outputs``, never through module state. A stack builds
one ``TagBatch`` from its tokens' tags and padding per call and gives it to every MoE layer.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_gen.experts.experts import DenseFFN
from moe_gen.model.config import ModelConfig
from moe_gen.moe import MoE, MoEOutput
from moe_gen.routing.tags import TagBatch

__all__ = ["Attention", "Block", "Stack", "StackOutput", "make_norm", "rotary_tables", "rotate"]


def make_norm(config: ModelConfig) -> nn.Module:
    """The model's normalisation layer over ``d_model`` (LayerNorm or RMSNorm)."""
    if config.norm == "rms":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rotary_tables(positions_BS: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos and sin ``[B, 1, S, head_dim/2]`` of rotary position embeddings (Su et al. 2021)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_BS.device) / head_dim)
    angles = positions_BS.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def rotate(x_BHSd: torch.Tensor, rope) -> torch.Tensor:
    """Applies rotary embeddings: each half-pair (x1, x2) is rotated by its position's angle."""
    cos, sin = rope
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BHSd.dtype)


class Attention(nn.Module):
    """Multi-head attention with a boolean mask (True = may attend); ``num_kv_heads`` < heads
    shares each key/value head among a group of query heads. The output projection is a mixture
    of linear experts when ``moe`` is set; ``cross``: cross-attention (a query without keys
    outputs zeros before the output projection)."""

    def __init__(self, config: ModelConfig, moe: bool = False, stack: str = "encoder", cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        D, bias = config.d_model, config.attention_bias
        self.num_heads, self.num_kv_heads, self.dropout = config.num_heads, config.kv_heads, config.dropout
        self.head_dim = D // config.num_heads
        self.q = nn.Linear(D, D, bias=bias)
        self.kv = nn.Linear(D, 2 * self.num_kv_heads * self.head_dim, bias=bias)
        if moe:
            self.out = MoE(config.moe_config(d_hidden=D, kind="linear", stack=stack))
        else:
            self.out = nn.Linear(D, D, bias=bias)

    def project_kv(self, memory_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, G, K, D/H]`` of ``memory`` (cached once per generation for cross-attention)."""
        B, K, _ = memory_BKD.shape
        k, v = self.kv(memory_BKD).view(B, K, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x_BSD, memory_BKD, mask_BSK, tags: Optional[TagBatch], kv=None, rope=None,
                keep_kv: Optional[list] = None, carry: Optional[dict] = None):
        """``keep_kv``: a list that receives this call's (rotated) keys and values (a prefix the
        decoder-only layout caches for generation). ``carry``: the routed output projection's
        decoding state (``MoE.forward``)."""
        B, S, D = x_BSD.shape
        H = self.num_heads
        q = self.q(x_BSD).view(B, S, H, D // H).transpose(1, 2)
        k, v = self.project_kv(memory_BKD) if kv is None else kv
        if rope is not None:  # self-attention with rotary positions (a cache holds rotated keys)
            q = rotate(q, rope)
            if kv is None:
                k = rotate(k, rope)
        if keep_kv is not None:
            keep_kv.append((k, v))
        # A query may have no key at all (padding; in cross-attention, a sample without inputs); SDPA
        # would return NaN rows there, so such rows attend to every key, and cross-attention then
        # zeroes them (a sample without inputs read other samples' inputs, or padding, otherwise).
        keyless_BS1 = ~mask_BSK.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask_BSK | keyless_BS1).unsqueeze(1),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.num_kv_heads != H)
        if self.cross:
            y = y.masked_fill(keyless_BS1.unsqueeze(1), 0.0)
        y = y.transpose(1, 2).reshape(B, S, D)
        if isinstance(self.out, MoE):
            moe_out = self.out(y, tags=tags, carry=carry)
            return moe_out.output, moe_out
        return self.out(y), None


class Block(nn.Module):
    """One block (pre- or post-norm); ``cross`` adds cross-attention (decoder)."""

    def __init__(self, config: ModelConfig, layer: int, cross: bool, stack: str = "encoder") -> None:
        super().__init__()
        moe = config.is_moe(layer, stack)
        self.post_norm = config.norm_position == "post"
        self.norm_self = make_norm(config)
        self.self_attn = Attention(config, moe=moe and config.moe.attention, stack=stack)
        self.norm_cross = make_norm(config) if cross else None
        self.cross_attn = Attention(config, cross=True) if cross else None
        self.norm_ffn = make_norm(config)
        self.ffn = (MoE(config.moe_config(stack=stack)) if moe
                    else DenseFFN(config.d_model, config.ffn_hidden, config.moe.experts))
        self.drop = nn.Dropout(config.dropout)
        if moe and stack == "decoder" and not type(self.ffn.router.gate).rowwise:
            warnings.warn(f"gate {self.ffn.config.router.gate!r} in the decoder's MoE layers weighs the batch's "
                          "tokens against each other: in training a position's experts depend on later "
                          "positions (and other rows), which decoding step by step cannot reproduce; for "
                          "generative decoders give the decoder a per-token gate "
                          "(ModelConfig.moe.decoder_router={'gate': 'topk'})", stacklevel=2)
        elif moe and stack == "decoder" and self.ffn.config.capacity_factor is not None:
            warnings.warn(f"capacity_factor={self.ffn.config.capacity_factor} in the decoder's MoE layers drops "
                          "tokens by competition over the whole batch: a position's output depends on later "
                          "positions and on other rows, in training and inference alike, which decoding step by "
                          "step cannot reproduce; for generative decoders keep the layers dropless "
                          "(ModelConfig.moe.capacity_factor=None)", stacklevel=2)

    def _residual(self, x, norm: nn.Module, sublayer, drop: bool = True):
        """x + f(norm(x)) (pre-norm) or norm(x + f(x)) (post-norm)."""
        if self.post_norm:
            h = sublayer(x)
            return norm(x + (self.drop(h) if drop else h))
        h = sublayer(norm(x))
        return x + (self.drop(h) if drop else h)

    def _ffn(self, h, tags: TagBatch, routed: Optional[list], carries: Optional[dict]):
        if isinstance(self.ffn, MoE):
            moe_out = self.ffn(h, tags=tags, carry=None if carries is None else carries.setdefault("ffn", {}))
            if routed is not None:
                routed.append(moe_out)
            return moe_out.output
        return self.ffn(h)

    def forward(self, x, self_mask, tags: TagBatch, memory=None, cross_mask=None,
                rope=None, keep_kv: Optional[list] = None,
                cache: Optional["BlockCache"] = None, carries: Optional[dict] = None) -> tuple[torch.Tensor, list]:
        """One path for training, prefill and decoding steps.

        Args:
            tags: the tokens' tags and padding, shared by every MoE layer of the stack.
            memory, cross_mask: the encoder output and what each position may see of it (the
                contrastive pass gives no memory: cross-attention is skipped).
            keep_kv: a list that receives this block's self-attention keys and values.
            cache: generation (``BlockCache``): the new positions' keys and values are written
                into the cache first and attention reads the whole cache (``self_mask`` decides
                what each position sees); cross-attention reads the cached encoder keys/values.
                No dropout.
            carries: the MoE layers' decoding state, kept across the calls of one generation (a
                dict per block: ``BlockCache.carries``, or the prefix pass's that the caches
                start from); None when not generating.
        """
        routed: list[MoEOutput] = []
        drop = cache is None
        if cache is not None and carries is None:
            carries = cache.carries

        def self_attention(h):
            kv = None if cache is None else cache.write_and_read(self.self_attn, h, rope)
            out, moe_out = self.self_attn(h, h if kv is None else None, self_mask, tags, kv=kv, rope=rope,
                                          keep_kv=keep_kv,
                                          carry=None if carries is None else carries.setdefault("attention", {}))
            if moe_out is not None:
                routed.append(moe_out)
            return out

        x = self._residual(x, self.norm_self, self_attention, drop)
        if self.cross_attn is not None and (memory is not None or cache is not None):  # contrastive: skipped
            kv = None if cache is None else cache.memory_kv
            x = self._residual(x, self.norm_cross,
                               lambda h: self.cross_attn(h, memory, cross_mask, tags, kv=kv)[0], drop)
        x = self._residual(x, self.norm_ffn, lambda h: self._ffn(h, tags, routed, carries), drop)
        return x, routed


@dataclasses.dataclass
class BlockCache:
    """A decoder block's keys and values during generation.

    Attributes:
        k, v: ``[B, G, L, D/H]`` self-attention keys and values of every position so far (rotated).
        memory_kv: the cross-attention keys and values of the encoder output (computed once), or
            None (decoder-only layout).
        write: long ``[B, S]``: where the positions of the current call go (set per call).
        carries: the block's MoE layers' decoding state (``"ffn"``, ``"attention"`` → the dict its
            router keeps, e.g. a context router's sums of earlier positions), rows ``[B, ...]``.
    """

    k: torch.Tensor
    v: torch.Tensor
    memory_kv: Optional[tuple] = None
    write: Optional[torch.Tensor] = None
    carries: dict = dataclasses.field(default_factory=dict)

    def reorder(self, parents: torch.Tensor) -> None:
        """Row j takes over row ``parents[j]``'s keys, values and carried state (beam search)."""
        self.k, self.v = self.k[parents], self.v[parents]  # (a sample's beams share its memory)
        for carry in self.carries.values():
            for name, value in carry.items():
                carry[name] = value[parents]

    def write_and_read(self, attention: "Attention", h_BSD: torch.Tensor, rope=None) -> tuple:
        """Writes the keys and values of ``h``'s positions at ``write``; returns the whole cache."""
        k_new, v_new = attention.project_kv(h_BSD)
        if rope is not None:
            k_new = rotate(k_new, rope)
        rows = torch.arange(h_BSD.shape[0], device=h_BSD.device).unsqueeze(1)
        # in the cache's dtype (the weights'): under autocast the projections come out in bf16
        self.k[rows, :, self.write] = k_new.transpose(1, 2).to(self.k.dtype)  # [B, S, G, D/H] at (row, position)
        self.v[rows, :, self.write] = v_new.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


@dataclasses.dataclass
class StackOutput:
    hidden: torch.Tensor  # [B, S, D] after the final norm
    moe_outputs: list  # MoEOutput of every MoE call, in layer order
    kv: Optional[list] = None  # per block (keys, values) of self-attention, when the caller kept them
    carries: Optional[list] = None  # per block, the MoE layers' decoding state, when the caller kept keys


class Stack(nn.Module):
    """A stack of blocks with a final norm (an identity where ``config.final_norm`` is off)."""

    def __init__(self, config: ModelConfig, layers: int, cross: bool, name: str = "encoder") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config, i, cross, name) for i in range(layers))
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.tag_vocab = config.moe.router.tag_vocab  # the tags are checked once per forward against them
        # Activation checkpointing (set by GeneralistModel.set_activation_checkpointing): in training
        # each block keeps only its input and recomputes its activations during backward.
        self.checkpoint_blocks = False

    @property
    def moe_layers(self) -> list[MoE]:
        """The blocks' MoE layers (FFNs and routed attention projections); a stack without any never
        reads the tags."""
        return [m for b in self.blocks for m in (b.ffn, b.self_attn.out) if isinstance(m, MoE)]

    def tag_batch(self, tags, padding, shape, device) -> Optional[TagBatch]:
        """The ``TagBatch`` of tokens shaped ``shape`` (tags checked against the routers'
        vocabularies), with what the stack's MoE layers read beyond the tag groups (sequences for
        routers that pool them, the valid rows for frozen layers), or None for a stack without MoE
        layers: no grouping work for dense models."""
        layers = self.moe_layers
        if not layers:
            return None
        return TagBatch(tags, padding, shape=shape, device=device, vocab=self.tag_vocab,
                        segments=any(type(m.router.input).reads_segments for m in layers),
                        valid_rows=any(m.backend.keeps_plans for m in layers))

    def forward(self, x, self_mask, tags, padding, memory=None, cross_mask=None, rope=None,
                keep_kv: Optional[list] = None, caches: Optional[list[BlockCache]] = None) -> StackOutput:
        """``tags``, ``padding``: the tokens' ``TokenTags`` and padding mask (True = padding), given
        to every MoE layer as one ``TagBatch``; or ``tags`` the ``TagBatch`` itself (``tag_batch``,
        padding included; a decoding loop keeps one per distinct step). ``keep_kv``: a list that
        receives every block's self-attention keys and values, and the output's ``carries`` every
        block's MoE decoding state (a prefix that generation continues). ``caches``: one
        ``BlockCache`` per block (generation)."""
        routed = []
        if isinstance(tags, TagBatch):
            if padding is not None or tags.shape != tuple(x.shape[:2]):
                raise ValueError(f"a TagBatch carries its padding and must describe the tokens {tuple(x.shape[:2])}; "
                                 f"got one for {tags.shape}{' and a padding mask' if padding is not None else ''}")
            batch = tags
        else:
            batch = self.tag_batch(tags, padding, x.shape[:2], x.device)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        kept = None if keep_kv is None else [{} for _ in self.blocks]
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            carries = None if kept is None else kept[i]
            if recompute:
                x, moe_outs = checkpoint(block, x, self_mask, batch, memory, cross_mask, rope, keep_kv, cache, carries,
                                         use_reentrant=False, context_fn=functools.partial(_contexts, block))
            else:
                x, moe_outs = block(x, self_mask, batch, memory, cross_mask, rope, keep_kv, cache, carries)
            routed.extend(moe_outs)
        return StackOutput(self.norm(x), routed, carries=kept)


def _contexts(block: Block):
    """Checkpoint contexts of ``block``: around the forward, the balance biases its MoE layers
    choose experts with are noted (the forward then nudges them); around the recomputation in
    backward, those layers know they are recomputing (so they skip what a forward does once per
    step, such as nudging the bias) and choose with the noted biases again, so that the recomputed
    routes are the forward's. Dropout and router noise draw the same numbers again (the checkpoint
    restores the RNG state). One pair per checkpointed call: a block run twice before its backward
    (the contrastive objective's two passes) recomputes each pass with its own biases."""
    layers = [m for m in block.modules() if isinstance(m, MoE)]
    used: dict[MoE, torch.Tensor] = {}
    shares: dict[MoE, list] = {layer: [] for layer in layers if layer.router.load_average is not None}
    return _NoteBiases(layers, used, shares), _Recomputing(layers, used, shares)


def _biased(layers: list[MoE]):
    return [layer for layer in layers if getattr(layer.router, "balance_bias", None) is not None]


class _NoteBiases:
    """Notes the balance bias of each of ``layers`` as the forward finds it (into ``used``), and
    the windowed load shares the forward reads (into ``shares``)."""

    def __init__(self, layers: list[MoE], used: dict, shares: dict) -> None:
        self.layers, self.used, self.shares = _biased(layers), used, shares

    def __enter__(self):
        for layer in self.layers:
            self.used[layer] = layer.router.balance_bias.detach().clone()
        for layer, noted in self.shares.items():
            layer.noted_shares = noted

    def __exit__(self, *exc):
        for layer in self.shares:
            layer.noted_shares = None


class _Recomputing:
    """Marks ``layers`` as recomputing while the context is open, their balance biases set back to
    what the forward used (``used``) and restored after."""

    def __init__(self, layers: list[MoE], used: dict, shares: dict) -> None:
        self.layers, self.used, self.shares = layers, used, shares
        self.current: dict[MoE, torch.Tensor] = {}

    def __enter__(self):
        for layer in self.layers:
            layer.recomputing = True
        for layer, noted in self.shares.items():
            layer.replayed_shares = list(noted)
        with torch.no_grad():
            for layer, bias in self.used.items():
                self.current[layer] = layer.router.balance_bias.clone()
                layer.router.balance_bias.copy_(bias)

    def __exit__(self, *exc):
        with torch.no_grad():
            for layer, bias in self.current.items():
                layer.router.balance_bias.copy_(bias)
        self.current.clear()
        for layer in self.layers:
            layer.recomputing = False
            layer.replayed_shares = None
