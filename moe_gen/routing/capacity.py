"""Expert capacity: which assignments an expert computes when its slots are limited.

Shape legend: T tokens, K assignments per token, E experts.

Slots are handed out in priority order. ``in_order`` (GShard, tutel): all first choices before
any second choice, and within a choice rank by token position. ``batch_prioritized`` (V-MoE's
BPR): first choices before second choices, and within a choice rank tokens by their highest gate
weight, so confident tokens are the last to be dropped. Dropless mode computes every assignment;
its "capacity" is the largest expert load (what a padded layout such as GShard's einsum needs).
"""

from __future__ import annotations

import math

import torch

__all__ = ["capacity_for", "slot_positions"]


def capacity_for(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float, min_capacity: int
) -> int:
    """Slots per expert: ``max(min_capacity, ceil(f·k·N/E))``."""
    return max(min_capacity, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def slot_positions(
    ids_TK: torch.Tensor,
    mask_TK: torch.Tensor,
    num_experts: int,
    token_priority_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each assignment's slot index within its expert, in priority order.

    Args:
        ids_TK: long expert ids.
        mask_TK: bool, which assignments exist (absent ones take no slot).
        num_experts: E.
        token_priority_T: optional long permutation of tokens, highest priority first; ``None``
            means token order.

    Returns:
        positions_TK (long; 0 for absent assignments) and counts_E (long, assignments per expert).
    """
    T, K = ids_TK.shape
    device = ids_TK.device
    order_T = torch.arange(T, device=device) if token_priority_T is None else token_priority_T
    # Choice-major priority order: every token's first choice, then every second choice, ...
    ids_N = ids_TK[order_T].t().reshape(-1)
    mask_N = mask_TK[order_T].t().reshape(-1)
    # Absent assignments go to a spare expert E so they take no real slot.
    key_N = torch.where(mask_N, ids_N, num_experts)
    sorted_key_N, perm_N = torch.sort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank_N = torch.empty_like(perm_N)
    rank_N[perm_N] = torch.arange(perm_N.numel(), device=device) - starts[sorted_key_N]
    positions_TK = torch.empty_like(ids_TK)
    positions_TK[order_T] = rank_N.view(K, T).t()
    return torch.where(mask_TK, positions_TK, 0), counts[:num_experts]
