"""Pre-norm transformer blocks whose FFN (and optionally attention output) is a tag-routed MoE.

Shape legend: B batch, S query positions, K key positions, D width, H heads.

    x = x + Attn(LN(x))                      self-attention (bidirectional or causal, within sample)
    x = x + CrossAttn(LN(x), memory)         decoder only, within sample
    x = x + FFN(LN(x))  or  MoE(LN(x), tags) routed by the tokens' tags

Every MoE call returns its auxiliary losses and routing decision; blocks hand them up in a
``BlockOutput`` list, never through module state.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_gen.experts.experts import DenseFFN
from moe_gen.model.config import ModelConfig
from moe_gen.moe import MoE, MoEOutput
from moe_gen.routing.tags import TokenTags

__all__ = ["Attention", "Block", "Stack", "StackOutput", "rotary_tables", "rotate"]


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
    """Multi-head attention with a boolean mask (True = may attend); the output projection is a
    mixture of linear experts when ``moe`` is set."""

    def __init__(self, config: ModelConfig, moe: bool = False) -> None:
        super().__init__()
        D = config.d_model
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.out = MoE(config.moe_config(d_hidden=D, kind="linear")) if moe else nn.Linear(D, D)

    def project_kv(self, memory_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, K, D/H]`` of ``memory`` (cached once per generation for cross-attention)."""
        B, K, D = memory_BKD.shape
        H = self.num_heads
        k, v = self.kv(memory_BKD).view(B, K, 2, H, D // H).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x_BSD, memory_BKD, mask_BSK, tags: Optional[TokenTags], padding_BS, kv=None, rope=None):
        B, S, D = x_BSD.shape
        H = self.num_heads
        q = self.q(x_BSD).view(B, S, H, D // H).transpose(1, 2)
        k, v = self.project_kv(memory_BKD) if kv is None else kv
        if rope is not None:  # self-attention with rotary positions (a cache holds rotated keys)
            q = rotate(q, rope)
            if kv is None:
                k = rotate(k, rope)
        # A padding query may have no key at all; SDPA would return NaN rows there, so such rows
        # attend to every key (their output is ignored downstream).
        mask = mask_BSK | ~mask_BSK.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, S, D)
        if isinstance(self.out, MoE):
            moe_out = self.out(y, tags=tags, padding_mask=padding_BS)
            return moe_out.output, moe_out
        return self.out(y), None


class Block(nn.Module):
    """One pre-norm block; ``cross`` adds cross-attention (decoder)."""

    def __init__(self, config: ModelConfig, layer: int, cross: bool) -> None:
        super().__init__()
        moe = config.is_moe(layer)
        self.norm_self = nn.LayerNorm(config.d_model)
        self.self_attn = Attention(config, moe=moe and config.moe_attention)
        self.norm_cross = nn.LayerNorm(config.d_model) if cross else None
        self.cross_attn = Attention(config) if cross else None
        self.norm_ffn = nn.LayerNorm(config.d_model)
        self.ffn = (MoE(config.moe_config()) if moe
                    else DenseFFN(config.d_model, config.ffn_hidden, config.experts))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, self_mask, tags, padding, memory=None, cross_mask=None,
                rope=None) -> tuple[torch.Tensor, list]:
        routed: list[MoEOutput] = []
        normed = self.norm_self(x)
        h, moe_out = self.self_attn(normed, normed, self_mask, tags, padding, rope=rope)
        if moe_out is not None:
            routed.append(moe_out)
        x = x + self.drop(h)
        if self.cross_attn is not None and memory is not None:  # the contrastive pass skips it
            h, _ = self.cross_attn(self.norm_cross(x), memory, cross_mask, tags, padding)
            x = x + self.drop(h)
        h = self.norm_ffn(x)
        if isinstance(self.ffn, MoE):
            moe_out = self.ffn(h, tags=tags, padding_mask=padding)
            routed.append(moe_out)
            h = moe_out.output
        else:
            h = self.ffn(h)
        return x + self.drop(h), routed

    def step(self, x_B1D, cache: dict, write_B, self_mask_B1K, tags, padding_B1, memory_kv, cross_mask_B1S,
             rope=None):
        """One new position per row, attending to the cached keys/values of earlier positions
        (``cache["k"]``, ``cache["v"]``: ``[B, H, L, D/H]``; the new ones are written at ``write_B``)."""
        h = self.norm_self(x_B1D)
        k_new, v_new = self.self_attn.project_kv(h)
        if rope is not None:
            k_new = rotate(k_new, rope)
        rows = torch.arange(x_B1D.shape[0], device=x_B1D.device)
        cache["k"][rows, :, write_B] = k_new[:, :, 0]
        cache["v"][rows, :, write_B] = v_new[:, :, 0]
        h, _ = self.self_attn(h, None, self_mask_B1K, tags, padding_B1, kv=(cache["k"], cache["v"]), rope=rope)
        x = x_B1D + h
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.norm_cross(x), None, cross_mask_B1S, tags, padding_B1, kv=memory_kv)
            x = x + h
        h = self.norm_ffn(x)
        h = self.ffn(h, tags=tags, padding_mask=padding_B1).output if isinstance(self.ffn, MoE) else self.ffn(h)
        return x + h


@dataclasses.dataclass
class StackOutput:
    hidden: torch.Tensor  # [B, S, D] after the final norm
    moe_outputs: list  # MoEOutput of every MoE call, in layer order


class Stack(nn.Module):
    """A stack of blocks with a final LayerNorm."""

    def __init__(self, config: ModelConfig, layers: int, cross: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config, i, cross) for i in range(layers))
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, x, self_mask, tags, padding, memory=None, cross_mask=None, rope=None) -> StackOutput:
        routed = []
        for block in self.blocks:
            x, moe_outs = block(x, self_mask, tags, padding, memory, cross_mask, rope)
            routed.extend(moe_outs)
        return StackOutput(self.norm(x), routed)
