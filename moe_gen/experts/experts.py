"""Experts with stacked weights, and the dense FFN they are compared against.

Shape legend: E experts, D model width, H expert hidden width, N rows sorted by expert, C slots
per expert (padded layout), K experts merged for one tag group.

Weights are stored stacked, ``w_in [E, D, H]`` and ``w_out [E, H, D]`` (``[E, D, 2H]`` holding
``[gate | up]`` for gated experts), so that experts can be sliced, sharded and merged without a
ModuleList. Each expert kind offers the entry points the dispatch backends need:

- ``forward_sorted(x_ND, counts)``: rows already grouped by expert (the fast path): ``counts``
  as Python ints runs one matmul per expert and projection; as a long tensor on the rows' device
  (the ``grouped`` backend), one grouped GEMM per projection, with nothing read back to the host;
- ``forward_expert(e, x)``: one expert, plain autograd (the eager oracle);
- ``forward_padded(x_ECD)``: a padded ``[E, C, D]`` batch (GShard's einsum layout);
- ``forward_merged(x, ids_K, weights_K)``: one dense layer equal to Σ_k w_k · expert_k(x);
  ``merged_weights`` → ``stack_merged`` → ``forward_merged_groups`` run several such routes in
  one call (the ``merged`` backend caches the first two at inference).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from moe_gen.config import ExpertsConfig
from moe_gen.experts.grouped import (
    ACTIVATIONS,
    activate,
    expert_of_rows,
    grouped_ffn,
    grouped_ffn_scaled,
    grouped_mm_fits,
    grouped_mm_linear,
    scaled_ffn,
)
from moe_gen.registry import EXPERTS

__all__ = ["StackedExperts", "MLPExperts", "GLUExperts", "LinearExperts", "DenseFFN"]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls would run in: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    if _autocast_on(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _autocast_on(device: str) -> bool:
    """Autocast is on for ``device`` (a device type autocast does not know, e.g. meta, never has it)."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (None stays None; no operation when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _no_autocast(x: torch.Tensor):
    """A context with autocast off on ``x``'s device (nothing to enter when it is off already)."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if _autocast_on(device) else contextlib.nullcontext()


class StackedExperts(nn.Module):
    """E expert FFNs with weights stacked on a leading expert dimension.

    Args:
        d_model: D (input width).
        d_hidden: H (hidden width; the output width for linear experts).
        num_experts: E.
        config: activation, bias.
    """

    gated = False

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, config: ExpertsConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown expert activation {config.activation!r}; known: {', '.join(ACTIVATIONS)}"
            )
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.activation = config.activation
        in_width = 2 * d_hidden if self.gated else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b_in = nn.Parameter(torch.empty(num_experts, in_width)) if config.bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model)) if config.bias else None
        self.reset_parameters()

    @property
    def d_out(self) -> int:
        return self.d_model

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
        for w, b in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def _params(self, dtype: torch.dtype):
        return tuple(_cast(p, dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out))

    def forward_sorted(self, x_ND: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert (``counts[e]`` rows for expert e, in expert order); ``counts`` a
        list of ints (one matmul per expert) or a long tensor on the rows' device (grouped GEMMs)."""
        dtype = _autocast_dtype(x_ND)
        w_in, b_in, w_out, b_out = self._params(dtype)
        if isinstance(counts, torch.Tensor) and not grouped_mm_fits(dtype, self.d_model, w_in.shape[2],
                                                                    self.d_hidden, device=x_ND.device):
            counts = counts.tolist()  # what grouped_mm cannot take in one kernel: the loop, at one host read
        # Autocast off: the grouped functions run their matmuls in `dtype` as cast here.
        with _no_autocast(x_ND):
            if isinstance(counts, list):
                return grouped_ffn(x_ND.to(dtype), counts, w_in, b_in, w_out, b_out, self.activation, self.gated)
            expert_N = None if b_in is None else expert_of_rows(counts, x_ND.shape[0])
            h_NH = grouped_mm_linear(x_ND.to(dtype), counts, w_in, b_in, expert_N)
            return grouped_mm_linear(activate(h_NH, self.activation, self.gated), counts, w_out, b_out, expert_N)

    def forward_expert(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens, plain autograd (the reference computation); the weights in the
        input's dtype (autocast's when it is on), as the grouped path casts them."""
        dtype = _autocast_dtype(x_nD)
        h = x_nD.to(dtype) @ self.w_in[e].to(dtype)
        if self.b_in is not None:
            h = h + self.b_in[e].to(h.dtype)  # biases in the matmul's dtype (autocast's), as the grouped path adds them
        y = activate(h, self.activation, self.gated) @ self.w_out[e].to(dtype)
        if self.b_out is not None:
            y = y + self.b_out[e].to(y.dtype)
        return y

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """All experts on a padded ``[E, C, D]`` batch with batched matmuls."""
        dtype = _autocast_dtype(x_ECD)
        h = torch.bmm(x_ECD.to(dtype), self.w_in.to(dtype))
        if self.b_in is not None:
            h = h + self.b_in.unsqueeze(1).to(h.dtype)
        y = torch.bmm(activate(h, self.activation, self.gated), self.w_out.to(dtype))
        if self.b_out is not None:
            y = y + self.b_out.unsqueeze(1).to(y.dtype)
        return y

    def merged_weights(self, ids_K: torch.Tensor, weights_K: torch.Tensor):
        """The dense FFN equal to Σ_k weights_K[k] · expert_{ids_K[k]}: ``(w_in [D, X], b_in [X],
        w_out [X', D], b_out [D])`` with X = K·H (2·K·H for gated experts, ``[gates | ups]``).

        Exact for any activation: the K experts' input projections are concatenated along the
        hidden dimension and their output projections, pre-scaled by the gate weights, stacked
        along it, so act() sees exactly the per-expert hidden units. Cost: a dense FFN.
        ``weights_K=None`` leaves the output projections unscaled, appends the K output biases to
        ``w_out`` as K more rows and returns ``b_out`` None: the gate weights are then applied per
        row (``forward_merged_sets``).
        """
        K, H = ids_K.numel(), self.d_hidden
        w_in_KDH = self.w_in[ids_K]
        if self.gated:
            gate, up = w_in_KDH.chunk(2, dim=-1)
            w_in_DX = torch.cat([_concat_hidden(gate), _concat_hidden(up)], dim=-1)
        else:
            w_in_DX = _concat_hidden(w_in_KDH)
        w_out_KHD = self.w_out[ids_K]
        if weights_K is not None:
            w_out_KHD = w_out_KHD * weights_K.view(K, 1, 1).to(self.w_out.dtype)
        w_out_XD = w_out_KHD.reshape(K * H, -1)
        if weights_K is None and self.b_out is not None:  # the K output biases as K more rows
            w_out_XD = torch.cat([w_out_XD, self.b_out[ids_K]])
        b_in_X = b_out_D = None
        if self.b_in is not None:
            b_in_KH = self.b_in[ids_K]
            if self.gated:
                gate_b, up_b = b_in_KH.chunk(2, dim=-1)
                b_in_X = torch.cat([gate_b.reshape(-1), up_b.reshape(-1)])
            else:
                b_in_X = b_in_KH.reshape(-1)
        if self.b_out is not None and weights_K is not None:
            b_out_D = (weights_K.unsqueeze(1).to(self.b_out.dtype) * self.b_out[ids_K]).sum(0)
        return w_in_DX, b_in_X, w_out_XD, b_out_D

    # The merged backend may run rows of one *set* of experts with different gate weights in one
    # group (inference): merged_weights(ids_K, None), stack_merged, forward_merged_sets.
    merges_expert_sets = True

    def forward_merged_sets(self, x_ND: torch.Tensor, counts: list[int], stacked,
                            scale_NK: torch.Tensor) -> torch.Tensor:
        """Inference: rows sorted by expert set (``counts[r]`` rows each) through ``stacked``
        (``stack_merged`` of ``merged_weights(ids_K, None)``); each row's K blocks of hidden units,
        and the K output biases, are scaled by that row's gate weights ``scale_NK``."""
        dtype = _autocast_dtype(x_ND)
        w_in, b_in, w_out, _ = (_cast(t, dtype) for t in stacked)
        with _no_autocast(x_ND):
            return grouped_ffn_scaled(_cast(x_ND, dtype), counts, w_in, b_in, w_out, scale_NK, self.activation,
                                      self.gated)

    def forward_merged(self, x_nD: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_K[k] · expert_{ids_K[k]}(x) through the merged dense FFN."""
        return self._merged_ffn(x_nD, *self.merged_weights(ids_K, weights_K))

    def stack_merged(self, merged: list):
        """Merged FFNs (from ``merged_weights``) in the layout ``forward_merged_groups`` takes:
        stacked ``[R, ...]`` when all merge the same number of experts (one grouped call), else
        the list."""
        if len({m[0].shape for m in merged}) != 1:
            return merged
        return tuple(None if merged[0][i] is None else torch.stack([m[i] for m in merged]) for i in range(4))

    def forward_merged_groups(self, x_ND: torch.Tensor, counts: list[int], stacked) -> torch.Tensor:
        """Rows sorted by route (``counts[r]`` rows each) through each route's merged FFN
        (``stacked`` from ``stack_merged``)."""
        if isinstance(stacked, tuple):
            if len(counts) == 1 and not torch.is_grad_enabled():  # one route, inference: a dense FFN
                return self.run_merged(x_ND, tuple(None if t is None else t[0] for t in stacked))
            dtype = _autocast_dtype(x_ND)
            with _no_autocast(x_ND):
                return grouped_ffn(_cast(x_ND, dtype), counts, *(_cast(t, dtype) for t in stacked), self.activation,
                                   self.gated)
        pieces, start = [], 0
        for n, merged in zip(counts, stacked):  # (run_merged casts as the stacked branch does)
            pieces.append(self.run_merged(x_ND[start:start + n], merged))
            start += n
        return torch.cat(pieces)

    def run_merged(self, x_ND: torch.Tensor, merged: tuple, scale_NK: torch.Tensor | None = None) -> torch.Tensor:
        """Inference (no autograd): one merged FFN (``merged_weights``) on every row, in the autocast
        dtype if autocast is on. With ``scale_NK`` (weights merged with ``weights_K=None``) each
        row's K blocks of hidden units and K output biases are scaled by its K gate weights."""
        device = x_ND.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self.run_merged(x_ND.to(dtype), tuple(_cast(t, dtype) for t in merged), scale_NK)
        if merged[0].dtype != x_ND.dtype:
            merged = tuple(_cast(t, x_ND.dtype) for t in merged)
        if scale_NK is None:
            return self._merged_ffn(x_ND, *merged)
        return scaled_ffn(x_ND, merged[0], merged[1], merged[2], scale_NK, self.activation, self.gated)

    def _merged_ffn(self, x_ND, w_in_DX, b_in_X, w_out_XD, b_out_D) -> torch.Tensor:
        """One merged FFN (``merged_weights``) on every row; without autograd the activation runs in
        place (its input is a fresh buffer nothing else reads)."""
        h_NX = x_ND @ w_in_DX if b_in_X is None else torch.addmm(b_in_X, x_ND, w_in_DX)
        a_NX = activate(h_NX, self.activation, self.gated, inplace=not torch.is_grad_enabled())
        return a_NX @ w_out_XD if b_out_D is None else torch.addmm(b_out_D, a_NX, w_out_XD)


def _concat_hidden(w_KDH: torch.Tensor) -> torch.Tensor:
    """[K, D, H] → [D, K·H]: expert k's hidden units in columns k·H … (k+1)·H-1."""
    K, D, H = w_KDH.shape
    return w_KDH.permute(1, 0, 2).reshape(D, K * H)


@EXPERTS.register("mlp")
class MLPExperts(StackedExperts):
    """Linear → activation (GELU by default) → Linear, per expert."""


@EXPERTS.register("glu")
class GLUExperts(StackedExperts):
    """Gated experts: (act(x·W_gate) ⊙ x·W_up)·W_down; SwiGLU with ``activation="silu"``.

    ``w_in`` is ``[E, D, 2H]`` holding ``[gate | up]`` so one matmul computes both.
    """

    gated = True


@EXPERTS.register("linear")
class LinearExperts(nn.Module):
    """One linear projection D → H per expert (mixtures of these merge exactly by weight sum).

    Uni-Perceiver-MoE puts such mixtures in the attention and FFN projections; the merged form
    Σ_k w_k·W_k is a single ``[D, H]`` matrix.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, config: ExpertsConfig) -> None:
        super().__init__()
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.bias = nn.Parameter(torch.empty(num_experts, d_hidden)) if config.bias else None
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def d_out(self) -> int:
        return self.d_hidden

    def forward_sorted(self, x_ND: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x_ND)  # the weights in the input's dtype, as the other experts cast theirs
        if isinstance(counts, torch.Tensor):  # a device tensor: one grouped GEMM (the loop where it cannot)
            if grouped_mm_fits(dtype, self.d_model, self.d_hidden, device=x_ND.device):
                return grouped_mm_linear(x_ND.to(dtype), counts, self.weight.to(dtype),
                                         None if self.bias is None else self.bias.to(dtype))
            counts = counts.tolist()
        # One matmul per expert; unbind() (not w[e]) so backward stacks the grads once.
        pieces = [
            x @ w for x, w, n in zip(x_ND.to(dtype).split(counts), self.weight.to(dtype).unbind(0), counts) if n
        ]
        if not pieces:
            return x_ND.new_zeros(0, self.d_hidden, dtype=dtype)
        y = torch.cat(pieces)
        if self.bias is not None:
            expert_N = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_ND.device),
                torch.as_tensor(counts, device=x_ND.device),
            )
            y = y + self.bias[expert_N].to(y.dtype)  # in the matmul's dtype (autocast's): one output dtype
        return y

    def forward_expert(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x_nD)
        y = x_nD.to(dtype) @ self.weight[e].to(dtype)
        return y if self.bias is None else y + self.bias[e].to(y.dtype)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x_ECD)
        y = torch.bmm(x_ECD.to(dtype), self.weight.to(dtype))
        return y if self.bias is None else y + self.bias.unsqueeze(1).to(y.dtype)

    def merged_weights(self, ids_K: torch.Tensor, weights_K: torch.Tensor):
        """``(W [D, H], b [H] or None)`` with W = Σ_k w_k · W_{ids_k}: exact for linear experts."""
        w = weights_K.to(self.weight.dtype)
        bias = None if self.bias is None else (w.unsqueeze(1) * self.bias[ids_K]).sum(0)
        return (w.view(-1, 1, 1) * self.weight[ids_K]).sum(0), bias

    def forward_merged(self, x_nD, ids_K, weights_K):
        return self.run_merged(x_nD, self.merged_weights(ids_K, weights_K))

    merges_expert_sets = False  # a weighted sum of linear maps is one [D, H] matrix per route

    def stack_merged(self, merged: list) -> list:
        return merged

    def run_merged(self, x_ND: torch.Tensor, merged: tuple, scale_NK=None) -> torch.Tensor:
        """One merged projection (``merged_weights``) on every row (no gate scaling: see
        ``merges_expert_sets``)."""
        if scale_NK is not None:
            raise ValueError("linear experts merge each route into one matrix; rows are not scaled per expert")
        return _merged_linear(x_ND, *merged)

    def forward_merged_groups(self, x_ND: torch.Tensor, counts: list[int], merged: list) -> torch.Tensor:
        pieces = [_merged_linear(x, w, b) for x, (w, b), n in zip(x_ND.split(counts), merged, counts) if n]
        return torch.cat(pieces) if pieces else x_ND.new_zeros(0, self.d_hidden, dtype=_autocast_dtype(x_ND))


def _merged_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight + bias`` in the input's dtype (autocast's when on), as the experts cast theirs."""
    dtype = _autocast_dtype(x)
    x, weight, bias = x.to(dtype), weight.to(dtype), _cast(bias, dtype)
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


class DenseFFN(nn.Module):
    """A plain dense FFN (the baseline, and the shared expert): same kinds as the experts.

    Args:
        d_model: D.
        d_hidden: H.
        config: kind (``mlp``, ``glu`` or ``linear``), activation, bias.
    """

    def __init__(self, d_model: int, d_hidden: int, config: ExpertsConfig) -> None:
        super().__init__()
        self.kind, self.activation = config.kind, config.activation
        if self.kind not in ("mlp", "glu", "linear"):
            raise ValueError(f"DenseFFN supports kinds mlp, glu, linear; got {self.kind!r}")
        if self.kind == "linear":
            self.fc_in = nn.Linear(d_model, d_hidden, bias=config.bias)
            self.fc_out = None
        else:
            width = 2 * d_hidden if self.kind == "glu" else d_hidden
            self.fc_in = nn.Linear(d_model, width, bias=config.bias)
            self.fc_out = nn.Linear(d_hidden, d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.fc_in.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # in the input's dtype, as the routed experts compute (bf16 states into an fp32 layer)
            return self._in_dtype(x)
        h = self.fc_in(x)
        if self.fc_out is None:
            return h
        return self.fc_out(activate(h, self.activation, self.kind == "glu"))

    def _in_dtype(self, x: torch.Tensor) -> torch.Tensor:
        def linear(layer: nn.Linear, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(v, layer.weight.to(v.dtype), _cast(layer.bias, v.dtype))

        h = linear(self.fc_in, x)
        return h if self.fc_out is None else linear(self.fc_out, activate(h, self.activation, self.kind == "glu"))
