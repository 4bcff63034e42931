"""Dispatch backends: how routed tokens reach their experts and how results come back.

Shape legend: T tokens, D model width, D' expert output width, E experts, K assignment slots per
token, N computed assignments, C slots per expert, G route groups.

Every backend computes the same function for the same ``RouterOutput``:

    y[t] = Σ_k mask[t, k] · weights[t, k] · expert_{ids[t, k]}(x[t])

in three steps that the MoE forward calls in order: ``dispatch`` (arrange inputs for the
experts), ``run`` (compute the experts), ``combine`` (weight and scatter back to tokens).

- ``eager``: per-expert index lists, one FFN call per expert; the oracle the others are
  tested against.
- ``torch``: assignments sorted by expert into contiguous rows, grouped matmuls, weighted
  scatter-add back; the default on CPU and GPU.
- ``grouped``: the ``torch`` layout over every assignment slot, with one grouped GEMM per
  projection (``grouped_mm``) and the rows per expert kept on the device: no host
  synchronisation; meant for GPUs.
- ``einsum``: GShard's one-hot dispatch/combine tensors ``[T, E, C]``; O(T·E·C·D), a reference
  for tests and benchmarks.
- ``merged``: tokens grouped by identical route, each group one dense FFN with merged weights;
  for tag routing (above all at inference).
- ``triton`` (``triton_dispatch.py``): the ``torch`` layout with routing metadata, gather and
  combine as Triton kernels; CUDA, or Triton's interpreter (``TRITON_INTERPRET=1``) for tests.
- ``tutel`` (``tutel_dispatch.py``): tutel's fast dispatch kernels into ``[E, C, D]`` slots that
  moe_gen's router chose; needs tutel installed.

``backend="auto"`` is not a registered backend but a choice made per device at the first call
(``AutoDispatch``): tutel on CUDA when it is installed with its CUDA extension, else triton on
CUDA, else torch; the choice is logged on the ``moe_gen`` logger.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

import torch

from moe_gen.registry import BACKENDS
from moe_gen.routing.output import RouterOutput

__all__ = ["DispatchBackend", "EagerDispatch", "TorchDispatch", "GroupedDispatch", "EinsumDispatch", "MergedDispatch",
           "AutoDispatch", "AUTO_PREFERENCE", "make_backend"]

logger = logging.getLogger("moe_gen")


@dataclasses.dataclass(frozen=True)
class Dispatched:
    """What ``dispatch`` hands to ``run`` and ``combine`` (layout depends on the backend; no
    backend changes it after ``dispatch``)."""

    inputs: Any
    plan: Any


class DispatchBackend:
    """Base class; subclasses register with ``@BACKENDS.register(name)``.

    Class attributes:
        needs_shared_routes: only exact and efficient when routes are shared by tag groups.
        shards_experts: the layer's experts are spread over processes (expert parallelism: the
            all-to-all dispatcher of ``moe_gen.experts.parallel``).
        keeps_plans: ``kept_plan`` / ``keep_plan`` / ``run_kept`` work (a frozen layer's merged backend).
    """

    needs_shared_routes = False
    shards_experts = False
    keeps_plans = False

    @classmethod
    def unavailable_reason(cls, device: torch.device | None = None) -> str | None:
        """Why this backend cannot run on ``device`` (None: on this machine), or None when it can.

        Backends with optional dependencies or device requirements override it; the message names
        what to install or which backend to use instead."""
        return None

    def dispatch(self, x_TD: torch.Tensor, routing: RouterOutput) -> Dispatched:
        raise NotImplementedError

    def run(self, experts, dispatched: Dispatched) -> Any:
        raise NotImplementedError

    def combine(self, outputs: Any, dispatched: Dispatched, x_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sort_assignments(self, routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The computed assignments in expert order, for callers that move rows themselves (expert
        parallelism): flat indices ``t·K + k`` (long ``[N]``, stable within an expert) and the
        rows per expert (long ``[E]``). Backends with a faster permutation override it."""
        flat_N, expert_N = _computed_assignments(routing)
        expert_N, order_N = torch.sort(expert_N, stable=True)
        return flat_N[order_N], torch.bincount(expert_N, minlength=routing.num_experts)


def _computed_assignments(routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (t·K + k) of computed assignments and their experts. Routes kept per tag group
    are read per group (every valid member computes its group's K assignments), without expanding
    them to ``[T, K]`` tensors."""
    groups = routing.groups
    if groups is not None:
        K = groups.ids_GK.shape[1]
        token_V = routing.valid.nonzero().squeeze(1)
        flat = (token_V.unsqueeze(1) * K + torch.arange(K, device=token_V.device)).reshape(-1)
        return flat, groups.ids_GK[groups.group_T[token_V]].reshape(-1)
    flat = routing.mask.reshape(-1).nonzero().squeeze(1)
    return flat, routing.topk_ids.reshape(-1)[flat]


def assignment_weights(routing: RouterOutput, flat_N: torch.Tensor) -> torch.Tensor:
    """Gate weights of the computed assignments at flat indices ``flat_N`` (t·K + k)."""
    groups = routing.groups
    if groups is not None:
        K = groups.ids_GK.shape[1]
        return groups.weights_GK.reshape(-1)[groups.group_T[flat_N // K] * K + flat_N % K]
    return routing.topk_weights.reshape(-1)[flat_N]


@BACKENDS.register("eager")
class EagerDispatch(DispatchBackend):
    """A plain loop over experts: select each expert's tokens, run it, add back weighted."""

    def dispatch(self, x_TD, routing):
        K = routing.topk_ids.shape[1]
        flat, expert_N = _computed_assignments(routing)
        per_expert = []
        for e in range(routing.num_experts):
            chosen = flat[expert_N == e]
            token = chosen // K
            per_expert.append((e, token, routing.topk_weights.reshape(-1)[chosen]))
        inputs = [x_TD[token] for _, token, _ in per_expert]
        return Dispatched(inputs, per_expert)

    def run(self, experts, dispatched):
        return [
            experts.forward_expert(e, x) if x.shape[0] else None
            for (e, _, _), x in zip(dispatched.plan, dispatched.inputs)
        ]

    def combine(self, outputs, dispatched, x_TD):
        y_TD = None
        for (_, token, weight), out in zip(dispatched.plan, outputs):
            if out is None:
                continue
            contribution = out * weight.unsqueeze(1).to(out.dtype)
            if y_TD is None:
                y_TD = contribution.new_zeros(x_TD.shape[0], contribution.shape[1])
            y_TD = y_TD.index_add(0, token, contribution)
        return y_TD


@dataclasses.dataclass
class _SortedPlan:
    token_N: torch.Tensor  # long, source token of each sorted row
    weight_N: torch.Tensor  # fp32 gate weight of each sorted row
    counts: list[int]  # rows per expert


@BACKENDS.register("torch")
class TorchDispatch(DispatchBackend):
    """Sort assignments by expert; gather rows; grouped matmuls; weighted scatter-add back."""

    def dispatch(self, x_TD, routing):
        flat_N, expert_N = _computed_assignments(routing)
        expert_sorted_N, order_N = torch.sort(expert_N, stable=True)
        flat_N = flat_N[order_N]
        counts = torch.bincount(expert_sorted_N, minlength=routing.num_experts).tolist()
        plan = _SortedPlan(flat_N // routing.top_k, assignment_weights(routing, flat_N), counts)
        return Dispatched(x_TD.index_select(0, plan.token_N), plan)

    def run(self, experts, dispatched):
        return experts.forward_sorted(dispatched.inputs, dispatched.plan.counts)

    def combine(self, y_ND, dispatched, x_TD):
        return _weighted_scatter(y_ND, dispatched.plan, x_TD.shape[0])


def _weighted_scatter(y_ND: torch.Tensor, plan, num_tokens: int) -> torch.Tensor:
    """``y[t] = Σ`` over the rows n of token t of ``plan.weight_N[n] · y_ND[n]`` (``plan.token_N``)."""
    weighted_ND = y_ND * plan.weight_N.unsqueeze(1).to(y_ND.dtype)
    # in place on fresh zeros: the out-of-place index_add would copy them first
    return weighted_ND.new_zeros(num_tokens, y_ND.shape[1]).index_add_(0, plan.token_N, weighted_ND)


@dataclasses.dataclass
class _DevicePlan:
    token_N: torch.Tensor  # long [T·K]: the token of each row, rows sorted by expert
    weight_N: torch.Tensor  # gate weight of each row; 0 for an assignment that is not computed
    counts_E: torch.Tensor  # long [E] rows per expert, on the device; the last expert's block ends with
    #                         the rows of assignments not computed (dropped, padding), weighted 0


def _every_slot(routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[T, K]`` expert ids, gate weights and whether each assignment is computed; routes kept per
    tag group are read per token with one gather each (every valid member computes its group's K)."""
    groups = routing.groups
    if groups is None:
        return routing.topk_ids, routing.topk_weights, routing.mask
    ids_TK = groups.ids_GK.index_select(0, groups.group_T)
    return ids_TK, groups.weights_GK.index_select(0, groups.group_T), routing.valid.unsqueeze(1).expand_as(ids_TK)


@BACKENDS.register("grouped")
class GroupedDispatch(DispatchBackend):
    """The ``torch`` backend's layout with every size kept on the device: all T·K assignment slots
    are sorted by expert (those not computed after the last expert's rows, inputs zeroed for
    padding, weight 0), and the experts run one grouped GEMM per projection (torch's
    ``grouped_mm``) from the rows per expert as a tensor. Nothing is read back to the host, so a
    GPU need not wait for the routing before it launches the experts, and a projection is one
    kernel launch instead of one per expert. It computes the slots that capacity dropped (and
    padding) as well, so it does more work than ``torch`` when many are dropped.
    """

    @classmethod
    def unavailable_reason(cls, device=None):
        if not hasattr(torch.nn.functional, "grouped_mm"):
            return f"needs torch.nn.functional.grouped_mm (PyTorch 2.9 or later; this is {torch.__version__})"
        return None

    def dispatch(self, x_TD, routing):
        E = routing.num_experts
        ids_TK, weights_TK, computed_TK = _every_slot(routing)
        K = ids_TK.shape[1]
        key_sorted_N, order_N = torch.sort(torch.where(computed_TK, ids_TK, E).reshape(-1), stable=True)
        ends_E = torch.searchsorted(key_sorted_N, torch.arange(1, E + 1, device=key_sorted_N.device))
        ends_E[-1] = key_sorted_N.shape[0]  # the slots not computed join the last expert's block
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        weight_N = torch.where(computed_TK, weights_TK, 0.0).reshape(-1).index_select(0, order_N)
        plan = _DevicePlan(order_N // K, weight_N, counts_E)
        # padding may hold anything, and 0 · NaN = NaN: its rows go through the last expert as zeros
        x_TD = torch.where(routing.valid.unsqueeze(1), x_TD, 0.0)
        return Dispatched(x_TD.index_select(0, plan.token_N), plan)

    def run(self, experts, dispatched):
        return experts.forward_sorted(dispatched.inputs, dispatched.plan.counts_E)

    def combine(self, y_ND, dispatched, x_TD):
        return _weighted_scatter(y_ND, dispatched.plan, x_TD.shape[0])


@BACKENDS.register("einsum")
class EinsumDispatch(DispatchBackend):
    """GShard's one-hot formulation: dispatch and combine tensors ``[T, E, C]`` and einsums.

    Memory and time grow with T·E·C: a reference for tests and benchmarks, not for training.
    """

    def dispatch(self, x_TD, routing):
        T, K = routing.topk_ids.shape
        E, C = routing.num_experts, max(routing.capacity, 1)
        t_N, k_N = routing.mask.nonzero(as_tuple=True)
        e_N, c_N = routing.topk_ids[t_N, k_N], routing.slot_positions()[t_N, k_N]
        dispatch_TEC = x_TD.new_zeros(T, E, C)
        dispatch_TEC[t_N, e_N, c_N] = 1.0
        combine_TEC = torch.zeros(T, E, C, dtype=routing.topk_weights.dtype, device=x_TD.device)
        combine_TEC = combine_TEC.index_put((t_N, e_N, c_N), routing.topk_weights[t_N, k_N])
        # One-hot products multiply every token by 0 or 1, and 0 · NaN = NaN: padding (which may hold
        # anything) is zeroed first so it cannot leak into expert slots.
        x_TD = torch.where(routing.valid.unsqueeze(1), x_TD, 0.0)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        return Dispatched(x_ECD, combine_TEC)

    def run(self, experts, dispatched):
        return experts.forward_padded(dispatched.inputs)

    def combine(self, y_ECD, dispatched, x_TD):
        return torch.einsum("tec,ecd->td", dispatched.plan.to(y_ECD.dtype), y_ECD)


@dataclasses.dataclass
class _Groups:
    token_N: torch.Tensor | None  # tokens sorted by route; None: every token, in order (none is padding)
    counts: list[int]  # tokens per route
    keys: list[tuple]  # each route as Python numbers (the cache key): (expert ids, gate weights), or
    #                    the expert ids alone when rows of one expert set share a group
    route: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # route r's (expert ids, gate weights)
    # grouped by expert set: each row's tag group, and each group's experts (ascending) and gate
    # weights in that order
    group_N: torch.Tensor | None = None
    sets: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclasses.dataclass
class _KeptPlan:
    """What a frozen layer runs for one set of tag groups (``MergedDispatch.keep_plan``)."""

    merged: tuple  # the merged FFN (``merged_weights`` of the one route, or of the union without gate weights)
    scale_GU: torch.Tensor | None  # union plans: each group's gate weights over the union's experts
    extra_per_row: int  # union plans: multiply-adds per row and projection beyond the groups' own K experts
    # the routes it runs, per tag group and the same for every batch of this set of groups: ids,
    # gate weights, probabilities and logits (``GroupRoutes``' G-row tensors); a call that ran the
    # plan builds its routing from them if someone reads it (``Router.routing_of``)
    routes: tuple = ()


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``t``'s rows at ``index``, or ``t`` itself for None (every row, in order)."""
    return t if index is None else t.index_select(0, index)


def _lexsort_rows(key_TX: torch.Tensor) -> torch.Tensor:
    """A permutation that sorts the rows of ``key_TX`` lexicographically (stable sorts from the
    last column to the first): equal rows end up adjacent. Much cheaper on CPU than
    ``torch.unique(dim=0)``, which compares rows one pair at a time."""
    order = torch.arange(key_TX.shape[0], device=key_TX.device)
    for column in reversed(range(key_TX.shape[1])):
        _, index = torch.sort(key_TX[order, column], stable=True)
        order = order[index]
    return order


_NO_ROUTES = ([], [], lambda r: None)


@BACKENDS.register("merged")
class MergedDispatch(DispatchBackend):
    """Tokens with identical routes run as one group through one dense FFN with merged weights.

    With content-independent routing (modality, task, attribute) every tag group has one route,
    so a layer costs what a dense FFN of k·H hidden units costs, whatever E is; all groups go
    through one grouped matmul call. The gate weights are taken from one member of each group;
    since the route is identical for every member, the router's gradient is the same as the
    unmerged layer's.

    Without autograd (inference), when the router kept its routes per tag group, tag groups that
    use the same *set* of experts share one group even if their gate weights differ: the merged
    FFN is the K experts side by side, and each row's hidden units are scaled by its own gate
    weights (fewer, larger matmuls than one per route). When the batch is small enough that one
    more expert per row costs less than another matmul pair (``UNION_MAX_EXTRA_MACS``), all rows
    run as one group over the union of the experts their groups use, each row's other experts
    weighted 0.

    Merged weights are built on every call, unless the backend keeps them (``cache=True``, set on
    the layers of a model frozen by ``moe_gen.merge_for_inference``, whose weights no longer
    change): then they are kept per route (and stacked per set of routes) until the layer loads a
    state dict or moves.
    """

    needs_shared_routes = True
    MAX_STACKS = 16  # sets of routes whose stacked weights are kept (one per recent batch mix)
    MAX_ROUTES = 256  # routes (or expert sets) whose merged weights are kept
    # inference: rows of several expert sets run as one group over all their experts when that adds
    # at most this many multiply-adds per projection (``_union_allowed``; 0 turns it off)
    UNION_MAX_EXTRA_MACS = 1 << 24

    def __init__(self, cache: bool = False) -> None:
        self.cache = cache
        # weights that do not change: plans per set of tag groups can be kept (a plain attribute, not a
        # property: stacks read it while building a TagBatch, before the layers call into this module)
        self.keeps_plans = cache
        self.reset()

    def dispatch(self, x_TD, routing):
        if routing.groups is not None:
            # grouped in run(), where the experts are known (whether rows of one expert set with
            # different gate weights may share a group); the plan is the routing until then
            return Dispatched(x_TD, routing)
        mask_TK = routing.mask
        has_route_T = mask_TK.any(-1)
        key_TX = torch.cat(
            [torch.where(mask_TK, routing.topk_ids, -1).to(routing.topk_weights.dtype),
             routing.topk_weights.detach()], dim=1,
        )[has_route_T]
        tokens_T = has_route_T.nonzero().squeeze(1)
        if not tokens_T.numel():
            return Dispatched(x_TD[:0], _Groups(tokens_T, *_NO_ROUTES))
        order = _lexsort_rows(key_TX)
        sorted_TX = key_TX[order]
        new_group = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
        new_group[1:] = (sorted_TX[1:] != sorted_TX[:-1]).any(1)
        token_N = tokens_T[order]
        counts = torch.bincount(new_group.cumsum(0) - 1).tolist()
        firsts = torch.cumsum(torch.tensor([0] + counts[:-1]), 0).tolist()
        routes = []
        for first in firsts:
            t = token_N[first]
            keep_K = mask_TK[t]
            routes.append((routing.topk_ids[t][keep_K], routing.topk_weights[t][keep_K]))
        keys = [(tuple(ids.tolist()), tuple(w.tolist())) for ids, w in routes]
        return Dispatched(x_TD.index_select(0, token_N), _Groups(token_N, counts, keys, routes.__getitem__))

    def _group(self, x_TD, routing, by_set: bool, hidden: int = 0):
        """Routes kept per tag group (``RouterOutput.groups``): tokens ordered by one sort of their
        route index (see ``_partition``), or, ``by_set``, all in one group over the union of their
        experts where that is cheaper (``_union_allowed``; ``hidden``: the experts' hidden width).
        Returns the rows in that order and the plan."""
        groups, valid_T = routing.groups, routing.valid
        route_G, route_of_G, carriers, keys, ids_GK, weights_GK = self._partition(groups, by_set)
        counts = [0] * len(keys)
        for r, count in zip(route_of_G, groups.count_G.tolist()):
            counts[r] += count
        N = sum(counts)
        if not N:
            return x_TD[:0], _Groups(x_TD.new_zeros(0, dtype=torch.long), *_NO_ROUTES)
        every = N == x_TD.shape[0]  # no padding: rows in token order need no gather or scatter
        if by_set and len(keys) > 1 and self._union_allowed(x_TD):
            union = self._union(groups)
            extra_macs = N * x_TD.shape[1] * (union[0].numel() - ids_GK.shape[1]) * hidden
            if extra_macs <= self.UNION_MAX_EXTRA_MACS:
                return self._group_as_union(x_TD, routing, union, every)
        if len(keys) == 1:  # one route: the valid tokens in order
            token_N = None if every else valid_T.nonzero().squeeze(1)
        else:  # padding sorts last, with key R (one past the last route)
            _, token_T = torch.sort(torch.where(valid_T, route_G[groups.group_T], len(keys)), stable=True)
            token_N = token_T[:N]
        plan = _Groups(token_N, counts, keys, lambda r: (ids_GK[carriers[r]], weights_GK[carriers[r]]))
        if by_set:
            plan.group_N, plan.sets = _rows(groups.group_T, token_N), (ids_GK, weights_GK)
        return _rows(x_TD, token_N), plan

    def _union_allowed(self, x_TD) -> bool:
        """Whether rows of several expert sets may run as one group through every expert their
        groups use (the union, U experts), each row's unused experts weighted 0.

        The union costs ``N·D·(U − K)·H`` more multiply-adds per projection but replaces a sort,
        a matmul pair per expert set and their bookkeeping by one matmul pair: worth it for small
        batches and models, where launching operations costs more than the arithmetic; ``_group``
        takes it when that extra work is at most ``UNION_MAX_EXTRA_MACS``. Never in float16, where
        an unused expert's hidden units could overflow and 0 · inf would not be 0."""
        device = x_TD.device.type
        return self.UNION_MAX_EXTRA_MACS > 0 and x_TD.dtype != torch.float16 and not (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16)

    def _group_as_union(self, x_TD, routing, union, every: bool):
        """The valid tokens in order as one group over the union of their groups' experts
        (``_union``); each row's gate weights spread over the union, 0 for experts its group does
        not use (see ``_union_allowed``). ``every``: no token is padding."""
        groups = routing.groups
        ids_U, scale_GU, key = union
        token_N = None if every else routing.valid.nonzero().squeeze(1)
        N = x_TD.shape[0] if every else token_N.numel()
        plan = _Groups(token_N, [N], [key], lambda r: (ids_U, None))
        plan.group_N, plan.sets = _rows(groups.group_T, token_N), (ids_U, scale_GU)
        return _rows(x_TD, token_N), plan

    def _union(self, groups):
        """The experts any group uses (ascending, long ``[U]``), each group's gate weights over
        them (``[G, U]``, 0 where the group does not use the expert) and the experts as a route key
        (a tuple of ids, as ``_partition`` names expert sets); kept like ``_partition``."""
        cacheable = self.cache and groups.key is not None and not torch.is_grad_enabled()
        key = ("union", groups.key)
        kept = self._partitions.get(key) if cacheable else None
        if kept is not None:
            return kept
        ids_U = torch.unique(groups.ids_GK)
        column_GK = torch.searchsorted(ids_U, groups.ids_GK)
        scale_GU = groups.weights_GK.new_zeros(groups.ids_GK.shape[0], ids_U.numel()).scatter_(
            1, column_GK, groups.weights_GK)
        union = (ids_U, scale_GU, tuple(ids_U.tolist()))
        if cacheable:
            if len(self._partitions) >= self.MAX_STACKS:
                self._partitions.popitem(last=False)
            self._partitions[key] = union
        return union

    def _partition(self, groups, by_set: bool):
        """Which tag groups share a route (or, ``by_set``, a set of experts): found among the G
        group rows in Python; kept (with ``cache``) for routes that a frozen router took from its
        route cache, named by their set of tag groups (``GroupRoutes.key``).

        Returns ``route_G`` (long tensor), the same as a list, a carrier group per route, the route
        keys, and ids/weights ``[G, K]`` (for ``by_set`` with ascending ids, weights alike)."""
        cacheable = self.cache and groups.key is not None and not torch.is_grad_enabled()
        key = (by_set, groups.key)
        kept = self._partitions.get(key) if cacheable else None
        if kept is not None:
            return kept
        ids_GK, weights_GK = groups.ids_GK, groups.weights_GK
        if by_set:  # one order per set of experts: ascending ids, weights permuted alike
            ids_GK, order_GK = ids_GK.sort(dim=1)
            weights_GK = weights_GK.gather(1, order_GK)
        ids_G = ids_GK.tolist()
        weights_G = None if by_set else weights_GK.detach().tolist()
        route_of: dict[tuple, int] = {}
        route_of_G, carriers = [], []
        for g in range(len(ids_G)):
            route = tuple(ids_G[g]) if by_set else (tuple(ids_G[g]), tuple(weights_G[g]))
            r = route_of.setdefault(route, len(route_of))
            if r == len(carriers):
                carriers.append(g)
            route_of_G.append(r)
        route_G = torch.tensor(route_of_G, dtype=torch.long, device=ids_GK.device)
        partition = (route_G, route_of_G, carriers, list(route_of), ids_GK, weights_GK)
        if cacheable:
            if len(self._partitions) >= self.MAX_STACKS:
                self._partitions.popitem(last=False)
            self._partitions[key] = partition
        return partition

    def __getstate__(self):
        # copies and pickles start with nothing kept (another thread's infer may be adding to it)
        state = dict(self.__dict__)
        for name in ("_cache", "_stacks", "_partitions", "_plans"):
            state[name] = collections.OrderedDict()
        return state

    def reset(self) -> None:
        """Drops what ``cache`` kept (the layer loaded new weights or moved)."""
        # oldest first; an OrderedDict's popitem(last=False) evicts in one step, so threads sharing
        # a layer in merged_in_place never evict the same entry twice
        self._cache = collections.OrderedDict()  # route key → merged weights
        self._stacks = collections.OrderedDict()  # tuple of route keys → those routes' merged weights, stacked
        self._partitions = collections.OrderedDict()  # (by_set, set of tag groups) → which groups share a route
        self._plans = collections.OrderedDict()  # set of tag groups (TagBatch.group_keys) → _KeptPlan

    def kept_plan(self, batch) -> _KeptPlan | None:
        """The plan kept for ``batch``'s set of tag groups (``keep_plan``); None when there is none
        or autograd is on."""
        return None if torch.is_grad_enabled() else self._plans.get(batch.group_keys)

    def keep_plan(self, experts, x_TD, routing, batch) -> _KeptPlan | None:
        """Keeps, for ``batch``'s set of tag groups, what ``run_kept`` needs to run them without
        the router or the grouping above (``cache`` only, without autograd, routes kept per tag
        group): one merged FFN with the gate weights folded in when every group has the same
        route, else (experts that merge sets of experts) one FFN over the union of the groups'
        experts with each group's gate weights over it. Returns the new plan; None when it keeps
        none (also when one was kept already: ``run_kept`` declined that one for this batch)."""
        groups = routing.groups
        if not (self.cache and groups is not None and groups.key is not None and batch.group_keys == groups.key
                and not torch.is_grad_enabled()):
            return None
        if groups.key in self._plans:
            return None
        ids_GK, weights_GK = groups.ids_GK, groups.weights_GK
        if bool((ids_GK == ids_GK[:1]).all() and (weights_GK == weights_GK[:1]).all()):
            key = (tuple(ids_GK[0].tolist()), tuple(weights_GK[0].tolist()))
            plan = _KeptPlan(self._merged(experts, False, key, ids_GK[0], weights_GK[0]), None, 0)
        elif experts.merges_expert_sets:
            ids_U, scale_GU, key = self._union(groups)
            extra_per_row = experts.d_model * (ids_U.numel() - ids_GK.shape[1]) * experts.d_hidden
            if int(routing.valid.sum()) * extra_per_row > self.UNION_MAX_EXTRA_MACS or not self._union_allowed(x_TD):
                return None  # batches of this size do not run as the union: keep nothing
            plan = _KeptPlan(self._merged(experts, True, key, ids_U, None), scale_GU, extra_per_row)
        else:
            return None
        plan.routes = (groups.ids_GK, groups.weights_GK, groups.probs_GE, groups.logits_GE)
        if len(self._plans) >= self.MAX_STACKS:
            self._plans.popitem(last=False)
        self._plans[groups.key] = plan
        return plan

    def run_kept(self, experts, x_TD, batch, plan: _KeptPlan | None = None) -> torch.Tensor | None:
        """The experts' output ``[T, D']`` for ``batch``'s tokens from ``plan`` (default: the one
        kept for its set of tag groups, ``kept_plan``), padding rows zero (only the valid rows are
        computed); None when (no ``plan`` given) none is kept for them or autograd is on, or (union
        plans) the batch is too large for the union (``_union_allowed``). A given ``plan`` is one
        ``kept_plan`` or ``keep_plan`` returned, under the same autograd mode."""
        if plan is None:
            plan = self.kept_plan(batch)
            if plan is None:
                return None
        if batch.valid_rows is not None:  # found once for the batch's layers
            token_N, group_N = batch.valid_rows
        else:
            token_N, group_N = batch.valid.nonzero().squeeze(1), None
            if token_N.numel() == x_TD.shape[0]:
                token_N = None
        # token_N None: no padding, every row in order
        N = x_TD.shape[0] if token_N is None else token_N.numel()
        if N == 0:  # every token is padding (in the dtype the experts would have computed in)
            from moe_gen.experts.experts import _autocast_dtype

            return x_TD.new_zeros(x_TD.shape[0], experts.d_out, dtype=_autocast_dtype(x_TD))
        if plan.scale_GU is not None and (N * plan.extra_per_row > self.UNION_MAX_EXTRA_MACS
                                          or not self._union_allowed(x_TD)):
            return None
        x_ND = _rows(x_TD, token_N)
        if plan.scale_GU is None:  # one route for every group: a dense FFN
            y_ND = experts.run_merged(x_ND, plan.merged)
        else:
            group_N = _rows(batch.group_ids, token_N) if group_N is None else group_N
            y_ND = experts.run_merged(x_ND, plan.merged, plan.scale_GU.index_select(0, group_N))
        if token_N is None:
            return y_ND
        return y_ND.new_zeros(x_TD.shape[0], y_ND.shape[1]).index_copy_(0, token_N, y_ND)

    def run(self, experts, dispatched):
        """The merged FFNs on the grouped rows; returns ``(outputs, groups)``: the grouping of
        routes kept per tag group is made here (``dispatch`` cannot know whether the experts merge
        sets of experts), so ``combine`` takes it from the result, and ``dispatched`` is left as
        it was."""
        no_grad = not torch.is_grad_enabled()
        inputs, groups = dispatched.inputs, dispatched.plan
        if isinstance(groups, RouterOutput):  # routes kept per tag group: grouped now
            # (one tag group, as in most decoding steps: its gate weights fold into the merged weights)
            by_set = no_grad and experts.merges_expert_sets and groups.groups.ids_GK.shape[0] > 1
            inputs, groups = self._group(inputs, groups, by_set, experts.d_hidden if by_set else 0)
        if not groups.counts:
            return None, groups
        by_set = groups.sets is not None
        if self.cache and no_grad:
            stacked = self._kept_weights(experts, groups, by_set)
        else:
            routes = (groups.route(r) for r in range(len(groups.counts)))
            stacked = experts.stack_merged([experts.merged_weights(ids_K, None if by_set else weights_K)
                                            for ids_K, weights_K in routes])
        if not by_set:
            return experts.forward_merged_groups(inputs, groups.counts, stacked), groups
        weights_GK = groups.sets[1]
        return experts.forward_merged_sets(inputs, groups.counts, stacked, weights_GK[groups.group_N]), groups

    def _kept_weights(self, experts, groups, by_set: bool):
        """The stacked merged weights of ``groups``' routes, from what ``cache`` kept (built and
        kept on first use)."""
        stack_key = (by_set, tuple(groups.keys))
        stacked = self._stacks.get(stack_key)
        if stacked is None:
            merged = []
            for r, key in enumerate(groups.keys):
                ids_K, weights_K = groups.route(r)
                merged.append(self._merged(experts, by_set, key, ids_K, weights_K))
            if len(self._stacks) >= self.MAX_STACKS:  # batches of other task mixes: forget the oldest
                self._stacks.popitem(last=False)
            stacked = self._stacks[stack_key] = experts.stack_merged(merged)
        return stacked

    def _merged(self, experts, by_set: bool, key: tuple, ids_K, weights_K):
        """The merged weights of one route (``by_set``: of one set of experts, without gate
        weights), from what ``cache`` kept under ``key`` (built and kept on first use)."""
        merged = self._cache.get((by_set, key))
        if merged is None:
            if len(self._cache) >= self.MAX_ROUTES:  # many tag groups over time: forget the oldest
                self._cache.popitem(last=False)
            merged = self._cache[by_set, key] = experts.merged_weights(ids_K, None if by_set else weights_K)
        return merged

    def combine(self, outputs, dispatched, x_TD):
        y_ND, groups = outputs
        if y_ND is None:
            return None
        if groups.token_N is None:  # every token, in order
            return y_ND
        # every token is in one group at most: a copy, not an accumulation
        return y_ND.new_zeros(x_TD.shape[0], y_ND.shape[1]).index_copy_(0, groups.token_N, y_ND)


# backend="auto": the first registered backend that can run on the input's device, by device type.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("tutel", "triton", "torch")}
_AUTO_FALLBACK = "torch"


class AutoDispatch(DispatchBackend):
    """``backend="auto"``: picks a concrete backend for the device of the first input it sees.

    On CUDA: ``tutel`` if importable with its CUDA extension, else ``triton``, else ``torch``;
    elsewhere ``torch``. Resolving at the first call (not at construction) follows the layer when
    it is built on CPU and moved to a GPU afterwards. The choice is made once per device type and
    logged on the ``moe_gen`` logger (INFO) with the reasons the preferred backends were passed over.
    """

    def __init__(self) -> None:
        self._chosen: dict[str, DispatchBackend] = {}
        self.chosen: dict[str, str] = {}  # device type → name of the backend chosen for it

    def resolve(self, device: torch.device) -> DispatchBackend:
        """The backend used for tensors on ``device`` (chosen and logged on first use)."""
        device_type = torch.device(device).type
        if device_type not in self._chosen:
            skipped = []
            for name in AUTO_PREFERENCE.get(device_type, (_AUTO_FALLBACK,)):
                if name not in BACKENDS:
                    skipped.append(f"{name}: not registered")
                    continue
                reason = BACKENDS.get(name).unavailable_reason(device)
                if reason is None:
                    break
                skipped.append(f"{name}: {reason}")
            else:
                name = _AUTO_FALLBACK
            self._chosen[device_type] = BACKENDS.get(name)()
            self.chosen[device_type] = name
            logger.info("MoE backend 'auto' uses %r for %s tensors%s", name, device_type,
                        "".join(f"; skipped {s}" for s in skipped))
        return self._chosen[device_type]

    # The backend chosen for the device of the tensors at hand does each step (the chosen backend
    # is looked up per call, not carried in the plan).
    def dispatch(self, x_TD, routing):
        return self.resolve(x_TD.device).dispatch(x_TD, routing)

    def run(self, experts, dispatched):
        return self.resolve(_device_of(experts)).run(experts, dispatched)

    def combine(self, outputs, dispatched, x_TD):
        return self.resolve(x_TD.device).combine(outputs, dispatched, x_TD)

    def sort_assignments(self, routing):
        return self.resolve(routing.topk_ids.device).sort_assignments(routing)


def _device_of(module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def make_backend(name: str) -> DispatchBackend:
    """A new dispatch backend by name: a registered one, or ``"auto"`` (``AutoDispatch``).

    Raises:
        ValueError: unknown name (the known ones listed), or a backend that cannot run on this
            machine (what to install, and the alternative).
    """
    if name == "auto":
        return AutoDispatch()
    try:
        cls = BACKENDS.get(name)
    except ValueError as exc:
        raise ValueError(f"{exc}; or 'auto' (chosen by device)") from None
    return cls()
