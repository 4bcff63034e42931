"""The router: tags and/or hidden states → expert assignments, with capacity applied.

Shape legend: T tokens (flattened, padding included), D model width, E experts, K assignment
slots per token (top_k, or E for expert choice), G tag groups, R rows the router scores (the T
tokens, or one representative token per tag group for content-independent strategies).

    z_TD      = strategy input (token, context, modality, task, attribute, hybrid, instruction)
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

import collections
import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import nn

from moe_gen.config import MoEConfig, RouterConfig
from moe_gen.registry import GATES, ROUTERS
from moe_gen.routing import balance
from moe_gen.routing.capacity import capacity_for, slot_positions
from moe_gen.routing.gates import Gate, GateChoice
from moe_gen.routing.losses import auxiliary_losses
from moe_gen.routing.output import GroupRoutes, RouterOutput
from moe_gen.routing.tags import TagBatch, TokenTags

__all__ = ["GroupRoutes", "RouterOutput", "Router"]


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
        # The running load share the tag-balance loss reads (RouterConfig.tag_balance_window): an
        # average with weights decaying by 1 − 1/W, and the sum of those weights (it starts at 0,
        # so the first update is the average, not a mix with zeros); buffers, so checkpoints hold it.
        windowed = self.windowed_balance
        self.register_buffer("load_average", torch.zeros(config.num_experts) if windowed else None)
        self.register_buffer("load_weight", torch.zeros(()) if windowed else None)
        self._pending_share: Optional[torch.Tensor] = None  # summed shares and their count, awaiting sync
        # Inference routes per set of tag groups, kept only in a layer frozen by
        # ``moe_gen.merge_for_inference`` (its weights no longer change).
        self.cache_routes = False
        # kept routes, oldest first (an OrderedDict: its popitem(last=False) evicts in one step, so
        # threads sharing a layer in merged_in_place never evict the same entry twice)
        self._routes: collections.OrderedDict = collections.OrderedDict()

    @property
    def content_dependent(self) -> bool:
        return type(self.input).content_dependent

    @property
    def needs_tags(self) -> bool:
        return type(self.input).needs_tags

    @property
    def reads_segments(self) -> bool:
        """Whether the input pools each sequence (``TagBatch.segment``)."""
        return type(self.input).reads_segments

    @property
    def tag_balanced(self) -> bool:
        """Whether ``RouterConfig.tag_balance`` applies: tag routes (content-independent) chosen by a
        learned gate that does not balance by construction (top-k)."""
        gate = type(self.gate)
        return not self.content_dependent and gate.learned and not gate.balanced_by_construction

    @property
    def balances_by_bias(self) -> bool:
        return self.tag_balanced and self.router_config.tag_balance in ("bias", "loss+bias")

    @property
    def windowed_balance(self) -> bool:
        """Whether the tag-balance loss reads a running load (``RouterConfig.tag_balance_window``)."""
        rc = self.router_config
        return (self.tag_balanced and rc.tag_balance in ("loss", "loss+bias") and rc.tag_balance_window > 0
                and rc.balance_loss_weight > 0)

    def _routed_load(self, routing: RouterOutput) -> torch.Tensor:
        """Token assignments per expert ``[E]`` that ``routing`` asks for (before capacity drops:
        after them an expert asked for 4x its slots looked no busier than one at its share)."""
        return (routing.expert_counts if routing.groups is not None else
                torch.bincount(routing.topk_ids[routing.valid].reshape(-1), minlength=self.num_experts))

    @torch.no_grad()
    def running_share(self, routing: RouterOutput, update: bool = True) -> Optional[torch.Tensor]:
        """The load share per expert ``[E]`` the windowed tag-balance loss reads: the running
        average with this forward's share mixed in (None before any load). ``update`` (False while
        activation checkpointing recomputes the forward): adds this forward's share to the average,
        or under several processes to the pending shares that ``balance.sync_bias_updates`` averages
        over the processes."""
        load_E = self._routed_load(routing).float()
        total = float(load_E.sum())
        share_E = load_E / total if total > 0 else None
        rho = 1.0 - 1.0 / self.router_config.tag_balance_window
        if balance.defer_to_sync():
            if update and share_E is not None:
                entry = torch.cat([share_E, share_E.new_ones(1)])
                self._pending_share = entry if self._pending_share is None else self._pending_share + entry
            if share_E is None:
                return self.load_average / self.load_weight if float(self.load_weight) > 0 else None
            return (rho * self.load_average + (1 - rho) * share_E) / (rho * self.load_weight + (1 - rho))
        if update and share_E is not None:
            self.advance_load_average(share_E)
        return self.load_average / self.load_weight if float(self.load_weight) > 0 else None

    @torch.no_grad()
    def advance_load_average(self, share_E: torch.Tensor) -> None:
        """One update of the running load share: ``avg ← ρ·avg + (1 − ρ)·share``, ρ = 1 − 1/W."""
        rho = 1.0 - 1.0 / self.router_config.tag_balance_window
        self.load_average.mul_(rho).add_(share_E.to(self.load_average), alpha=1 - rho)
        self.load_weight.mul_(rho).add_(1 - rho)

    def take_pending_share(self) -> Optional[torch.Tensor]:
        """The shares summed since the last call and their count (``[E + 1]``; ``None`` if none),
        and resets them."""
        share, self._pending_share = self._pending_share, None
        return share

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
        load_E = self._routed_load(routing).float()  # counts in fp32 (fp16 overflows at 65504)
        if balance.defer_to_sync():
            self._pending_load = load_E if self._pending_load is None else self._pending_load + load_E
        else:
            rc = self.router_config
            balance.nudge_bias_(self.balance_bias, load_E, rc.tag_balance_rate, rc.tag_balance_rule)

    def take_pending_load(self) -> Optional[torch.Tensor]:
        """The load summed since the last call (``None`` if none), and resets it."""
        load, self._pending_load = self._pending_load, None
        return load

    def __getstate__(self):
        # copies and pickles start without kept routes (another thread's infer may be adding some)
        return {**super().__getstate__(), "_routes": collections.OrderedDict()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before tag balancing existed have no bias: they load with a zero bias.
        key = prefix + "balance_bias"
        if self.balance_bias is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.balance_bias)
        self._routes = collections.OrderedDict()  # new weights: cached routes no longer hold
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._routes = collections.OrderedDict()  # moved or cast: cached routes hold tensors of the old device/dtype
        out = super()._apply(fn, *args, **kwargs)
        # The balance state stays fp32 in a model cast to bf16/fp16: its steps (rate × a load share) are
        # rounded away in bf16, and fp16 token counts overflow to inf above 65504 (a NaN bias).
        for name in ("balance_bias", "load_average", "load_weight"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return out

    def set_route_cache(self, enabled: bool) -> None:
        """Keeps routes per set of tag groups at inference (``enabled``; see ``_route_cache_key``) or
        not; either way drops the routes kept so far."""
        self.cache_routes = bool(enabled)
        self._routes = collections.OrderedDict()

    def losses(self, routing: RouterOutput, batch: TagBatch, load_share: Optional[torch.Tensor] = None):
        """The auxiliary losses of ``routing`` (``moe_gen.routing.losses.auxiliary_losses``, each
        weighted as configured; ``load_share``: the running load the tag-balance loss reads). Without
        autograd there is no graph to build: a function that computes them when called
        (``MoEOutput`` calls it if and when someone reads them)."""
        if torch.is_grad_enabled():
            return auxiliary_losses(routing, batch.tags, self.router_config, load_share)
        return functools.partial(auxiliary_losses, routing, batch.tags, self.router_config, load_share)

    def forward(self, x_TD: torch.Tensor, batch: TagBatch, carry: Optional[dict] = None) -> RouterOutput:
        """Args:
            x_TD: hidden states (any float dtype).
            batch: the tokens' tags (required by tag strategies), padding and sequences
                (``TagBatch``; its tag groups are computed once for all layers of a forward).
            carry: cached decoding: this layer's state kept across the calls of one decoding,
                for inputs that pool earlier positions (``RouterInput.carries``; others ignore it).
        """
        valid_T = batch.valid
        group_T = cache_key = None
        store = self._routes  # one read: a merged_in_place block ending meanwhile gives the layer a new one
        if not self.content_dependent and x_TD.shape[0] > 0:
            # Route each tag group once and broadcast: identical routes for all members, bit
            # for bit (and G rows of work instead of T). Noise, too, is drawn per group.
            group_T = batch.group_ids
            cache_key, kept = self._kept_routes(store, batch)
            if kept is not None:
                return self._grouped_output(batch, *kept, key=cache_key)
        # Rows the router scores: every token, or one representative per tag group.
        x_RD, tags_R, valid_R = x_TD, batch.tags, valid_T
        segment_R = None
        if self.reads_segments:
            if batch.segment is None:
                raise ValueError(f"router strategy {self.router_config.strategy!r} pools each sequence; build the "
                                 "TagBatch with segments=True")
            segment_R = batch.segment
        if group_T is not None:
            first_G, tags_R = batch.first_G, batch.group_tags
            x_RD, valid_R = x_TD[first_G], valid_T[first_G]
            segment_R = None if segment_R is None else segment_R[first_G]
        if batch.padded:  # padding may hold anything: a NaN there made the router's gradient NaN
            x_RD = torch.where(valid_R.unsqueeze(1), x_RD, 0.0)

        with torch.autocast(x_TD.device.type, enabled=False):
            logits_RE, scores_RE, probs_RE = self._scores(x_RD, tags_R, segment_R, valid_R, carry)
            if group_T is not None and type(self.gate).rowwise:
                # A row-wise gate decides each group from its one row; members take that choice
                # (padding members none): equal to gating every token, at G rows of work.
                choice = self._choose(scores_RE, probs_RE, torch.ones_like(valid_R))
                if self.config.capacity_factor is None and (type(self.gate).k_per_valid_row
                                                            or bool(choice.mask_TK.all())):
                    # dropless, and the gate chose K experts for every group: routes stay per group
                    routes = (choice.ids_TK, choice.weights_TK, probs_RE, logits_RE)
                    self._cache_routes(store, cache_key, routes)
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

    def routing_of(self, batch: TagBatch, routes: tuple) -> RouterOutput:
        """The routing of ``batch``'s tokens by ``routes``, its tag groups' routes as this router
        gave them (ids, gate weights, probabilities and logits per group: what a frozen layer's
        kept plan holds), named by the batch's set of tag groups."""
        return self._grouped_output(batch, *routes, key=batch.group_keys)

    def _kept_routes(self, store: collections.OrderedDict, batch: TagBatch) -> tuple[tuple | None, tuple | None]:
        """``batch``'s route cache key (None where routes are not cached) and the routes ``store`` keeps
        under it (None when none)."""
        key = self._route_cache_key(batch)
        return key, None if key is None else store.get(key)

    def _cache_routes(self, store: collections.OrderedDict, cache_key: tuple[int, ...] | None, routes: tuple) -> None:
        """Keeps ``routes`` under ``cache_key`` in ``store`` (the route cache the call began with; no-op
        for ``None``), evicting the oldest entry beyond ``MAX_CACHED_ROUTES``."""
        if cache_key is None:
            return
        if len(store) >= self.MAX_CACHED_ROUTES:
            store.popitem(last=False)
        store[cache_key] = routes

    def _scores(
        self, x_RD: torch.Tensor, tags_R: TokenTags | None, segment_R: torch.Tensor | None, valid_R: torch.Tensor,
        carry: Optional[dict] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, selection scores and probabilities ``[R, E]`` of the R rows, in fp32 (call with
        autocast off). In training, noise is drawn here: jitter on the router input, then
        gaussian or gumbel noise on the logits."""
        rc = self.router_config
        noise = rc.noise if self.training else "none"
        if carry is not None and type(self.input).carries:
            z_RD = self.input(x_RD, tags_R, segment_R, valid_R, carry=carry).float()
        else:
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
        and what capacity dropped. ``capacity`` None (dropless): the largest expert load, computed
        when read. Nothing here reads a value back to the host (no boolean indexing, no bincount)."""
        ids_TK, mask_TK = choice.ids_TK, choice.mask_TK
        expert_counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=ids_TK.device).index_add_(
            0, torch.where(keep_TK, ids_TK, 0).reshape(-1), keep_TK.reshape(-1).long())
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
