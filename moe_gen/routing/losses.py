"""Auxiliary routing losses, computed from a ``RouterOutput`` over valid tokens only.

Shape legend: T tokens, E experts, K assignments per token, N valid tokens.

- ``balance`` (Switch eq. 4 / GShard): E · Σ_e f_e · P_e, with f_e the fraction of the top-k
  assignments that chose expert e and P_e the mean router probability of e. Equals 1 when both are
  uniform; gradients flow through P.
- ``balance_modality`` / ``balance_task``: the same loss inside each modality (task) group,
  averaged over the groups present, so a frequent modality cannot hide an unbalanced rare one.
- ``z`` (ST-MoE): mean over tokens of logsumexp(logits)², keeping logits small for fp32/bf16
  stability.
- ``importance`` (Shazeer et al. 2017): CV² of the per-expert sums of router probabilities.

The token-count losses (balance, importance) are skipped for content-independent strategies
(modality, task, attribute): every token of a tag group shares one route, so the only thing such
a loss could change is which experts each *group* uses. They are also skipped for gates that
balance by construction (expert choice, BASE) or learn nothing (hash). Tag-routed layers are
balanced by ``RouterConfig.tag_balance`` instead: by default (``"loss"``) ``tag_balance`` here, the
Switch loss over tag groups weighted by their token counts (at ``balance_loss_weight``), or, with
``"bias"``, a selection bias (``moe_gen.routing.balance``).
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_gen.config import RouterConfig
from moe_gen.routing.balance import group_balance_loss
from moe_gen.routing.output import RouterOutput
from moe_gen.routing.tags import TokenTags

__all__ = ["balance_loss", "z_loss", "importance_loss", "auxiliary_losses"]


def _row_weights(rows_NX: torch.Tensor, valid_N: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows_NX`` with the rows outside ``valid_N`` zeroed (``where``, so padding holding NaN adds
    nothing, gradient included), and each row's weight 1 or 0: masks instead of selecting the valid
    rows, whose number would have to be read back from the device."""
    if valid_N is None:
        return rows_NX, rows_NX.new_ones(rows_NX.shape[0])
    return torch.where(valid_N.unsqueeze(1), rows_NX, 0.0), valid_N.to(rows_NX.dtype)


def balance_loss(probs_NE: torch.Tensor, ids_NK: torch.Tensor,
                 fraction_E: Optional[torch.Tensor] = None, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard load-balance loss for N tokens (probs fp32 ``[N, E]``, ids ``[N, K]``;
    ``fraction_E``: the load shares to use instead of these tokens' own; ``valid_N``: bool, the rows
    that count, the others left out as if absent)."""
    N, E = probs_NE.shape
    if N == 0:
        return probs_NE.sum() * 0.0
    probs_NE, weight_N = _row_weights(probs_NE, valid_N)
    if fraction_E is None:
        K = ids_NK.shape[1]
        ids = ids_NK if valid_N is None else torch.where(valid_N.unsqueeze(1), ids_NK, 0)
        counts_E = probs_NE.new_zeros(E).index_add_(0, ids.reshape(-1), weight_N.repeat_interleave(K))
        fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
    mean_E = probs_NE.sum(0) / weight_N.sum().clamp_min(1.0)
    return E * (fraction_E.to(probs_NE.dtype) * mean_E).sum()


def z_loss(logits_NE: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE eq. 5): mean of logsumexp(logits)² (over the ``valid_N`` rows)."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    logits_NE, weight_N = _row_weights(logits_NE, valid_N)
    return (torch.logsumexp(logits_NE, dim=-1).square() * weight_N).sum() / weight_N.sum().clamp_min(1.0)


def importance_loss(probs_NE: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017): CV² = Var / Mean² of per-expert probability sums
    (over the ``valid_N`` rows)."""
    importance_E = _row_weights(probs_NE, valid_N)[0].sum(0)
    mean = importance_E.mean()
    return importance_E.var(unbiased=False) / mean.square().clamp_min(1e-20)


def _grouped_balance(probs_NE: torch.Tensor, ids_NK: torch.Tensor, group_N: torch.Tensor) -> torch.Tensor:
    if group_N.numel() == 0:  # no valid token (all padding, or a rank without tokens): no loss
        return probs_NE.sum() * 0.0
    groups = torch.unique(group_N)
    losses = [balance_loss(probs_NE[group_N == g], ids_NK[group_N == g]) for g in groups]
    return torch.stack(losses).mean()


def auxiliary_losses(
    routing: RouterOutput, tags: TokenTags | None, config: RouterConfig, load_share: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """The configured auxiliary losses, each already multiplied by its weight.

    Args:
        routing: the router's decision for T tokens.
        tags: flattened tags ``[T]`` (needed for the grouped balance variants).
        config: the router config with loss weights.
        load_share: the load share per expert ``[E]`` the tag-balance loss reads instead of this
            forward's own (``RouterConfig.tag_balance_window``; None: this forward's).

    Returns:
        ``{name: weighted scalar loss}`` for every loss with a positive weight that applies to this
        router (see the module docstring for which are skipped and why).
    """
    count_losses_apply = routing.content_dependent and not routing.balanced_by_construction
    tag_loss_applies = (config.tag_balance in ("loss", "loss+bias") and config.balance_loss_weight > 0
                        and routing.learned_gate
                        and not routing.content_dependent and not routing.balanced_by_construction)
    if routing.groups is not None and not count_losses_apply:
        # Routes kept per tag group: the losses over tokens are each group's value weighted by its
        # number of valid members (no [T, E] expansion).
        losses = {}
        if tag_loss_applies:
            g = routing.groups
            loss = group_balance_loss(g.probs_GE, g.ids_GK, g.count_G, load_share)
            losses["tag_balance"] = config.balance_loss_weight * loss
        if config.z_loss_weight > 0 and routing.learned_gate:
            g = routing.groups
            count_G = g.count_G.to(g.logits_GE.dtype)
            mean = (torch.logsumexp(g.logits_GE, dim=-1).square() * count_G).sum() / count_G.sum().clamp_min(1.0)
            losses["z"] = config.z_loss_weight * mean
        return losses
    # over all T rows, padding masked out: selecting the valid rows would read their number back
    valid_T, probs_TE, ids_TK = routing.valid, routing.probs, routing.topk_ids
    losses: dict[str, torch.Tensor] = {}

    if count_losses_apply and config.balance_loss_weight > 0:
        losses["balance"] = config.balance_loss_weight * balance_loss(probs_TE, ids_TK, valid_N=valid_T)
        for group in config.balance_loss_groups:
            if tags is None:
                raise ValueError(
                    f"balance_loss_groups includes {group!r}, which needs tags; pass tags= to the MoE"
                )
            group_N = (tags.modality if group == "modality" else tags.task)[valid_T]
            losses[f"balance_{group}"] = config.balance_loss_weight * _grouped_balance(
                probs_TE[valid_T], ids_TK[valid_T], group_N
            )
    if tag_loss_applies:  # routes expanded to tokens (capacity): the same loss, token by token
        losses["tag_balance"] = config.balance_loss_weight * balance_loss(probs_TE, ids_TK, load_share, valid_T)
    if count_losses_apply and config.importance_loss_weight > 0:
        losses["importance"] = config.importance_loss_weight * importance_loss(probs_TE, valid_T)
    if config.z_loss_weight > 0 and routing.learned_gate:
        losses["z"] = config.z_loss_weight * z_loss(routing.logits, valid_T)
    return losses
