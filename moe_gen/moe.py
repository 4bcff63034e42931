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

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_gen.config import MoEConfig
from moe_gen.experts.dispatch import DispatchBackend, make_backend
from moe_gen.experts.experts import DenseFFN
from moe_gen.registry import EXPERTS
from moe_gen.routing.losses import auxiliary_losses
from moe_gen.routing.router import Router, RouterOutput
from moe_gen.routing.tags import TokenTags

# Registering modules: importing them fills ROUTERS, GATES, EXPERTS and BACKENDS.
import moe_gen.routing  # noqa: F401,E402  isort: skip
import moe_gen.experts  # noqa: F401,E402  isort: skip

if TYPE_CHECKING:
    from moe_gen.experts.parallel import ExpertParallel

__all__ = ["MoE", "MoEOutput"]


class MoEOutput:
    """What one MoE call returns.

    Attributes:
        output: ``[T, D']`` or ``[B, S, D']`` like the input; zero for padding and for tokens whose
            every assignment was dropped (they continue on the residual path).
        aux_losses: named auxiliary losses, each already multiplied by its configured weight.
            Without autograd (inference) they are computed on first access only: nothing could
            differentiate them, and generation never reads them.
        routing: the router's decision (ids, weights, probabilities, counts, drops).
    """

    def __init__(self, output: torch.Tensor, aux_losses, routing: RouterOutput) -> None:
        self.output = output
        self.routing = routing
        # a dict, or a function computing it (called once, on first access)
        self._aux_losses = aux_losses

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


class MoE(nn.Module):
    """A mixture-of-experts FFN routed by hidden states and/or per-token tags.

    Args:
        config: ``MoEConfig``; ``capacity_factor=None`` is dropless.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
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
        # Expert parallelism (set by moe_gen.experts.parallel.shard_experts): this rank then holds
        # a slice of the experts, and dispatch → experts → combine runs across ranks instead.
        self.expert_parallel: ExpertParallel | None = None

    def clear_cache(self) -> None:
        """Drops the inference caches (routes per set of tag groups, merged expert weights). They
        follow optimizer steps, ``load_state_dict`` and ``.to()`` by themselves; writes through
        ``param.data`` bypass the version counters they check, so call this after such writes."""
        self.router.clear_cache()
        if hasattr(self.backend, "clear_cache"):
            self.backend.clear_cache()

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
        self.backend = backend
        self.config = self.config.replace(backend=name)

    def forward(
        self,
        x: torch.Tensor,
        tags: TokenTags | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Args:
            x: ``[T, D]`` or ``[B, S, D]`` hidden states.
            tags: ``TokenTags`` shaped like the tokens (``[T]`` or ``[B, S]``); required by tag
                strategies (modality, task, attribute, hybrid) and grouped balance losses.
            padding_mask: bool, shaped like the tokens, True where a position is padding.
                Padding is not routed, takes no capacity, adds to no loss and outputs zeros.

        Returns:
            ``MoEOutput`` (output shaped like x with width D').
        """
        x_TD, tags_T, valid_T, segment_T = self._flatten_inputs(x, tags, padding_mask)

        routing = self.router(x_TD, tags_T, valid_T, segment_T)
        if self.training and self.router.balances_by_bias:
            # loss-free balancing of tag routes: the next forward's selection bias (no gradient)
            self.router.update_balance_bias(routing)
        if torch.is_grad_enabled():
            aux_losses = auxiliary_losses(routing, tags_T, self.config.router)
        else:  # no graph to build: computed if and when someone reads them
            aux_losses = functools.partial(auxiliary_losses, routing, tags_T, self.config.router)

        if self.expert_parallel is not None:  # tokens go to the ranks holding their experts
            y_TD = self.expert_parallel(self.experts, x_TD, routing, self.backend)
        else:
            dispatched = self.backend.dispatch(x_TD, routing)
            expert_outputs = self.backend.run(self.experts, dispatched)
            y_TD = self.backend.combine(expert_outputs, dispatched, x_TD)
        if y_TD is None:  # no assignment computed at all (every token padding or dropped)
            y_TD = x_TD.new_zeros(x_TD.shape[0], self.experts.d_out)

        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                # Qwen2-MoE: each token takes a sigmoid-gated share of the shared expert
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD.to(shared_TD.dtype) + torch.where(valid_T.unsqueeze(1), shared_TD, 0.0)
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), aux_losses, routing)

    def _flatten_inputs(self, x, tags, padding_mask):
        """Validates the inputs and flattens them to tokens; errors name what is wrong."""
        cfg = self.config
        _check_input(x, cfg.d_model)
        token_shape = tuple(x.shape[:-1])
        T = x[..., 0].numel()
        valid_T = _valid_tokens(padding_mask, tags, token_shape, T, x.device)
        x_TD = x.reshape(T, cfg.d_model)
        if cfg.check_finite:
            _check_finite(x, x_TD, valid_T)
        tags_T = self._flatten_tags(tags, token_shape)
        if tags is None:
            segment_T = _segments(x, tags_T)
        else:
            segment_T = tags.derived(f"segments {tuple(x.shape[:-1])}", lambda: _segments(x, tags_T))
        return x_TD, tags_T, valid_T, segment_T

    def _flatten_tags(self, tags, token_shape: tuple[int, ...]):
        """The tags flattened to tokens, checked against the tokens and the router's vocabularies;
        None when there are none and the router can do without."""
        rc = self.config.router
        if tags is None:
            if self.router.needs_tags:
                raise ValueError(
                    f"router strategy {rc.strategy!r} routes by tags; pass tags=TokenTags(...) "
                    f"shaped like the tokens {token_shape}"
                )
            if rc.balance_loss_groups and self.router.content_dependent and rc.balance_loss_weight > 0:
                raise ValueError(
                    f"balance_loss_groups={list(rc.balance_loss_groups)} needs tags; pass tags="
                )
            return None
        if not isinstance(tags, TokenTags):
            raise ValueError(f"tags must be a TokenTags, got {type(tags).__name__}")
        tags.validate(
            token_shape, num_modalities=rc.num_modalities, num_roles=rc.num_roles,
            num_passes=rc.num_passes, num_tasks=rc.num_tasks,
        )
        return tags.flatten()


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


def _valid_tokens(padding_mask, tags, token_shape: tuple[int, ...], T: int, device: torch.device) -> torch.Tensor:
    """valid_T: True for every token that is not padding (all of them without a padding_mask)."""
    if padding_mask is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    if not isinstance(padding_mask, torch.Tensor) or tuple(padding_mask.shape) != token_shape:
        raise ValueError(
            f"padding_mask must be shaped like the tokens {token_shape}, got "
            f"{_describe(padding_mask)}"
        )
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be bool (True = padding), got {padding_mask.dtype}")
    if isinstance(tags, TokenTags):  # one valid mask per forward, shared by the layers
        return tags.derived("valid", lambda: ~padding_mask.reshape(T), padding_mask)
    return ~padding_mask.reshape(T)


def _check_finite(x: torch.Tensor, x_TD: torch.Tensor, valid_T: torch.Tensor) -> None:
    """Raises if a token that is not padding holds a non-finite value, naming the first one."""
    # One reduction finds out whether anything is non-finite (or the sum overflowed); only
    # then are tokens checked one by one, ignoring padding (which may hold anything).
    if bool(torch.isfinite(x_TD.sum())):
        return
    bad = ~torch.isfinite(x_TD).all(-1) & valid_T
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        where = first if x.dim() == 2 else divmod(first, x.shape[1])
        raise ValueError(
            f"MoE input has non-finite values in {int(bad.sum())} token(s); first at "
            f"{'token' if x.dim() == 2 else '(batch, position)'} {where}"
        )

def _segments(x: torch.Tensor, tags_T: TokenTags | None) -> torch.Tensor:
    """Sequence index of each token, for context pooling: rows of [B, S], refined by
    tags.sample when samples are packed into rows."""
    T = x[..., 0].numel()
    if x.dim() == 3:
        segment_T = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])
    else:
        segment_T = torch.zeros(T, dtype=torch.long, device=x.device)
    if tags_T is not None and tags_T.sample is not None and tags_T.sample.numel():
        # (row, sample) → one id; ids need not be contiguous (pooling sizes by the max id).
        sample_T = tags_T.sample.long()
        segment_T = segment_T * (int(sample_T.max()) + 1) + sample_T
    return segment_T


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
