"""Load balancing for tag-routed layers (``RouterConfig.tag_balance``).

Shape legend: G tag groups, E experts, K experts per group.

Tag routers (strategies ``modality``, ``task``, ``attribute``) give every member of a tag group one
route, so the token-count losses of ``moe_gen.routing.losses`` are skipped for them. Without any
pressure, though, training drifts the few group routes onto a few experts (the rich get richer:
an expert that serves many groups is trained most and its logit rows grow towards their router
inputs), leaving capacity idle and making hot spots under expert parallelism. Two remedies:

- ``loss`` (default): the Switch loss E · Σ_e f_e · P_e over tag groups weighted by their token
  counts (f_e: share of the token assignments routed to e; P_e: token-weighted mean of the groups'
  probabilities of e), differentiable through the tag router, at ``balance_loss_weight``. Computed
  from the G group rows. Its gradient lowers the probability of overloaded experts for every group
  in proportion to the group's tokens, so routes move only where the task losses let them.
- ``bias`` (Wang et al. 2024, "Auxiliary-loss-free load balancing", as in DeepSeek-V3): a
  per-expert bias ``b`` (a buffer of the router, saved in checkpoints) is added to the logits only
  to *choose* the top-k experts; the gate weights stay the unbiased probabilities of the chosen
  experts, so no gradient is bent. After every training forward

      b_e += u · clip((mean_e' load_e' − load_e) / mean_e' load_e', -1, 1)   (rule "error")
      b_e += u · sign(mean_e' load_e' − load_e)                              (rule "sign", the paper's)

  where ``load_e`` counts the tokens routed to e (each tag group weighted by its valid members),
  so groups are pushed towards underloaded experts; ``u = RouterConfig.tag_balance_rate``. With a
  few coarse tag groups the sign rule keeps moving groups between experts even when the load is
  nearly even; the error rule moves experts near the mean load little, and reached full
  utilisation more reliably (tests/test_tag_balance.py set-ups). The bias is fixed outside
  training and when the router is frozen, so merged inference and the route cache see a constant
  route (an update is an in-place write, which the cache's version stamp notices).

Why ``loss`` is the default: on the debug recipe with 8 experts (300 steps; README, "The MoE
layer") both raise the share of experts above 1/(4E) of the load from about a third to three
quarters, but the bias at u = 0.01 cost 4–5% of held-out loss and the loss did not.

Gradient accumulation: the bias moves once per forward (per micro-batch), so ``accumulate = A``
moves it up to A steps of u per optimizer step, and each micro-batch is routed with the bias left
by the previous one. Several processes (``torch.distributed`` with more than one rank, data or
expert parallel: routers are replicated and every rank routes its own tokens over all E experts):
a forward only adds its load to a pending total, and ``sync_bias_updates`` (called by
``moe_gen.distributed.sync_gradients``, once per optimizer step on every rank) sums the totals over
all ranks and applies one update, so the replicated biases stay identical. A collective inside
the forward would not do: ranks may run different numbers of forwards per step (their
micro-batches mix objectives differently). Loops that train on several processes without
``sync_gradients`` get no bias update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["group_balance_loss", "nudge_bias_", "defer_to_sync", "sync_bias_updates"]


def group_balance_loss(probs_GE: torch.Tensor, ids_GK: torch.Tensor, count_G: torch.Tensor) -> torch.Tensor:
    """The Switch balance loss of tag-group routes, each group weighted by its token count.

    Equals ``balance_loss`` over the tokens that the groups stand for, without expanding them.

    Args:
        probs_GE: fp32 router probabilities of each group.
        ids_GK: long experts of each group's route.
        count_G: long valid members of each group.

    Returns:
        fp32 scalar E · Σ_e f_e · P_e (1 when load and probability are uniform; 0 without tokens).
    """
    E, K = probs_GE.shape[1], ids_GK.shape[1]
    weight_G = count_G.to(probs_GE.dtype)
    tokens = weight_G.sum()
    if float(tokens) == 0:
        return probs_GE.sum() * 0.0
    assigned_E = torch.zeros(E, dtype=probs_GE.dtype, device=probs_GE.device).index_add_(
        0, ids_GK.reshape(-1), weight_G.repeat_interleave(K))
    fraction_E = assigned_E / (tokens * K)
    mean_probs_E = (probs_GE * weight_G.unsqueeze(1)).sum(0) / tokens
    return E * (fraction_E * mean_probs_E).sum()


@torch.no_grad()
def nudge_bias_(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float, rule: str = "error") -> None:
    """Moves the bias towards underloaded experts, in place; without any load (no valid token)
    nothing moves.

    ``sign``: ``b_e += u · sign(mean − load_e)``, the paper's rule. ``error``:
    ``b_e += u · clip((mean − load_e) / mean, -1, 1)``: the same step for an idle expert (+u) and
    for one at twice the mean or more (-u), smaller steps near the mean.
    """
    load_E = load_E.to(bias_E.dtype)
    mean = load_E.mean()
    if float(mean) <= 0:
        return
    if rule == "sign":
        step_E = torch.sign(mean - load_E)
    else:
        step_E = ((mean - load_E) / mean).clamp(-1.0, 1.0)
    bias_E.add_(step_E, alpha=rate)


def defer_to_sync() -> bool:
    """Whether bias updates wait for ``sync_bias_updates`` (several processes), rather than being
    applied after each forward."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _balanced_routers(model: nn.Module) -> list[nn.Module]:
    from moe_gen.routing.router import Router

    return [m for m in model.modules() if isinstance(m, Router) and m.balances_by_bias]


@torch.no_grad()
def sync_bias_updates(model: nn.Module) -> None:
    """Applies the pending bias updates of every bias-balanced router of ``model``, from the loads
    summed over all processes since the last call (one all-reduce for all layers).

    Collective when several processes run: call it on every rank, at the same point of the step
    (``moe_gen.distributed.sync_gradients`` does). Routers are visited in module order, which is
    the same on every rank; one that ran no forward contributes zeros.
    """
    routers = _balanced_routers(model)
    if not routers:
        return
    loads = [r.take_pending_load() for r in routers]
    flat = torch.cat([torch.zeros_like(r.balance_bias) if load is None else load.to(r.balance_bias.dtype)
                      for r, load in zip(routers, loads)])
    if defer_to_sync():
        dist.all_reduce(flat)
    for router, load_E in zip(routers, flat.split([r.balance_bias.numel() for r in routers])):
        rc = router.router_config
        nudge_bias_(router.balance_bias, load_E, rc.tag_balance_rate, rc.tag_balance_rule)
