"""The routing contract: what a router decides, as typed values (``RouterOutput``, with the routes
of content-independent strategies kept per tag group in ``GroupRoutes``).

Shape legend: T tokens (flattened, padding included), E experts, K assignment slots per token, G
tag groups.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe_gen.routing.capacity import slot_positions

__all__ = ["GroupRoutes", "RouterOutput"]


@dataclasses.dataclass
class GroupRoutes:
    """A content-independent routing decision kept per tag group, not per token.

    Every member of tag group g has group g's route, so G rows say everything that the ``[T, ...]``
    tensors of ``RouterOutput`` say; consumers that can work per group (merged dispatch, the
    z-loss) never expand them to tokens.

    Attributes:
        group_T: long ``[T]`` tag group of each token.
        ids_GK: long ``[G, K]`` the group's experts.
        weights_GK: float32 ``[G, K]`` the gate weight every valid member gets.
        probs_GE, logits_GE: float32 ``[G, E]`` the group's router probabilities and logits.
        count_G: long ``[G]`` valid (non-padding) members of each group.
        key: the set of tag groups these routes belong to (``TagBatch.group_keys``) when they come
            from a frozen router's route cache, where the same key always means the same routes
            (merged dispatch caches its grouping by it); None otherwise.
    """

    group_T: torch.Tensor
    ids_GK: torch.Tensor
    weights_GK: torch.Tensor
    probs_GE: torch.Tensor
    logits_GE: torch.Tensor
    count_G: torch.Tensor
    key: Optional[tuple[int, ...]] = None


class RouterOutput:
    """What the router decided, typed.

    Attributes:
        topk_ids: long ``[T, K]`` expert of each assignment.
        topk_weights: float32 ``[T, K]`` gate weight; 0 for dropped or absent assignments.
        mask: bool ``[T, K]`` the assignment is computed (chosen, valid token, within capacity).
        positions: long ``[T, K]`` slot of the assignment in its expert (for padded layouts);
            None for dropless routing until ``slot_positions()`` computes it (only padded layouts
            need it, and it costs a sort).
        capacity: slots per expert (for dropless: the largest expert load in this call, which
            may be given as None and is then computed from ``expert_counts`` when first read:
            reading it waits for the device, which the ``torch`` and ``grouped`` backends never do).
        probs: float32 ``[T, E]`` router probabilities (zero rows for padding); per-expert
            affinities in (0, 1) with ``RouterConfig.score="sigmoid"``, which need not sum to 1.
        logits: float32 ``[T, E]`` router logits, before noise.
        valid: bool ``[T]`` real tokens (not padding).
        expert_counts: long ``[E]`` assignments each expert computes (after drops).
        num_experts, top_k: E and K.
        dropped_assignments: long scalar, assignments dropped by capacity (or not picked by any
            expert, for expert choice counted per token below).
        dropped_tokens: long scalar, valid tokens with no computed assignment: their MoE output is
            zero and they continue on the residual path.
        content_dependent: whether routes depend on the hidden state (False for tag routing).
        balanced_by_construction: the gate balances load itself (no balance loss applies).
        learned_gate: the gate projection is trained (False for the hash gate: no z-loss).
        groups: ``GroupRoutes`` when every member of a tag group shares one route (content-
            independent strategies, row-wise gates, dropless); then the per-token tensors above
            (ids, weights, mask, probs, logits) and the expert counts and capacity are computed
            from the group rows on first access only, and may be left out of the constructor.
    """

    def __new__(cls, **kwargs):
        # routes kept per tag group: the subclass that expands the per-token tensors on first read
        if cls is RouterOutput and kwargs.get("groups") is not None:
            cls = _GroupedRouterOutput
        return super().__new__(cls)

    def __init__(
        self,
        *,
        valid: torch.Tensor,
        dropped_assignments: torch.Tensor,
        dropped_tokens: torch.Tensor,
        content_dependent: bool,
        balanced_by_construction: bool,
        learned_gate: bool,
        capacity: Optional[int] = None,
        expert_counts: Optional[torch.Tensor] = None,
        topk_ids: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        probs: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
        groups: Optional[GroupRoutes] = None,
    ) -> None:
        given = dict(topk_ids=topk_ids, topk_weights=topk_weights, mask=mask, probs=probs, logits=logits,
                     expert_counts=expert_counts)
        if groups is None and any(v is None for v in given.values()):
            missing = [k for k, v in given.items() if v is None]
            raise ValueError(f"RouterOutput needs {', '.join(missing)} (or groups= to expand them from)")
        if groups is None:  # plain attributes; capacity None (dropless) is read from the counts when asked for
            for name, value in given.items():
                setattr(self, name, value)
            self._capacity = capacity
        else:  # _GroupedRouterOutput: what is not given is expanded from the groups when read
            given["capacity"] = capacity
            self._tensors = {k: v for k, v in given.items() if v is not None}
        self.positions = positions
        self.valid = valid
        self.dropped_assignments = dropped_assignments
        self.dropped_tokens = dropped_tokens
        self.content_dependent = content_dependent
        self.balanced_by_construction = balanced_by_construction
        self.learned_gate = learned_gate
        self.groups = groups
        # experts and assignment slots per token, as plain numbers
        self.num_experts = (groups.probs_GE if groups is not None else probs).shape[1]
        self.top_k = (groups.ids_GK if groups is not None else topk_ids).shape[1]

    @property
    def capacity(self) -> int:
        """Slots per expert; for dropless routing the largest expert load (read when first asked for)."""
        if self._capacity is None:
            self._capacity = int(self.expert_counts.max()) if self.expert_counts.numel() else 0
        return self._capacity

    def slot_positions(self) -> torch.Tensor:
        """``positions``, computed in token order on first use when routing was dropless."""
        if self.positions is None:
            self.positions, _ = slot_positions(self.topk_ids, self.mask, self.num_experts)
        return self.positions

    def __repr__(self) -> str:
        T, K = self.valid.shape[0], self.top_k
        grouped = "" if self.groups is None else f", {self.groups.ids_GK.shape[0]} tag groups"
        return f"RouterOutput(T={T}, K={K}, E={self.num_experts}, capacity={self.capacity}{grouped})"


class _GroupedRouterOutput(RouterOutput):
    """A ``RouterOutput`` whose routes are kept per tag group (``groups``): its per-token tensors,
    expert counts and capacity are computed from the group rows on first read."""

    def _expanded(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            g, valid_T1 = self.groups, self.valid.unsqueeze(1)
            if name == "topk_ids":
                value = g.ids_GK[g.group_T]
            elif name == "mask":
                value = valid_T1.expand(-1, g.ids_GK.shape[1]).contiguous()
            elif name == "topk_weights":
                value = torch.where(valid_T1, g.weights_GK[g.group_T], 0.0)
            elif name == "probs":
                value = torch.where(valid_T1, g.probs_GE[g.group_T], 0.0)
            elif name == "logits":
                value = g.logits_GE[g.group_T]
            elif name == "expert_counts":
                E, K = g.probs_GE.shape[1], g.ids_GK.shape[1]
                value = torch.zeros(E, dtype=torch.long, device=g.ids_GK.device).index_add_(
                    0, g.ids_GK.reshape(-1), g.count_G.repeat_interleave(K))
            else:  # capacity (dropless: the largest expert load)
                value = int(self.expert_counts.max())
            self._tensors[name] = value
        return self._tensors[name]

    topk_ids = property(lambda self: self._expanded("topk_ids"))
    topk_weights = property(lambda self: self._expanded("topk_weights"))
    mask = property(lambda self: self._expanded("mask"))
    probs = property(lambda self: self._expanded("probs"))
    logits = property(lambda self: self._expanded("logits"))
    expert_counts = property(lambda self: self._expanded("expert_counts"))
    capacity = property(lambda self: self._expanded("capacity"))
