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
  training and when the router is frozen, so merged inference sees a constant
  route (``merge_for_inference`` folds the route in as it is when called).

The loss reads the load of the forward it is computed in, which with one task per micro-batch
(``TrainConfig.batch_tasks="single"``) holds one task's groups only: it then spreads each task over
its own experts and cannot see the experts the other tasks crowd. ``RouterConfig.tag_balance_window
= W`` makes it read a running average of each expert's share of the load instead (weights decaying
by 1 − 1/W per update, the current forward's share included; one update per forward in one process,
one per optimizer step from the mean of the processes' shares under several, applied by
``sync_bias_updates``). Measured on one-task batches (docs/learning_quality.md, "One task per batch"): W of 4–16 raised
utilisation, W = 64 lowered it (every task then chases the same experts the lagging average shows
idle).

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

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["group_balance_loss", "nudge_bias_", "defer_to_sync", "sync_bias_updates", "balance_state",
           "restore_balance_state"]


def group_balance_loss(probs_GE: torch.Tensor, ids_GK: torch.Tensor, count_G: torch.Tensor,
                       fraction_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Switch balance loss of tag-group routes, each group weighted by its token count.

    Equals ``balance_loss`` over the tokens that the groups stand for, without expanding them.

    Args:
        probs_GE: fp32 router probabilities of each group.
        ids_GK: long experts of each group's route.
        count_G: long valid members of each group.
        fraction_E: the load shares f_e to use instead of these groups' own (a running average:
            ``RouterConfig.tag_balance_window``).

    Returns:
        fp32 scalar E · Σ_e f_e · P_e (1 when load and probability are uniform; 0 without tokens).
    """
    E, K = probs_GE.shape[1], ids_GK.shape[1]
    weight_G = count_G.to(probs_GE.dtype)
    tokens = weight_G.sum().clamp_min(1.0)  # no token: every term is 0 (no read back to check)
    if fraction_E is None:
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


def _balanced_routers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The routers of ``model`` balanced by a bias, and those whose loss reads a running load."""
    from moe_gen.routing.router import Router

    routers = [m for m in model.modules() if isinstance(m, Router)]
    return [m for m in routers if m.balances_by_bias], [m for m in routers if m.load_average is not None]


@torch.no_grad()
def sync_bias_updates(model: nn.Module) -> None:
    """Applies the pending balance updates of ``model``'s routers from what all processes routed
    since the last call (one all-reduce for all layers): the selection biases of bias-balanced
    routers, from the loads summed; the running load of windowed balance losses
    (``RouterConfig.tag_balance_window``), by the mean of the processes' load shares.

    Collective when several processes run: call it on every rank, at the same point of the step
    (``moe_gen.distributed.sync_gradients`` does). Routers are visited in module order, which is
    the same on every rank; one that ran no forward contributes zeros.
    """
    biased, windowed = _balanced_routers(model)
    if not biased and not windowed:
        return
    parts = [r.take_pending_load() for r in biased] + [r.take_pending_share() for r in windowed]
    sizes = [r.num_experts for r in biased] + [r.num_experts + 1 for r in windowed]  # shares + their count
    device = (biased + windowed)[0].weight.device  # the model's: NCCL reduces there, without a host copy
    flat = torch.cat([torch.zeros(n, device=device) if part is None else part.to(device, torch.float32)
                      for part, n in zip(parts, sizes)])
    if defer_to_sync():
        dist.all_reduce(flat)
    pieces = flat.split(sizes)
    for router, load_E in zip(biased, pieces):
        rc = router.router_config
        nudge_bias_(router.balance_bias, load_E.to(router.balance_bias), rc.tag_balance_rate, rc.tag_balance_rule)
    for router, piece in zip(windowed, pieces[len(biased):]):
        if float(piece[-1]) > 0:
            router.advance_load_average(piece[:-1] / piece[-1])


# The routers' buffers that balancing changes as the model trains (``bias``, and the windowed loss's
# running load).
BALANCE_BUFFERS = ("balance_bias", "load_average", "load_weight")


def balance_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the balancing buffers of ``model``'s routers (``BALANCE_BUFFERS``), by their names in
    the model: what ``restore_balance_state`` puts back (a training step undone, the second pass of a
    sharpness-aware step)."""
    from moe_gen.routing.router import Router

    return {f"{path}.{name}": b.detach().clone() for path, m in model.named_modules()
            if isinstance(m, Router) for name, b in m.named_buffers(recurse=False) if name in BALANCE_BUFFERS}


def restore_balance_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Puts back ``balance_state``'s copies and drops the loads the routers keep for the next
    ``sync_bias_updates`` (several processes), which the forwards since then added."""
    from moe_gen.routing.router import Router

    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)
    for module in model.modules():
        if isinstance(module, Router):
            module.take_pending_load()
            module.take_pending_share()
