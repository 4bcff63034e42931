"""The mixture-of-experts layer: route → dispatch → experts → combine (→ shared expert).

Shape legend: B batch, S sequence, T = B·S flattened tokens, D model width, D' output width
(D, or H for linear experts), E experts, K assignments per token.

    moe = MoE(MoEConfig(d_model=512, d_hidden=1024, num_experts=8, top_k=2, router="attribute"))
    out = moe(x_BSD, tags=tags_BS, padding_mask=pad_BS)
    out.output        # [B, S, D]
    out.aux_losses    # {"z": ..., ...} already weighted; out.aux_loss is their sum
    out.routing       # RouterOutput: ids, weights, probs, counts, dropped
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading

import torch
from torch import nn

from moe_gen.config import MoEConfig
from moe_gen.experts.dispatch import DispatchBackend, MergedDispatch, make_backend
from moe_gen.experts.experts import DenseFFN, _autocast_dtype
from moe_gen.registry import EXPERTS
from moe_gen.routing.output import RouterOutput
from moe_gen.routing.router import Router
from moe_gen.routing.tags import TagBatch, TokenTags

# Registering modules: importing them fills ROUTERS, GATES, EXPERTS and BACKENDS.
import moe_gen.routing  # noqa: F401,E402  isort: skip
import moe_gen.experts  # noqa: F401,E402  isort: skip

__all__ = ["MoE", "MoEOutput", "merge_for_inference", "merged_in_place"]


class MoEOutput:
    """What one MoE call returns.

    Attributes:
        output: ``[T, D']`` or ``[B, S, D']`` like the input; zero for padding and for tokens whose
            every assignment was dropped (they continue on the residual path).
        aux_losses: named auxiliary losses, each already multiplied by its configured weight.
            Without autograd (inference) they are computed on first access only: nothing could
            differentiate them, and generation never reads them.
        routing: the router's decision (ids, weights, probabilities, counts, drops). A layer
            frozen by ``merge_for_inference`` that ran a kept plan gives it on first access.
    """

    def __init__(self, output: torch.Tensor, aux_losses, routing) -> None:
        self.output = output
        # each a value, or a function computing it (called once, on first access)
        self._routing = routing
        self._aux_losses = aux_losses

    @property
    def routing(self) -> RouterOutput:
        if callable(self._routing):
            self._routing = self._routing()
        return self._routing

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        if callable(self._aux_losses):
            self._aux_losses = self._aux_losses()
        return self._aux_losses

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of ``aux_losses`` (a zero tensor when there are none)."""
        if not self.aux_losses:
            return self.output.new_zeros((), dtype=torch.float32)
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()


class _FrozenOutput(MoEOutput):
    """The output of a frozen layer's kept plan (``MoE._run_frozen``): its routing (computed in the
    call, or built from the plan's per-group ``routes``) and the auxiliary losses from it are made
    when first read. It refers to nothing that refers back to it, so it is freed, with its tensors,
    as soon as the caller drops it (a lazy loss that read the output's routing had made each call a
    reference cycle, left for the garbage collector)."""

    def __init__(self, output: torch.Tensor, router: Router, batch: TagBatch, routing: RouterOutput | None,
                 routes: tuple) -> None:
        self.output = output
        self._router, self._batch, self._routes = router, batch, routes
        self._routing, self._aux_losses = routing, None

    @property
    def routing(self) -> RouterOutput:
        if self._routing is None:
            self._routing = self._router.routing_of(self._batch, self._routes)
        return self._routing

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        if self._aux_losses is None:
            losses = self._router.losses(self.routing, self._batch)  # a function of them without autograd
            self._aux_losses = losses() if callable(losses) else losses
        return self._aux_losses


class MoE(nn.Module):
    """A mixture-of-experts FFN routed by hidden states and/or per-token tags.

    Args:
        config: ``MoEConfig``; ``capacity_factor=None`` is dropless.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self._tag_vocab = config.router.tag_vocab  # read on every call: kept, not rebuilt
        self.experts = EXPERTS.get(config.experts.kind)(
            config.d_model, config.d_hidden, config.num_experts, config.experts
        )
        self.backend: DispatchBackend = make_backend(config.backend)  # "auto" resolves at the first call
        if self.backend.needs_shared_routes and self.router.content_dependent:
            raise ValueError(
                f"backend {config.backend!r} runs each group of tokens that shares a route as one "
                f"merged dense layer, but router strategy {config.router.strategy!r} routes every "
                "token by its content; use a tag strategy (modality, task, attribute) or "
                "backend='torch'"
            )
        self.shared: DenseFFN | None = None
        self.shared_gate: nn.Linear | None = None
        if config.experts.shared_expert:
            hidden = config.experts.shared_hidden or config.d_hidden
            self.shared = DenseFFN(config.d_model, hidden, config.experts)
        if config.experts.shared_gate:
            self.shared_gate = nn.Linear(config.d_model, 1, bias=False)
        self.frozen = False  # set by freeze_for_inference
        self.recomputing = False  # set while activation checkpointing recomputes this layer in backward
        # the windowed load shares a checkpointed forward read, in order, replayed by its recomputation
        # (``moe_gen.model.transformer._contexts``): None outside those
        self.noted_shares: list | None = None
        self.replayed_shares: list | None = None
        self._in_place: _InPlace | None = None  # while merged_in_place blocks run it merged

    def freeze_for_inference(self) -> None:
        """Freezes a tag-routed layer for inference (what ``merge_for_inference`` does to each): the
        merged backend, routes kept per set of tag groups and merged weights per route, no
        gradients, no training mode. The kept values are dropped when the layer or a part of it
        loads a state dict, or the layer (not a part alone) moves or casts; other changes to its
        weights are not seen, so merge the trained model again instead of changing a frozen one."""
        if self.router.content_dependent:
            raise ValueError(f"router strategy {self.config.router.strategy!r} routes every token by its "
                             "content; only tag-routed layers can be merged")
        self.set_backend("merged")
        self.backend = MergedDispatch(cache=True)
        self.router.set_route_cache(True)
        self.frozen, self._in_place = True, None  # (a copy made inside a merged_in_place block: frozen for good)
        self.requires_grad_(False)
        self.eval()
        # a state dict loaded into a part of the layer (its experts, its router or below) drops what
        # the layer kept, as one loaded into the layer does (registered once: freezing again adds none)
        if not getattr(self, "_forgets_on_load", False):
            for module in self.modules():
                if module is not self:
                    module.register_load_state_dict_post_hook(_ForgetKept(self))
            self._forgets_on_load = True

    def __getstate__(self):
        # copied or pickled while merged_in_place blocks run it (another thread's infer): the copy is
        # the layer as it is outside them (its own backend, not frozen, its router's route cache as
        # outside, set on load); read under the blocks' lock, so that none enters or leaves meanwhile
        with _IN_PLACE_LOCK:
            state = dict(super().__getstate__())
            record = state.get("_in_place")
            if record is not None:
                state.update(backend=record.backend, frozen=False, _in_place=None)
            state["_route_cache_outside"] = self.router.cache_routes if record is None else record.cache_routes
        return state

    def __setstate__(self, state):
        cache_routes = state.pop("_route_cache_outside", None)
        if "_tag_vocab" not in state:  # pickled before the layer kept its vocabularies
            state["_tag_vocab"] = state["config"].router.tag_vocab
        super().__setstate__(state)
        if cache_routes is not None:
            self.router.set_route_cache(cache_routes)

    def __copy__(self):
        # a shallow copy shares the layer's parts and state as they are (the state fixes above are
        # for copies that own their router)
        other = self.__class__.__new__(self.__class__)
        other.__dict__.update(self.__dict__)
        return other

    def forget_kept(self) -> None:
        """Drops the routes and merged weights a frozen layer keeps (they are made again when next
        needed): what loading a state dict into it or a part of it, or moving it, does."""
        if isinstance(self.backend, MergedDispatch):
            self.backend.reset()
        if self.router.cache_routes:
            self.router.set_route_cache(True)

    def train(self, mode: bool = True) -> "MoE":
        if mode and self.frozen:
            raise ValueError("this MoE layer was frozen for inference by merge_for_inference; train the "
                             "original model and merge it again")
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.forget_kept()  # kept merged weights are of the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_kept()  # new weights: kept merged weights no longer hold
        super()._load_from_state_dict(*args, **kwargs)

    def set_backend(self, name: str) -> None:
        """Switches the dispatch backend (same weights, same function)."""
        backend = make_backend(name)
        if backend.needs_shared_routes and self.expert_parallel is not None:
            raise ValueError(
                f"backend {name!r} merges experts per route for inference and cannot run with expert "
                "parallelism; this layer's experts are sharded over processes"
            )
        if backend.needs_shared_routes and self.router.content_dependent:
            raise ValueError(
                f"backend {name!r} needs content-independent routes; strategy "
                f"{self.config.router.strategy!r} is content-dependent"
            )
        # with sharded experts the exchange stays; the new backend orders the assignments for it
        backend = self.backend.with_sorter(backend) if self.expert_parallel is not None else backend
        with _IN_PLACE_LOCK:
            if self._in_place is not None:  # merged for a running infer (merged_in_place): its own backend
                self._in_place.backend = backend  # when the last block ends (it was put back, undoing this)
            else:
                self.backend = backend
        self.config = self.config.replace(backend=name)

    @property
    def expert_parallel(self) -> DispatchBackend | None:
        """The all-to-all dispatcher (``moe_gen.experts.parallel.ExpertParallel``) when
        ``shard_experts`` spread this layer's experts over processes, else None."""
        return self.backend if self.backend.shards_experts else None

    def forward(
        self,
        x: torch.Tensor,
        tags: TokenTags | TagBatch | None = None,
        padding_mask: torch.Tensor | None = None,
        carry: dict | None = None,
    ) -> MoEOutput:
        """Args:
            x: ``[T, D]`` or ``[B, S, D]`` hidden states.
            tags: ``TokenTags`` shaped like the tokens (``[T]`` or ``[B, S]``); required by tag
                strategies (modality, task, attribute, hybrid) and grouped balance losses. Or a
                ``TagBatch`` (tags and padding together, shared by the layers of one forward).
            padding_mask: bool, shaped like the tokens, True where a position is padding.
                Padding is not routed, takes no capacity, adds to no loss and outputs zeros.
            carry: cached decoding: a dict this layer's router keeps across the calls of one
                decoding (``Router.forward``); None otherwise.

        Returns:
            ``MoEOutput`` (output shaped like x with width D').
        """
        batch = self._tag_batch(x, tags, padding_mask)
        x_TD = x.reshape(batch.num_tokens, self.config.d_model)
        if self.config.check_finite:
            _check_finite(x, x_TD, batch.valid)
        routing = None
        backend = self.backend  # read once: another thread's merged_in_place block may switch it meanwhile
        if backend.keeps_plans:  # frozen: the plan kept for this set of tag groups (made now if need be)
            out, routing = self._run_frozen(x, x_TD, batch, carry, backend)
            if out is not None:
                return out

        if routing is None:
            routing = self.router(x_TD, batch, carry)
        if self.training and self.router.balances_by_bias and not self.recomputing:
            # loss-free balancing of tag routes: the next forward's selection bias (no gradient)
            self.router.update_balance_bias(routing)
        load_share = None  # the running load a windowed tag-balance loss reads (training only)
        if self.training and self.router.load_average is not None and torch.is_grad_enabled():
            load_share = self._windowed_share(routing)
        aux_losses = self.router.losses(routing, batch, load_share)

        dispatched = backend.dispatch(x_TD, routing)
        expert_outputs = backend.run(self.experts, dispatched)
        y_TD = backend.combine(expert_outputs, dispatched, x_TD)
        if y_TD is None:  # no assignment computed at all (every token padding or dropped)
            y_TD = x_TD.new_zeros(x_TD.shape[0], self.experts.d_out, dtype=_autocast_dtype(x_TD))
        y_TD = self._add_shared(x_TD, y_TD, batch.valid)
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), aux_losses, routing)

    def _windowed_share(self, routing):
        """The running load share the windowed tag-balance loss reads; while activation checkpointing
        recomputes a forward, the one that forward read (the contrastive objective's second pass
        may have moved the average since: other gradients)."""
        if self.recomputing and self.replayed_shares:
            return self.replayed_shares.pop(0)
        share = self.router.running_share(routing, update=not self.recomputing)
        if self.noted_shares is not None:
            self.noted_shares.append(share)
        return share

    def _add_shared(self, x_TD, y_TD, valid_T):
        """The experts' output plus the shared expert's (if any; zero for padding)."""
        if self.shared is None:
            return y_TD
        x_TD = torch.where(valid_T.unsqueeze(1), x_TD, 0.0)  # padding may hold anything (a NaN: NaN gradients)
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            # Qwen2-MoE: each token takes a sigmoid-gated share of the shared expert
            # (in the input's dtype, as the experts and the shared FFN are: an fp32 layer takes bf16 states)
            gate = self.shared_gate
            logit_T1 = gate(x_TD) if torch.is_autocast_enabled(x_TD.device.type) or gate.weight.dtype == x_TD.dtype \
                else nn.functional.linear(x_TD, gate.weight.to(x_TD.dtype),
                                          None if gate.bias is None else gate.bias.to(x_TD.dtype))
            shared_TD = torch.sigmoid(logit_T1) * shared_TD
        return y_TD.to(shared_TD.dtype) + torch.where(valid_T.unsqueeze(1), shared_TD, 0.0)

    def _run_frozen(self, x, x_TD, batch, carry, backend) -> tuple[MoEOutput | None, RouterOutput | None]:
        """A frozen layer's output from the plan ``backend`` keeps for ``batch``'s set of tag groups
        (``MergedDispatch.keep_plan``, made now if need be), and the routing the router computed on
        the way (None when the plan was kept before: then the output's routing, and the auxiliary
        losses from it, are built from the plan's routes if and when someone reads them); no output
        when no plan runs this batch."""
        plan, routing = backend.kept_plan(batch), None
        y_TD = None if plan is None else backend.run_kept(self.experts, x_TD, batch, plan)
        if y_TD is None:
            routing = self.router(x_TD, batch, carry)
            plan = None if plan is not None else backend.keep_plan(self.experts, x_TD, routing, batch)
            y_TD = None if plan is None else backend.run_kept(self.experts, x_TD, batch, plan)
            if y_TD is None:
                return None, routing
        if self.shared is not None:
            y_TD = self._add_shared(x_TD, y_TD, batch.valid)
        return _FrozenOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), self.router, batch, routing, plan.routes), None

    def _tag_batch(self, x, tags, padding_mask) -> TagBatch:
        """The tags and padding of ``x``'s tokens as a ``TagBatch`` (the given one, or one built
        here), checked against the tokens and the router's vocabularies; errors name what is wrong."""
        if (type(tags) is TagBatch and padding_mask is None and tags.has_tags and tags.vocab == self._tag_vocab
                and isinstance(x, torch.Tensor) and x.dim() in (2, 3) and x.shape[:-1] == tags.shape
                and x.shape[-1] == self.config.d_model and x.is_floating_point()):
            return tags  # a stack's TagBatch, checked against these vocabularies when built: nothing to check
        cfg, rc = self.config, self.config.router
        _check_input(x, cfg.d_model)
        token_shape = tuple(x.shape[:-1])
        vocab = self._tag_vocab
        if isinstance(tags, TagBatch):
            if padding_mask is not None:
                raise ValueError("a TagBatch carries its padding; pass padding_mask= to TagBatch, not to the MoE")
            if tags.shape != token_shape:
                raise ValueError(f"the TagBatch describes tokens {tags.shape} but the input has tokens {token_shape}")
            batch = tags
            if batch.vocab != vocab:  # checked against other sizes when built (or not at all)
                batch.validate(vocab)
        else:
            if tags is not None and not isinstance(tags, TokenTags):
                raise ValueError(f"tags must be a TokenTags, got {type(tags).__name__}")
            batch = TagBatch(tags, padding_mask, shape=token_shape, device=x.device, vocab=vocab,
                             segments=self.router.reads_segments, valid_rows=self.backend.keeps_plans)
        if not batch.has_tags:
            if self.router.needs_tags:
                raise ValueError(
                    f"router strategy {rc.strategy!r} routes by tags; pass tags=TokenTags(...) "
                    f"shaped like the tokens {token_shape}"
                )
            if rc.balance_loss_groups and self.router.content_dependent and rc.balance_loss_weight > 0:
                raise ValueError(
                    f"balance_loss_groups={list(rc.balance_loss_groups)} needs tags; pass tags="
                )
        return batch


class _ForgetKept:
    """A load-state-dict hook on the parts of a frozen layer: the layer forgets what it kept (a
    class, not a closure, so that a model with it pickles)."""

    def __init__(self, layer: MoE) -> None:
        self.layer = layer

    def __call__(self, module, incompatible_keys) -> None:
        self.layer.forget_kept()


def merge_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference whose tag-routed MoE layers run as merged dense FFNs.

    Every MoE layer routed by tags alone (modality, task, attribute) is frozen
    (``MoE.freeze_for_inference``): tokens of tag groups that share a route, or at inference a set of
    experts, run as one FFN with the experts' merged weights, and routes and merged weights are
    computed once per set of tag groups and kept. Outputs equal ``model``'s. Layers routed by
    content keep their backend. The copy is a snapshot in eval mode without gradients: train the
    original and merge again (a ``GeneralistModel`` copy refuses ``train()``, leaving every module in
    eval mode, whatever its routers). ``model`` itself is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"merge_for_inference takes a model (a torch module), got {type(model).__name__}")
    merged = copy.deepcopy(model).eval().requires_grad_(False)
    layers = [m for m in merged.modules() if isinstance(m, MoE)]
    for layer in layers:
        if layer.expert_parallel is not None:
            raise ValueError("a model whose experts are sharded over processes (expert parallelism) cannot "
                             "be merged; gather its experts into one process first")
    for layer in layers:
        if not layer.router.content_dependent:
            layer.freeze_for_inference()
    merged.inference_copy = True  # (GeneralistModel.train refuses it, before any module changes mode)
    config = getattr(merged, "config", None)
    if layers and all(layer.frozen for layer in layers) and hasattr(config, "with_moe"):
        merged.config = config.with_moe(backend="merged")  # a saved copy (ModelConfig) reloads merged
    return merged


@dataclasses.dataclass
class _InPlace:
    """A layer's own state while ``merged_in_place`` blocks (``blocks`` of them, from any thread) run
    it merged."""

    backend: DispatchBackend
    cache_routes: bool
    blocks: int = 0


# Entering and leaving merged_in_place, for any model: a layer shared by blocks of several threads
# switches to merged when the first enters and back when the last leaves, never under a running one.
_IN_PLACE_LOCK = threading.Lock()


@contextlib.contextmanager
def merged_in_place(model: nn.Module):
    """For a block in which ``model``'s weights do not change (one ``model.infer`` call): every MoE
    layer of it routed by tags alone runs as a frozen layer does (merged weights, routes and plans
    kept, see ``merge_for_inference``), in place, without copying the model; afterwards each layer
    has its own backend back and nothing kept survives the block. Layers frozen for good, routed by
    content, or with experts sharded over processes run as they are. Outputs equal the layers' own
    within float rounding. Blocks may overlap (nested, or ``infer`` called from several threads):
    the layers stay merged, and share what they keep, until the last block ends; so weights changed
    in place while any block runs (an optimizer step or ``copy_`` from another thread) are not seen
    by calls that start before the last block ends (``load_state_dict`` is). ``set_backend`` inside
    a block takes effect when it ends."""
    joined: list[tuple[MoE, _InPlace]] = []  # the layers this block runs merged, and their records
    try:
        with _IN_PLACE_LOCK:
            for layer in model.modules():
                if not (isinstance(layer, MoE) and (layer._in_place is not None or not layer.frozen)
                        and not layer.router.content_dependent and layer.expert_parallel is None):
                    continue
                if layer._in_place is None:
                    layer._in_place = _InPlace(layer.backend, layer.router.cache_routes)
                    layer.backend, layer.frozen = MergedDispatch(cache=True), True
                    layer.router.set_route_cache(True)
                layer._in_place.blocks += 1
                joined.append((layer, layer._in_place))
        yield model
    finally:
        with _IN_PLACE_LOCK:
            for layer, state in joined:
                state.blocks -= 1
                # (a layer frozen for good inside the block, freeze_for_inference, dropped its record)
                if state.blocks == 0 and layer._in_place is state:
                    layer.backend, layer.frozen, layer._in_place = state.backend, False, None
                    layer.router.set_route_cache(state.cache_routes)


def _check_input(x, d_model: int) -> None:
    """Raises unless ``x`` is a floating-point [T, D] or [B, S, D] tensor with D = ``d_model``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"MoE input must be a floating-point tensor, got {_describe(x)}")
    if x.dim() not in (2, 3):
        raise ValueError(f"MoE input must be [T, D] or [B, S, D], got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(
            f"MoE input has feature size {x.shape[-1]} but the layer was built with "
            f"d_model={d_model} (input shape {tuple(x.shape)})"
        )


def _check_finite(x: torch.Tensor, x_TD: torch.Tensor, valid_T: torch.Tensor) -> None:
    """Raises if a token that is not padding holds a non-finite value, naming the first one."""
    # One reduction finds out whether anything is non-finite (or the sum overflowed); only
    # then are tokens checked one by one, ignoring padding (which may hold anything).
    if math.isfinite(x_TD.sum().item()):
        return
    bad = ~torch.isfinite(x_TD).all(-1) & valid_T
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        where = first if x.dim() == 2 else divmod(first, x.shape[1])
        raise ValueError(
            f"MoE input has non-finite values in {int(bad.sum())} token(s); first at "
            f"{'token' if x.dim() == 2 else '(batch, position)'} {where}"
        )

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
