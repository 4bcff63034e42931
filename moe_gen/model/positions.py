"""Positions of a model's tokens: each position's place in its sample, the check that no sample
reaches past the learned position table, and the sinusoidal basis of location bins."""

from __future__ import annotations

import math

import torch

from moe_gen.model.config import ModelConfig
from moe_gen.tasks.batch import Side

__all__ = ["location_basis", "side_positions", "check_positions", "positions_in_sample"]


def location_basis(num_bins: int, frequencies: int) -> torch.Tensor:
    """``[num_bins, 2F]``: ``sin`` and ``cos`` of ``2^j·π·u`` for the coordinate ``u = k / (num_bins - 1)``
    of each location bin ``k`` (wavelengths from 2 down to ``2^(2-F)``: the coarsest separates the
    two halves of the image, the finest neighbouring pixels of a 2^(F-1)-pixel side)."""
    u = torch.arange(num_bins, dtype=torch.float32) / max(num_bins - 1, 1)
    angles = u[:, None] * (math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32))
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def side_positions(side: Side) -> torch.Tensor:
    """long ``[B, S]``: the positions a side's samples give (``Side.position_ids``), or each
    position's index within its packed sample."""
    return side.position_ids if side.position_ids is not None else positions_in_sample(side.tags.sample)


def check_positions(positions_BS: torch.Tensor, side: Side, config: ModelConfig) -> None:
    """Refuses a batch whose samples reach past the learned position table (they read its last
    row); padding does not count, nor features where only tokens get learned positions."""
    limit = config.max_positions
    unread_BS = side.padding_mask if config.positions_on_features else side.padding_mask | ~side.is_token
    top = int(positions_BS.masked_fill(unread_BS, 0).max()) if positions_BS.numel() else 0
    if top >= limit:
        raise ValueError(f"a sample reaches position {top}, past the learned position table "
                         f"(ModelConfig.max_positions={limit}); shorten its inputs (e.g. max_length=) or build the "
                         "model with a larger max_positions")


def positions_in_sample(sample_BS: torch.Tensor) -> torch.Tensor:
    """Index of each position within its packed sample (restarts where the sample id changes)."""
    B, S = sample_BS.shape
    arange = torch.arange(S, device=sample_BS.device).expand(B, S)
    starts = torch.ones_like(sample_BS, dtype=torch.bool)
    starts[:, 1:] = sample_BS[:, 1:] != sample_BS[:, :-1]
    return arange - torch.where(starts, arange, 0).cummax(dim=1).values
