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

import dataclasses
import logging
from typing import Any

import torch

from moe_gen.registry import BACKENDS
from moe_gen.routing.router import RouterOutput

__all__ = ["DispatchBackend", "EagerDispatch", "TorchDispatch", "EinsumDispatch", "MergedDispatch", "AutoDispatch",
           "AUTO_PREFERENCE", "make_backend"]

logger = logging.getLogger("moe_gen")


@dataclasses.dataclass
class Dispatched:
    """What ``dispatch`` hands to ``run`` and ``combine`` (layout depends on the backend)."""

    inputs: Any
    plan: Any


class DispatchBackend:
    """Base class; subclasses register with ``@BACKENDS.register(name)``.

    Class attributes:
        needs_shared_routes: only exact and efficient when routes are shared by tag groups.
    """

    needs_shared_routes = False

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
    """Flat indices (t·K + k) of computed assignments and their experts."""
    flat = routing.mask.reshape(-1).nonzero().squeeze(1)
    return flat, routing.topk_ids.reshape(-1)[flat]


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
        K = routing.topk_ids.shape[1]
        flat_N, expert_N = _computed_assignments(routing)
        expert_sorted_N, order_N = torch.sort(expert_N, stable=True)
        flat_N = flat_N[order_N]
        counts = torch.bincount(expert_sorted_N, minlength=routing.num_experts).tolist()
        plan = _SortedPlan(flat_N // K, routing.topk_weights.reshape(-1)[flat_N], counts)
        return Dispatched(x_TD.index_select(0, plan.token_N), plan)

    def run(self, experts, dispatched):
        return experts.forward_sorted(dispatched.inputs, dispatched.plan.counts)

    def combine(self, y_ND, dispatched, x_TD):
        plan = dispatched.plan
        weighted_ND = y_ND * plan.weight_N.unsqueeze(1).to(y_ND.dtype)
        return weighted_ND.new_zeros(x_TD.shape[0], y_ND.shape[1]).index_add(0, plan.token_N, weighted_ND)


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
    token_N: torch.Tensor  # tokens sorted by group
    counts: list[int]  # tokens per group
    routes: list[tuple[torch.Tensor, torch.Tensor]]  # (expert ids, gate weights) of each group


def _lexsort_rows(key_TX: torch.Tensor) -> torch.Tensor:
    """A permutation that sorts the rows of ``key_TX`` lexicographically (stable sorts from the
    last column to the first): equal rows end up adjacent. Much cheaper on CPU than
    ``torch.unique(dim=0)``, which compares rows one pair at a time."""
    order = torch.arange(key_TX.shape[0], device=key_TX.device)
    for column in reversed(range(key_TX.shape[1])):
        _, index = torch.sort(key_TX[order, column], stable=True)
        order = order[index]
    return order


@BACKENDS.register("merged")
class MergedDispatch(DispatchBackend):
    """Tokens with identical routes run as one group through one dense FFN with merged weights.

    With content-independent routing (modality, task, attribute) every tag group has one route,
    so a layer costs what a dense FFN of k·H hidden units costs, whatever E is; all groups go
    through one grouped matmul call. The gate weights are taken from one member of each group;
    since the route is identical for every member, the router's gradient is the same as the
    unmerged layer's. Without autograd (inference) the merged weights are cached per route and
    rebuilt when the expert parameters change through autograd-visible in-place ops (optimizer
    steps, ``copy_``, ``load_state_dict``); writes through ``param.data`` bypass that check, so call
    ``clear_cache()`` after them.
    """

    needs_shared_routes = True

    def __init__(self) -> None:
        self._cache: dict = {}
        self._cache_stamp = None

    def dispatch(self, x_TD, routing):
        if routing.group_T is not None:
            return self._dispatch_groups(x_TD, routing)
        mask_TK = routing.mask
        has_route_T = mask_TK.any(-1)
        key_TX = torch.cat(
            [torch.where(mask_TK, routing.topk_ids, -1).to(routing.topk_weights.dtype),
             routing.topk_weights.detach()], dim=1,
        )[has_route_T]
        tokens_T = has_route_T.nonzero().squeeze(1)
        if not tokens_T.numel():
            return Dispatched(x_TD[:0], _Groups(tokens_T, [], []))
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
        return Dispatched(x_TD.index_select(0, token_N), _Groups(token_N, counts, routes))

    def _dispatch_groups(self, x_TD, routing):
        """The router shared one route per tag group (``group_T``): routes are compared over the G
        group rows only, and tokens are ordered by a single sort of their route index."""
        first_G, group_T = routing.group_first_G, routing.group_T
        mask_GK, ids_GK = routing.mask[first_G], routing.topk_ids[first_G]
        weights_GK = routing.topk_weights[first_G]
        key_GX = torch.cat([torch.where(mask_GK, ids_GK, -1).to(weights_GK.dtype), weights_GK.detach()], dim=1)
        order_G = _lexsort_rows(key_GX)
        sorted_GX = key_GX[order_G]
        new_route = torch.ones(order_G.numel(), dtype=torch.bool, device=order_G.device)
        new_route[1:] = (sorted_GX[1:] != sorted_GX[:-1]).any(1)
        route_G = torch.empty_like(order_G)
        route_G[order_G] = new_route.cumsum(0) - 1
        has_route_T = routing.mask.any(-1)
        route_T = torch.where(has_route_T, route_G[group_T], -1)
        sorted_route_N, token_N = torch.sort(route_T, stable=True)
        token_N = token_N[sorted_route_N >= 0]
        if not token_N.numel():
            return Dispatched(x_TD[:0], _Groups(token_N, [], []))
        counts_R = torch.bincount(route_T[has_route_T], minlength=int(new_route.sum()))
        carrier_R = order_G[new_route]  # a group row carrying each route
        routes, counts = [], []
        for r, count in enumerate(counts_R.tolist()):
            if count:
                g = carrier_R[r]
                keep_K = mask_GK[g]
                routes.append((ids_GK[g][keep_K], weights_GK[g][keep_K]))
                counts.append(count)
        return Dispatched(x_TD.index_select(0, token_N), _Groups(token_N, counts, routes))

    def clear_cache(self) -> None:
        """Drops the cached merged weights (needed after writes through ``param.data``)."""
        self._cache, self._cache_stamp = {}, None

    def _merged(self, experts, ids_K, weights_K):
        if torch.is_grad_enabled():
            return experts.merged_weights(ids_K, weights_K)
        key = (tuple(ids_K.tolist()), tuple(weights_K.tolist()))
        if key not in self._cache:
            self._cache[key] = experts.merged_weights(ids_K, weights_K)
        return self._cache[key]

    def run(self, experts, dispatched):
        groups = dispatched.plan
        if not groups.counts:
            return None
        if not torch.is_grad_enabled():
            # the cache is valid while the expert parameters are the same tensors at the same version
            stamp = tuple((p.data_ptr(), p._version) for p in experts.parameters())
            if stamp != self._cache_stamp:
                self._cache, self._cache_stamp = {}, stamp
        merged = [self._merged(experts, ids, weights) for ids, weights in groups.routes]
        return experts.forward_merged_groups(dispatched.inputs, groups.counts, merged)

    def combine(self, outputs, dispatched, x_TD):
        if outputs is None:
            return None
        return outputs.new_zeros(x_TD.shape[0], outputs.shape[1]).index_add(0, dispatched.plan.token_N, outputs)


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

    def dispatch(self, x_TD, routing):
        backend = self.resolve(x_TD.device)
        return Dispatched(backend.dispatch(x_TD, routing), backend)

    def run(self, experts, dispatched):
        return dispatched.plan.run(experts, dispatched.inputs)

    def combine(self, outputs, dispatched, x_TD):
        return dispatched.plan.combine(outputs, dispatched.inputs, x_TD)

    def sort_assignments(self, routing):
        return self.resolve(routing.topk_ids.device).sort_assignments(routing)


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
