"""The router: tags and/or hidden states → expert assignments, with capacity applied.

Shape legend: T tokens (flattened, padding included), D model width, E experts, K assignment
slots per token (top_k, or E for expert choice), G tag groups, R rows the router scores (the T
tokens, or one representative token per tag group for content-independent strategies).

    z_TD      = strategy input (token, context, modality, task, attribute, hybrid)
    logits_TE = z · W_gateᵀ                    (fp32, autocast off)
    probs_TE  = softmax(logits) or sigmoid(logits)
    choice    = gate(logits + noise [+ bias])  (top-k, expert choice, balanced, hash)
    keep      = capacity(choice)               (dropless keeps all)

With sigmoid scores the gate chooses by ``probs + bias`` instead (DeepSeek-V3: the bias and the
group scores add affinities, not logits). The bias is the loss-free balancing of tag-routed layers
(``moe_gen.routing.balance``), or a fixed bias loaded into a content router
(``RouterConfig.selection_bias``): it only chooses experts; the gate weights are the probabilities
without it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from moe_gen.config import MoEConfig, RouterConfig
from moe_gen.registry import GATES, ROUTERS
from moe_gen.routing import balance
from moe_gen.routing.capacity import capacity_for, slot_positions
from moe_gen.routing.gates import Gate, GateChoice
from moe_gen.routing.tags import TagBatch, TokenTags

__all__ = ["GroupRoutes", "RouterOutput", "Router"]


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
        capacity: slots per expert (for dropless: the largest expert load in this call).
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
                     expert_counts=expert_counts, capacity=capacity)
        if groups is None and any(v is None for v in given.values()):
            missing = [k for k, v in given.items() if v is None]
            raise ValueError(f"RouterOutput needs {', '.join(missing)} (or groups= to expand them from)")
        if groups is None:  # plain attributes
            for name, value in given.items():
                setattr(self, name, value)
        else:  # _GroupedRouterOutput: what is not given is expanded from the groups when read
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


class Router(nn.Module):
    """Routes tokens to experts by the configured strategy, gate, noise and capacity.

    Args:
        config: the layer's ``MoEConfig`` (router settings in ``config.router``).
    """

    MAX_CACHED_ROUTES = 64  # sets of tag groups whose inference routes are kept

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        rc = config.router
        assert isinstance(rc, RouterConfig)
        self.config = config
        self.router_config = rc
        self.num_experts = config.num_experts
        self.input = ROUTERS.get(rc.strategy)(config.d_model, rc)
        self.gate: Gate = GATES.get(rc.gate)(config)
        weight = torch.empty(config.num_experts, config.d_model)
        nn.init.normal_(weight, std=1.0 / math.sqrt(config.d_model))
        if self.gate.learned:
            self.weight = nn.Parameter(weight)
        else:
            # Fixed projection: a buffer, so it is saved but never trained.
            self.register_buffer("weight", weight)
        # Loss-free balancing of tag routes, or a bias loaded from elsewhere: a selection bias per
        # expert, a buffer so checkpoints hold it (None, and not in the state dict, where neither
        # applies).
        has_bias = self.balances_by_bias or rc.selection_bias
        self.register_buffer("balance_bias", torch.zeros(config.num_experts) if has_bias else None)
        self._pending_load: Optional[torch.Tensor] = None  # loads awaiting balance.sync_bias_updates
        # Inference routes per set of tag groups, kept only in a layer frozen by
        # ``moe_gen.merge_for_inference`` (its weights no longer change).
        self.cache_routes = False
        self._routes: dict = {}

    @property
    def content_dependent(self) -> bool:
        return type(self.input).content_dependent

    @property
    def needs_tags(self) -> bool:
        return type(self.input).needs_tags

    @property
    def tag_balanced(self) -> bool:
        """Whether ``RouterConfig.tag_balance`` applies: tag routes (content-independent) chosen by a
        learned gate that does not balance by construction (top-k)."""
        gate = type(self.gate)
        return not self.content_dependent and gate.learned and not gate.balanced_by_construction

    @property
    def balances_by_bias(self) -> bool:
        return self.tag_balanced and self.router_config.tag_balance in ("bias", "loss+bias")

    @torch.no_grad()
    def update_balance_bias(self, routing: RouterOutput) -> None:
        """Loss-free balancing after a training forward: nudges the selection bias towards the
        experts that ``routing`` left underloaded (token counts; from the group rows when routes are
        kept per tag group). With several processes the load waits for ``balance.sync_bias_updates``.
        A frozen router (``weight.requires_grad`` False, e.g. fine-tuning only adapters or experts)
        keeps its bias too, so the routes of the tasks it already serves stay as they were.
        """
        if not self.weight.requires_grad:
            return
        load_E = routing.expert_counts.to(self.balance_bias.dtype)
        if balance.defer_to_sync():
            self._pending_load = load_E if self._pending_load is None else self._pending_load + load_E
        else:
            rc = self.router_config
            balance.nudge_bias_(self.balance_bias, load_E, rc.tag_balance_rate, rc.tag_balance_rule)

    def take_pending_load(self) -> Optional[torch.Tensor]:
        """The load summed since the last call (``None`` if none), and resets it."""
        load, self._pending_load = self._pending_load, None
        return load

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before tag balancing existed have no bias: they load with a zero bias.
        key = prefix + "balance_bias"
        if self.balance_bias is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.balance_bias)
        self._routes = {}  # new weights: cached routes no longer hold
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._routes = {}  # moved or cast: cached routes hold tensors of the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x_TD: torch.Tensor, batch: TagBatch) -> RouterOutput:
        """Args:
            x_TD: hidden states (any float dtype).
            batch: the tokens' tags (required by tag strategies), padding and sequences
                (``TagBatch``; its tag groups are computed once for all layers of a forward).
        """
        valid_T, segment_T = batch.valid, batch.segment
        # Rows the router scores: every token, or one representative per tag group.
        x_RD, tags_R, segment_R, valid_R = x_TD, batch.tags, segment_T, valid_T
        group_T = cache_key = None
        if not self.content_dependent and x_TD.shape[0] > 0:
            # Route each tag group once and broadcast: identical routes for all members, bit
            # for bit (and G rows of work instead of T). Noise, too, is drawn per group.
            group_T = batch.group_ids
            cache_key = self._route_cache_key(batch)
            if cache_key is not None and cache_key in self._routes:
                return self._grouped_output(batch, *self._routes[cache_key], key=cache_key)
            first_G, tags_R = batch.first_G, batch.group_tags
            x_RD, segment_R, valid_R = x_TD[first_G], segment_T[first_G], valid_T[first_G]

        with torch.autocast(x_TD.device.type, enabled=False):
            logits_RE, scores_RE, probs_RE = self._scores(x_RD, tags_R, segment_R, valid_R)
            if group_T is not None and type(self.gate).rowwise:
                # A row-wise gate decides each group from its one row; members take that choice
                # (padding members none): equal to gating every token, at G rows of work.
                choice = self._choose(scores_RE, probs_RE, torch.ones_like(valid_R))
                if self.config.capacity_factor is None and bool(choice.mask_TK.all()):
                    # dropless, and the gate chose K experts for every group: routes stay per group
                    routes = (choice.ids_TK, choice.weights_TK, probs_RE, logits_RE)
                    self._cache_routes(cache_key, routes)
                    return self._grouped_output(batch, *routes, key=cache_key)
                choice = _choice_to_tokens(choice, group_T, valid_T)
                logits_TE, probs_TE = logits_RE[group_T], _zero_padding(probs_RE[group_T], valid_T)
            else:
                # Gated per token (content routing, or a gate that sees all rows at once).
                logits_TE, scores_TE, probs_TE = (_per_token(t, group_T) for t in (logits_RE, scores_RE, probs_RE))
                probs_TE = _zero_padding(probs_TE, valid_T)
                choice = self._choose(scores_TE, probs_TE, valid_T)

        positions_TK, keep_TK, capacity = self._apply_capacity(choice, valid_T)
        return self._token_output(choice, keep_TK, positions_TK, capacity, probs_TE, logits_TE, valid_T)

    def _route_cache_key(self, batch: TagBatch) -> tuple[int, ...] | None:
        """The key of this set of tag groups in the inference route cache, or ``None`` where routes
        are not cached.

        Only in a layer frozen for inference (``cache_routes``, set by ``merge_for_inference``),
        without training or autograd, with a row-wise gate and dropless routing: then a group's
        route is a function of its tags alone.
        """
        if not (self.cache_routes and type(self.gate).rowwise and self.config.capacity_factor is None
                and not self.training and not torch.is_grad_enabled()):
            return None
        return batch.group_keys

    def _cache_routes(self, cache_key: tuple[int, ...] | None, routes: tuple) -> None:
        """Keeps ``routes`` under ``cache_key`` (no-op for ``None``), evicting the oldest entry
        beyond ``MAX_CACHED_ROUTES``."""
        if cache_key is None:
            return
        if len(self._routes) >= self.MAX_CACHED_ROUTES:
            del self._routes[next(iter(self._routes))]
        self._routes[cache_key] = routes

    def _scores(
        self, x_RD: torch.Tensor, tags_R: TokenTags | None, segment_R: torch.Tensor, valid_R: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, selection scores and probabilities ``[R, E]`` of the R rows, in fp32 (call with
        autocast off). In training, noise is drawn here: jitter on the router input, then
        gaussian or gumbel noise on the logits."""
        rc = self.router_config
        noise = rc.noise if self.training else "none"
        z_RD = self.input(x_RD, tags_R, segment_R, valid_R).float()
        if noise == "jitter":
            # Switch Transformer: multiplicative jitter on the router input.
            z_RD = z_RD * torch.empty_like(z_RD).uniform_(1.0 - rc.jitter_eps, 1.0 + rc.jitter_eps)
        logits_RE = torch.nn.functional.linear(z_RD, self.weight.float())
        scores_RE, probs_RE = self._noisy_scores(logits_RE, noise)
        if rc.score == "sigmoid":
            # Affinities rank experts as the logits do, but the bias and the group scores add
            # affinities (DeepSeek-V3), so experts are chosen by them.
            scores_RE = probs_RE
        if self.balance_bias is not None:
            # Loss-free balancing: the bias chooses experts only; weights stay probs_RE.
            scores_RE = scores_RE + self.balance_bias
        return logits_RE, scores_RE, probs_RE

    def _noisy_scores(self, logits_RE: torch.Tensor, noise: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection scores (the logits, plus gaussian or gumbel ``noise``) and probabilities."""
        rc = self.router_config
        if noise == "gaussian":
            # Uni-Perceiver-MoE: N(0, (1/E)²) on the logits; weights follow the noisy logits.
            std = rc.noise_std if rc.noise_std is not None else 1.0 / self.num_experts
            scores_RE = logits_RE + torch.randn_like(logits_RE) * std
            return scores_RE, _probabilities(scores_RE, rc.score)
        if noise == "gumbel":
            # Gumbel-top-k samples experts from the softmax without replacement; the weights
            # stay the clean probabilities.
            gumbel = -torch.log(-torch.log(torch.rand_like(logits_RE).clamp(1e-20, 1.0)))
            return logits_RE + gumbel, logits_RE.softmax(-1)
        return logits_RE, _probabilities(logits_RE, rc.score)

    def _choose(self, scores_RE: torch.Tensor, probs_RE: torch.Tensor, valid_R: torch.Tensor) -> GateChoice:
        """The gate's choice over R rows (``valid_R`` False: padding, chosen for none)."""
        return self.gate.choose(scores_RE, probs_RE, valid_R, capacity_factor=self.config.capacity_factor,
                                training=self.training)

    def _apply_capacity(
        self, choice: GateChoice, valid_T: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[int]]:
        """Slots and kept assignments under the capacity limit.

        Returns:
            ``(positions_TK, keep_TK, capacity)``: slots (``None`` when dropless), bool ``[T, K]``
            assignments kept, and slots per expert (``None`` when dropless: the largest load,
            known only once the kept assignments are counted).
        """
        cfg = self.config
        if choice.positions_TK is not None:
            # The gate fixed slots and capacity itself (expert choice).
            return choice.positions_TK, choice.mask_TK, int(choice.capacity)
        if cfg.capacity_factor is None:
            # Dropless: every assignment is kept; slots are computed only if a padded layout
            # asks (RouterOutput.slot_positions).
            return None, choice.mask_TK, None
        priority_T = None
        if cfg.drop_policy == "batch_prioritized":
            priority_T = torch.argsort(choice.weights_TK.max(-1).values, descending=True, stable=True)
        positions_TK, _ = slot_positions(choice.ids_TK, choice.mask_TK, self.num_experts, priority_T)
        capacity = capacity_for(int(valid_T.sum()), cfg.top_k, self.num_experts, cfg.capacity_factor,
                                cfg.min_capacity)
        return positions_TK, choice.mask_TK & (positions_TK < capacity), capacity

    def _token_output(
        self,
        choice: GateChoice,
        keep_TK: torch.Tensor,
        positions_TK: Optional[torch.Tensor],
        capacity: Optional[int],
        probs_TE: torch.Tensor,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor,
    ) -> RouterOutput:
        """The decision per token: the kept assignments (``_apply_capacity``), their expert counts,
        and what capacity dropped. ``capacity`` None (dropless) becomes the largest expert load."""
        ids_TK, mask_TK = choice.ids_TK, choice.mask_TK
        expert_counts_E = torch.bincount(ids_TK[keep_TK], minlength=self.num_experts)
        if capacity is None:
            capacity = int(expert_counts_E.max()) if expert_counts_E.numel() else 0
        return RouterOutput(
            topk_ids=ids_TK,
            topk_weights=torch.where(keep_TK, choice.weights_TK, 0.0),
            mask=keep_TK,
            positions=None if positions_TK is None else torch.where(keep_TK, positions_TK, 0),
            capacity=capacity,
            probs=probs_TE,
            logits=logits_TE,
            valid=valid_T,
            expert_counts=expert_counts_E,
            dropped_assignments=(mask_TK & ~keep_TK).sum(),
            dropped_tokens=(valid_T & ~keep_TK.any(-1)).sum(),
            content_dependent=self.content_dependent,
            balanced_by_construction=type(self.gate).balanced_by_construction,
            learned_gate=type(self.gate).learned,
        )

    def _grouped_output(self, batch: TagBatch, ids_GK, weights_GK, probs_GE, logits_GE, *, key=None) -> RouterOutput:
        """The decision of a row-wise gate over G tag-group rows, kept per group (dropless: every
        valid member computes all K assignments of its group's route)."""
        valid_T, group_T, count_G = batch.valid, batch.group_ids, batch.group_counts
        none = torch.zeros((), dtype=torch.long, device=valid_T.device)
        return RouterOutput(  # expert counts and capacity are computed from the groups when read
            valid=valid_T,
            dropped_assignments=none,
            dropped_tokens=none,
            content_dependent=False,
            balanced_by_construction=type(self.gate).balanced_by_construction,
            learned_gate=type(self.gate).learned,
            groups=GroupRoutes(group_T, ids_GK, weights_GK, probs_GE, logits_GE, count_G, key),
        )


def _probabilities(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Router probabilities from fp32 logits: a softmax over the experts, or one sigmoid
    affinity per expert (``RouterConfig.score``)."""
    return logits_TE.sigmoid() if score == "sigmoid" else logits_TE.softmax(-1)


def _choice_to_tokens(choice_GK: GateChoice, group_T: torch.Tensor, valid_T: torch.Tensor) -> GateChoice:
    """A row-wise gate's choice for G tag groups, taken by every member token (padding: none)."""
    keep_TK = valid_T.unsqueeze(1)
    return dataclasses.replace(
        choice_GK, ids_TK=choice_GK.ids_TK[group_T], mask_TK=choice_GK.mask_TK[group_T] & keep_TK,
        weights_TK=torch.where(keep_TK, choice_GK.weights_TK[group_T], 0.0))


def _per_token(rows_RX: torch.Tensor, group_T: Optional[torch.Tensor]) -> torch.Tensor:
    """Each token's row: its tag group's row, or the rows themselves when they are the tokens."""
    return rows_RX if group_T is None else rows_RX[group_T]


def _zero_padding(probs_TE: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Probabilities with zero rows for padding tokens."""
    return torch.where(valid_T.unsqueeze(1), probs_TE, 0.0)
