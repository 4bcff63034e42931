"""Gates: from router scores to expert assignments.

Shape legend: T tokens, E experts, K assignment slots per token (top_k; E for expert choice).

Every gate returns a ``GateChoice`` in the same token-major layout ``[T, K]``: expert ids, gate
weights, and a mask of the assignments that exist. Padding tokens (``valid_T`` False) never get
an assignment. All arithmetic here is fp32: the router decides in fp32 even under bf16 autocast
because top-k over bf16 logits has many ties and the softmax loses the small probabilities.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.optimize
import torch

from moe_gen.config import MoEConfig
from moe_gen.registry import GATES
from moe_gen.routing.capacity import capacity_for

__all__ = ["GateChoice", "Gate", "TopKGate", "ExpertChoiceGate", "BalancedGate", "HashGate"]


@dataclasses.dataclass
class GateChoice:
    """Assignments chosen by a gate, before any capacity limit.

    Attributes:
        ids_TK: long, expert of each assignment.
        weights_TK: float32, gate weight of each assignment (0 where ``mask_TK`` is False).
        mask_TK: bool, assignment exists (valid token and chosen).
        positions_TK: long slot of each assignment in its expert, when the gate fixes it
            (expert choice); ``None`` lets the capacity step assign slots.
        capacity: slots per expert when the gate enforces its own capacity, else ``None``.
    """

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    mask_TK: torch.Tensor
    positions_TK: torch.Tensor | None = None
    capacity: int | None = None


class Gate:
    """A gate: ``choose(scores_TE, probs_TE, valid_T, ...) -> GateChoice``.

    Args:
        config: the layer's ``MoEConfig`` (experts, k, and the gate settings of its router).

    Class attributes:
        balanced_by_construction: the gate balances expert load itself, so a token-count balance
            loss has nothing to do (expert choice, BASE assignment) or no parameters to act on
            (hash).
        learned: whether the gate has a trainable projection (the hash gate does not).
        rowwise: each token's choice depends on its own scores only (top-k, hash), so tokens with
            identical scores can share one decision; False for gates that weigh tokens against
            each other (expert choice, balanced assignment).
        rowwise_in_eval: the same in eval mode (``training=False``): True where ``rowwise`` is, and
            for the balanced gate, which picks each token's best expert at inference.
        k_per_valid_row: where it decides row by row, every valid row gets all its K assignments
            (the router then keeps the routes per tag group without reading the mask back to
            check); False makes the router check.
    """

    balanced_by_construction = False
    learned = True
    rowwise = False
    rowwise_in_eval = False
    k_per_valid_row = False

    def __init__(self, config: MoEConfig) -> None:
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.normalize = config.normalize_gates

    def choose(
        self,
        scores_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        valid_T: torch.Tensor,
        *,
        capacity_factor: float | None,
        training: bool,
    ) -> GateChoice:
        """Args:
            scores_TE: fp32 scores used to *select* experts (logits, possibly with noise).
            probs_TE: fp32 router probabilities that become the gate *weights*.
            valid_T: bool, False for padding.
            capacity_factor: the layer's capacity factor (``None`` = dropless).
            training: module mode (BASE assigns in training and picks greedily at inference).
        """
        raise NotImplementedError


@GATES.register("topk")
class TopKGate(Gate):
    """Top-k (Shazeer 2017; GShard k=2; Switch k=1; Mixtral k=2 renormalised; DeepSeek-V3 k=8 of
    256 sigmoid affinities within the 4 best of 8 groups, renormalised and scaled by 2.5).

    The k best selection scores pick the experts; their weights are the router probabilities,
    optionally renormalised over the k and multiplied by ``RouterConfig.weight_scale``. With
    ``RouterConfig.expert_groups`` > 1 only the experts of each token's ``topk_groups`` best groups
    can be picked.
    """

    rowwise = rowwise_in_eval = k_per_valid_row = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.scale = config.router.weight_scale
        self.expert_groups = config.router.expert_groups
        self.topk_groups = config.router.topk_groups

    def choose(self, scores_TE, probs_TE, valid_T, *, capacity_factor, training):
        if self.expert_groups > 1:
            scores_TE = self._within_best_groups(scores_TE)
        ids_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, ids_TK)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale
        mask_TK = valid_T.unsqueeze(1).expand_as(ids_TK)
        return GateChoice(ids_TK, torch.where(mask_TK, weights_TK, 0.0), mask_TK)

    def _within_best_groups(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The scores with -inf outside each token's ``topk_groups`` best expert groups (G groups
        of M experts). A group scores the sum of its two best experts, as in DeepSeek-V3: one
        strong expert alone does not make a group worth a token's traffic."""
        T, E = scores_TE.shape
        G = self.expert_groups
        scores_TGM = scores_TE.reshape(T, G, E // G)
        group_scores_TG = scores_TGM.topk(min(2, E // G), dim=-1).values.sum(-1)
        best_TG = group_scores_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=scores_TE.device).scatter_(1, best_TG, True)
        return scores_TGM.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


@GATES.register("expert_choice")
class ExpertChoiceGate(Gate):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its C highest-probability tokens.

    C = min(N, max(min_capacity, ceil(f·k·N/E))) for N valid tokens (f = capacity factor, 1 when
    dropless is asked for, since expert choice has a fixed capacity by definition; the floor
    ``MoEConfig.min_capacity`` as for every other gate). A token may get 0..E experts, so the
    assignment layout is ``[T, E]`` with ``ids[t, e] = e``; tokens no expert picks are dropped and
    counted like capacity drops.
    """

    balanced_by_construction = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.min_capacity = config.min_capacity

    def choose(self, scores_TE, probs_TE, valid_T, *, capacity_factor, training):
        T, E = probs_TE.shape
        num_valid = int(valid_T.sum())
        factor = 1.0 if capacity_factor is None else capacity_factor
        capacity = min(num_valid, capacity_for(num_valid, self.top_k, E, factor, self.min_capacity))
        # Padding scores -1 (< any probability) so no expert picks padding while valid tokens remain.
        affinity_TE = torch.where(valid_T.unsqueeze(1), probs_TE, -1.0)
        chosen_CE = affinity_TE.topk(capacity, dim=0).indices
        mask_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device)
        positions_TE = torch.zeros(T, E, dtype=torch.long, device=probs_TE.device)
        expert_CE = torch.arange(E, device=probs_TE.device).expand(capacity, E)
        slot_CE = torch.arange(capacity, device=probs_TE.device).unsqueeze(1).expand(capacity, E)
        mask_TE[chosen_CE, expert_CE] = True
        positions_TE[chosen_CE, expert_CE] = slot_CE
        ids_TE = torch.arange(E, device=probs_TE.device).expand(T, E)
        weights_TE = torch.where(mask_TE, probs_TE, 0.0)
        return GateChoice(ids_TE, weights_TE, mask_TE, positions_TE, capacity)


@GATES.register("balanced")
class BalancedGate(Gate):
    """BASE layers (Lewis et al. 2021): a balanced linear assignment of tokens to experts.

    In training, tokens are assigned to experts to maximise the summed router scores subject to
    every expert taking at most ceil(N/E) tokens (``scipy.optimize.linear_sum_assignment`` on the
    score matrix with each expert repeated per slot). At inference each token takes its best
    expert, as BASE does. One expert per token; the weight is that expert's router probability,
    so gradients reach the router. The assignment costs O(N³): fine for the token counts of a
    CPU step, not for very long sequences.
    """

    balanced_by_construction = True
    rowwise_in_eval = k_per_valid_row = True  # (at inference each token takes its best expert)

    def __init__(self, config: MoEConfig) -> None:
        if config.top_k != 1:
            raise ValueError(
                f"the balanced gate assigns exactly one expert per token (BASE layers); "
                f"got top_k={config.top_k}, use top_k=1"
            )
        super().__init__(config)

    def choose(self, scores_TE, probs_TE, valid_T, *, capacity_factor, training):
        T, E = scores_TE.shape
        ids_T = scores_TE.argmax(-1)
        valid_ids = valid_T.nonzero().squeeze(1)
        if training and valid_ids.numel():
            n = valid_ids.numel()
            slots = math.ceil(n / E)
            score_NE = scores_TE[valid_ids].detach().double().cpu().numpy()
            # Columns: expert e repeated `slots` times, so column j is expert j // slots.
            profit = np.repeat(score_NE, slots, axis=1)
            rows, cols = scipy.optimize.linear_sum_assignment(profit, maximize=True)
            assigned = torch.as_tensor(cols // slots, dtype=torch.long, device=scores_TE.device)
            ids_T = ids_T.clone()
            ids_T[valid_ids[torch.as_tensor(rows, device=scores_TE.device)]] = assigned
        ids_TK = ids_T.unsqueeze(1)
        mask_TK = valid_T.unsqueeze(1)
        weights_TK = torch.where(mask_TK, probs_TE.gather(1, ids_TK), 0.0)
        return GateChoice(ids_TK, weights_TK, mask_TK)


@GATES.register("hash")
class HashGate(Gate):
    """A fixed router for tests and baselines: a frozen random projection picks the k experts
    (locality-sensitive hashing of the router input), every weight is 1/k, nothing is learned."""

    balanced_by_construction = True
    learned = False
    rowwise = rowwise_in_eval = k_per_valid_row = True

    def choose(self, scores_TE, probs_TE, valid_T, *, capacity_factor, training):
        ids_TK = scores_TE.topk(self.top_k, dim=-1).indices
        mask_TK = valid_T.unsqueeze(1).expand_as(ids_TK)
        weights_TK = torch.where(mask_TK, 1.0 / self.top_k, 0.0).to(torch.float32)
        return GateChoice(ids_TK, weights_TK, mask_TK)
