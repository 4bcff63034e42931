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


def balance_loss(probs_NE: torch.Tensor, ids_NK: torch.Tensor,
                 fraction_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard load-balance loss for N tokens (probs fp32 ``[N, E]``, ids ``[N, K]``;
    ``fraction_E``: the load shares to use instead of these tokens' own)."""
    N, E = probs_NE.shape
    if N == 0:
        return probs_NE.sum() * 0.0
    if fraction_E is None:
        counts_E = torch.bincount(ids_NK.reshape(-1), minlength=E).to(probs_NE.dtype)
        fraction_E = counts_E / counts_E.sum()
    return E * (fraction_E.to(probs_NE.dtype) * probs_NE.mean(0)).sum()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE eq. 5): mean of logsumexp(logits)²."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def importance_loss(probs_NE: torch.Tensor) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017): CV² = Var / Mean² of per-expert probability sums."""
    importance_E = probs_NE.sum(0)
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
    valid_T = routing.valid
    logits_NE = routing.logits[valid_T]
    probs_NE = routing.probs[valid_T]
    ids_NK = routing.topk_ids[valid_T]
    losses: dict[str, torch.Tensor] = {}

    if count_losses_apply and config.balance_loss_weight > 0:
        losses["balance"] = config.balance_loss_weight * balance_loss(probs_NE, ids_NK)
        for group in config.balance_loss_groups:
            if tags is None:
                raise ValueError(
                    f"balance_loss_groups includes {group!r}, which needs tags; pass tags= to the MoE"
                )
            group_N = (tags.modality if group == "modality" else tags.task)[valid_T]
            losses[f"balance_{group}"] = config.balance_loss_weight * _grouped_balance(
                probs_NE, ids_NK, group_N
            )
    if tag_loss_applies:  # routes expanded to tokens (capacity): the same loss, token by token
        losses["tag_balance"] = config.balance_loss_weight * balance_loss(probs_NE, ids_NK, load_share)
    if count_losses_apply and config.importance_loss_weight > 0:
        losses["importance"] = config.importance_loss_weight * importance_loss(probs_NE)
    if config.z_loss_weight > 0 and routing.learned_gate:
        losses["z"] = config.z_loss_weight * z_loss(logits_NE)
    return losses
