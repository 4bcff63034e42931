"""Streaming record of what every MoE layer of a model decided, by tag group.

Shape legend: L recorded MoE layers (in ``named_modules`` order), E experts (the most any layer
has), T tokens of one call (flattened, padding included), K assignment slots per token, Tk task
ids, M modalities, R roles, G = Tk·M·R tag groups, P consecutive-layer pairs.

    with RoutingRecorder(model) as recorder:
        for batch in batches:
            model(batch)                  # or model.infer(...): generation steps count too
    tables = recorder.tables()            # RoutingTables: counts_LETMR, entropy_LTMR, ...

The recorder holds fixed-size tables, whatever the number of tokens. One forward hook per MoE
layer keeps (detached) references to the call's routing tensors in a bounded buffer; every
``flush_tokens`` tokens the buffer is concatenated and added into the tables with a fixed number
of tensor ops (``index_add_``; no Python loop over tokens), so a long evaluation costs memory for
the tables and one buffer only, and thousands of tiny generation-step calls cost microseconds each.
Tables accumulate in float64, which counts exactly up to 2**53 assignments per cell.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from moe_gen.moe import MoE
from moe_gen.routing.tags import ROLES, TagBatch, TokenTags

__all__ = ["RoutingRecorder", "RoutingTables", "stack_of"]


@dataclasses.dataclass
class RoutingTables:
    """What a ``RoutingRecorder`` aggregated, on the CPU in float64 (counts are whole numbers).

    Attributes:
        layer_names: module name of each recorded MoE layer ``[L]``.
        num_experts: experts of each layer ``[L]`` (columns past it are zero).
        task_names, modality_names, role_names: the names of the tag values ``[Tk]``, ``[M]``, ``[R]``.
        counts_LETMR: assignments computed (after capacity drops) by layer, expert, and the task,
            modality and role of the token. A token routed to k experts counts k times.
        weights_LETMR: summed gate weights of those assignments (0 for dropped ones).
        probs_LETMR: summed router probability of each expert over the group's valid tokens
            (the "importance" of Shazeer et al. 2017, per group).
        tokens_LTMR: valid (non-padding) tokens routed.
        dropped_LTMR: valid tokens none of whose assignments was computed (capacity drops).
        entropy_LTMR: summed per-token entropy of the router probabilities, in nats.
        dropped_assignments_L: assignments dropped by capacity.
        calls_L: forward calls recorded.
        pair_layers: ``[P]`` pairs ``(l, l+1)`` of consecutive MoE layers of one stack.
        pairs_PEE: for each pair, tokens whose top-1 expert (largest computed gate weight) was
            ``e`` at the first layer and ``e'`` at the second, counted when both layers ran on the
            same tokens one after the other and computed an assignment for the token.
    """

    layer_names: list[str]
    num_experts: list[int]
    task_names: list[str]
    modality_names: list[str]
    role_names: list[str]
    counts_LETMR: torch.Tensor
    weights_LETMR: torch.Tensor
    probs_LETMR: torch.Tensor
    tokens_LTMR: torch.Tensor
    dropped_LTMR: torch.Tensor
    entropy_LTMR: torch.Tensor
    dropped_assignments_L: torch.Tensor
    calls_L: list[int]
    pair_layers: list[tuple[int, int]]
    pairs_PEE: torch.Tensor

    _TENSORS = ("counts_LETMR", "weights_LETMR", "probs_LETMR", "tokens_LTMR", "dropped_LTMR", "entropy_LTMR",
                "dropped_assignments_L", "pairs_PEE")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested lists and strings (JSON)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.tolist() if isinstance(value, torch.Tensor) else value
        out["pair_layers"] = [list(p) for p in self.pair_layers]
        out["shape"] = list(self.counts_LETMR.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingTables":
        """Inverse of ``to_dict`` (empty tables keep their shape)."""
        L, E, Tk, M, R = data["shape"]
        shapes = {"counts_LETMR": (L, E, Tk, M, R), "weights_LETMR": (L, E, Tk, M, R),
                  "probs_LETMR": (L, E, Tk, M, R), "tokens_LTMR": (L, Tk, M, R), "dropped_LTMR": (L, Tk, M, R),
                  "entropy_LTMR": (L, Tk, M, R), "dropped_assignments_L": (L,),
                  "pairs_PEE": (len(data["pair_layers"]), E, E)}
        kwargs = {}
        for field in dataclasses.fields(cls):
            value = data[field.name]
            if field.name in cls._TENSORS:
                value = torch.tensor(value, dtype=torch.float64).reshape(shapes[field.name])
            kwargs[field.name] = value
        kwargs["pair_layers"] = [tuple(p) for p in data["pair_layers"]]
        return cls(**kwargs)


def stack_of(name: str) -> tuple[str, int]:
    """The stack a layer belongs to and its block index there: ``encoder.blocks.3.ffn`` →
    ``("encoder.blocks", 3)``; names without a numeric part are their own stack."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i])
    return name, 0


class RoutingRecorder:
    """Hooks every MoE layer of ``model`` and aggregates its routing decisions as it goes.

    Use it as a context manager (hooks are attached on entry and removed on exit; the tables
    stay readable afterwards) or call ``start()`` / ``stop()``. Recording runs under
    ``torch.no_grad`` and never changes what the model computes.

    Cost: the hook itself only keeps (detached) references to the call's routing tensors; every
    ``flush_tokens`` tokens (and on ``stop()`` / ``tables()``) the buffered calls are concatenated
    and added into the tables with a fixed number of tensor ops, whatever the number of calls, so
    many small calls (one per generated position) cost a few microseconds each. The buffer is
    bounded: memory does not grow with the length of the evaluation.

    Args:
        model: any module containing ``moe_gen.MoE`` layers (a ``GeneralistModel``, a bare ``MoE``).
            A model without MoE layers (a dense twin) records nothing and gives empty tables.
        task_names: names of task ids; default the model's ``config.tasks`` when it has them.
        modality_names: names of modality ids; default the model's ``config.modalities`` (the
            vocabulary it was trained with), else the modality tag vocabulary.
        flush_tokens: tokens buffered before they are added into the tables.

    Tokens of layers called without tags are counted as task 0, modality 0, role 0.
    """

    def __init__(self, model: nn.Module, *, task_names: Optional[Sequence[str]] = None,
                 modality_names: Optional[Sequence[str]] = None, flush_tokens: int = 1 << 15) -> None:
        if flush_tokens < 1:
            raise ValueError(f"flush_tokens must be >= 1, got {flush_tokens}")
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.model = model
        self.layer_names = [name for name, _ in layers]
        self.modules = [m for _, m in layers]
        self.num_experts = [m.config.num_experts for m in self.modules]
        routers = [m.config.router for m in self.modules]
        config_tasks = getattr(getattr(model, "config", None), "tasks", None)
        self.task_names = list(task_names if task_names is not None else (config_tasks or []))
        if modality_names is None:
            from moe_gen.tasks.modalities.base import modality_tag_names

            # the vocabulary the model was trained with (saved in its config), else this process's
            modality_names = getattr(getattr(model, "config", None), "modalities", None) or modality_tag_names()
        self.modality_names = list(modality_names)
        self.role_names = list(ROLES)
        # Tag sizes: every layer validates its tags against its own router config, so the largest
        # sizes hold every tag any layer can see (without MoE layers: the names' sizes).
        self.Tk = max([rc.num_tasks for rc in routers], default=max(len(self.task_names), 1))
        self.M = max([rc.num_modalities for rc in routers], default=max(len(self.modality_names), 1))
        self.R = max([rc.num_roles for rc in routers], default=len(ROLES))
        self.E = max(self.num_experts, default=1)
        self.G = self.Tk * self.M * self.R
        self.flush_tokens = flush_tokens
        # Pairs of consecutive MoE layers of one stack: layer l's predecessor l - 1 and pair id.
        self.predecessor: list[Optional[int]] = [None] * len(layers)
        self.pair_of: list[Optional[int]] = [None] * len(layers)
        self.pair_layers: list[tuple[int, int]] = []
        for layer in range(1, len(layers)):
            (stack_a, block_a) = stack_of(self.layer_names[layer - 1])
            (stack_b, block_b) = stack_of(self.layer_names[layer])
            if stack_a == stack_b and block_a <= block_b:
                self.predecessor[layer] = layer - 1
                self.pair_of[layer] = len(self.pair_layers)
                self.pair_layers.append((layer - 1, layer))
        self._index = {id(m): layer for layer, m in enumerate(self.modules)}
        self.device = _device_of(self.modules[0]) if self.modules else torch.device("cpu")
        self._handles: list = []
        self.reset()

    # ---- life cycle --------------------------------------------------------------------------

    def reset(self) -> None:
        """Zeroes every table and empties the buffer."""
        L, G, E, d, f64 = len(self.modules), self.G, self.E, self.device, torch.float64
        # Flat tables: assignments [L·G·E, 2] (count, gate-weight sum) at (l·G + g)·E + e; per-token
        # sums [L·G, E + 3] (probabilities per expert, tokens, entropy in nats, dropped tokens) at
        # l·G + g; dropped assignments [L]; top-1 pairs [P·E·E] at (p·E + e)·E + e'.
        self._assign = torch.zeros(L * G * E, 2, dtype=f64, device=d)
        self._token = torch.zeros(L * G, E + 3, dtype=f64, device=d)
        self._dropped_assign = torch.zeros(L, dtype=f64, device=d)
        self._pairs = torch.zeros(len(self.pair_layers) * E * E, dtype=f64, device=d)
        self.calls = [0] * L
        self._buffer: list[tuple] = []
        self._buffered_tokens = 0
        self._carry: Optional[tuple] = None  # (layer, tokens, top1_T, computed_T) of the last flushed call

    def start(self) -> "RoutingRecorder":
        """Attaches the hooks (idempotent)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def stop(self) -> None:
        """Adds what is buffered into the tables and removes the hooks; the tables are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.flush()
        self._carry = None  # a later call does not continue the last one's tokens

    def __enter__(self) -> "RoutingRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the hook ----------------------------------------------------------------------------

    def _groups(self, tags: Union[TokenTags, TagBatch, None], num_tokens: int, device) -> torch.Tensor:
        """Tag group id ``g = (task·M + modality)·R + role`` of each token ``[T]`` (0 without tags)."""
        flat = tags.tags if isinstance(tags, TagBatch) else None if tags is None else tags.flatten()
        if flat is None:
            return torch.zeros(num_tokens, dtype=torch.long, device=device)
        return self._group_ids(flat)

    def _group_ids(self, flat: TokenTags) -> torch.Tensor:
        return (flat.task.long() * self.M + flat.modality.long()) * self.R + flat.role.long()

    def _hook(self, module, args, kwargs, output) -> None:
        layer = self._index[id(module)]
        routing = output.routing
        tags = kwargs["tags"] if "tags" in kwargs else (args[1] if len(args) > 1 else None)
        probs_TE = routing.probs.detach()
        T, E = probs_TE.shape
        g_T = self._groups(tags, T, probs_TE.device)
        if E < self.E:  # a layer with fewer experts than the widest one
            probs_TE = torch.cat((probs_TE, probs_TE.new_zeros(T, self.E - E)), dim=1)
        # Detached references only: no autograd graph is kept alive by the buffer.
        self._buffer.append((layer, T, g_T, routing.topk_ids, routing.mask, routing.topk_weights.detach(), probs_TE,
                             routing.valid, routing.dropped_assignments))
        self._buffered_tokens += T
        self.calls[layer] += 1
        if self._buffered_tokens >= self.flush_tokens:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Adds the buffered calls into the tables (a fixed number of ops for the whole buffer)."""
        if not self._buffer:
            return
        calls, self._buffer, self._buffered_tokens = self._buffer, [], 0
        d, f64, G, E = self.device, torch.float64, self.G, self.E
        cat = lambda i: torch.cat([c[i].to(d) for c in calls]) if len(calls) > 1 else calls[0][i].to(d)
        layer_N = torch.tensor([c[0] for c in calls], device=d)
        length_N = torch.tensor([c[1] for c in calls], device=d)
        row_T = torch.repeat_interleave(layer_N, length_N) * G + cat(2)  # l·G + g of every token
        probs_TE, valid_T = cat(6), cat(7)

        # Assignments by (layer, group, expert): counts and gate-weight sums in one index_add_.
        # Calls with different K (top-k vs expert choice) are added per K.
        computed = []
        for K in sorted({c[3].shape[1] for c in calls}):
            part = [i for i, c in enumerate(calls) if c[3].shape[1] == K]
            sub = [calls[i] for i in part]
            ids_TK = torch.cat([c[3].to(d) for c in sub])
            mask_TK = torch.cat([c[4].to(d) for c in sub])
            w_TK = torch.cat([c[5].to(d) for c in sub])
            rows = row_T if len(sub) == len(calls) else torch.cat([row_T[s:s + n] for s, n in _spans(calls, part)])
            cell_TK = rows.unsqueeze(1) * E + ids_TK
            values = torch.stack((mask_TK.to(f64), w_TK.to(f64)), dim=-1)
            self._assign.index_add_(0, cell_TK.reshape(-1), values.reshape(-1, 2))
            # Top-1 route: the computed assignment with the largest gate weight (argmax takes the
            # first of equal weights: the gate's first choice for the hash gate).
            top1_T = ids_TK.gather(1, w_TK.argmax(dim=1, keepdim=True)).squeeze(1)
            computed.append((part, top1_T, mask_TK.any(dim=1)))
        if len(computed) == 1:
            top1_T, computed_T = computed[0][1], computed[0][2]
        else:  # back to call order
            top1_T = torch.empty(row_T.shape[0], dtype=torch.long, device=d)
            computed_T = torch.empty(row_T.shape[0], dtype=torch.bool, device=d)
            for part, top1, comp in computed:
                index = torch.cat([torch.arange(s, s + n, device=d) for s, n in _spans(calls, part)])
                top1_T[index], computed_T[index] = top1, comp

        # Per-token sums by (layer, group): probabilities, token count, entropy, dropped tokens.
        # The entropy is of each row normalised to sum 1 (sigmoid scores are affinities that do not;
        # softmax rows already do), so it stays within log E. Padding rows are zero: entropy 0.
        dist_TE = probs_TE / probs_TE.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).tiny)
        entropy_T = -torch.special.xlogy(dist_TE, dist_TE).sum(dim=1)
        per_token = torch.cat((probs_TE.to(f64), torch.stack((valid_T.to(f64), entropy_T.to(f64),
                                                              (valid_T & ~computed_T).to(f64)), dim=1)), dim=1)
        self._token.index_add_(0, row_T, per_token)
        self._dropped_assign.index_add_(0, layer_N, torch.stack([c[8].to(d) for c in calls]).to(f64))

        # Top-1 pairs of consecutive layers that ran one after the other on the same tokens.
        self._add_pairs(calls, top1_T, computed_T)
        last = calls[-1]
        self._carry = (last[0], last[1], top1_T[-last[1]:], computed_T[-last[1]:]) if last[1] else None

    def _add_pairs(self, calls, top1_T, computed_T) -> None:
        if not self.pair_layers:
            return
        E, d = self.E, self.device
        starts, offset = [], 0
        for c in calls:
            starts.append(offset)
            offset += c[1]
        first, second, pair = [], [], []
        carry = self._carry
        if carry is not None:  # the previous flush's last call may precede this flush's first
            layer, T = calls[0][0], calls[0][1]
            if self.predecessor[layer] == carry[0] and carry[1] == T and T:
                both = carry[3] & computed_T[:T]
                cell = (self.pair_of[layer] * E + carry[2]) * E + top1_T[:T]
                self._pairs.index_add_(0, cell, both.to(torch.float64))
        for i in range(1, len(calls)):
            layer, T = calls[i][0], calls[i][1]
            if self.predecessor[layer] == calls[i - 1][0] and calls[i - 1][1] == T and T:
                first.append(torch.arange(starts[i - 1], starts[i - 1] + T, device=d))
                second.append(torch.arange(starts[i], starts[i] + T, device=d))
                pair.append(torch.full((T,), self.pair_of[layer], device=d))
        if first:
            a, b, p = torch.cat(first), torch.cat(second), torch.cat(pair)
            cell = (p * E + top1_T[a]) * E + top1_T[b]
            self._pairs.index_add_(0, cell, (computed_T[a] & computed_T[b]).to(torch.float64))

    # ---- reading -----------------------------------------------------------------------------

    def tables(self) -> RoutingTables:
        """The aggregates so far (buffered calls included), on the CPU, with the task dimension cut
        to the named tasks (or to the highest task id seen, if that is larger)."""
        self.flush()
        L, E, Tk, M, R = len(self.modules), self.E, self.Tk, self.M, self.R
        assign = self._assign.cpu().view(L, Tk, M, R, E, 2)
        token = self._token.cpu().view(L, Tk, M, R, E + 3)
        seen = (token[..., E].sum(dim=(0, 2, 3)) > 0).nonzero()
        keep = max(len(self.task_names), int(seen.max()) + 1 if seen.numel() else 0, 1)
        keep = min(keep, Tk)
        task_names = list(self.task_names[:keep]) + [f"task{i}" for i in range(len(self.task_names), keep)]
        modality_names = list(self.modality_names[:M]) + [f"modality{i}" for i in range(len(self.modality_names), M)]
        role_names = list(self.role_names[:R]) + [f"role{i}" for i in range(len(self.role_names), R)]
        return RoutingTables(
            layer_names=list(self.layer_names),
            num_experts=list(self.num_experts),
            task_names=task_names,
            modality_names=modality_names,
            role_names=role_names,
            counts_LETMR=assign[..., 0].permute(0, 4, 1, 2, 3)[:, :, :keep].contiguous(),
            weights_LETMR=assign[..., 1].permute(0, 4, 1, 2, 3)[:, :, :keep].contiguous(),
            probs_LETMR=token[..., :E].permute(0, 4, 1, 2, 3)[:, :, :keep].contiguous(),
            tokens_LTMR=token[..., E][:, :keep].contiguous(),
            entropy_LTMR=token[..., E + 1][:, :keep].contiguous(),
            dropped_LTMR=token[..., E + 2][:, :keep].contiguous(),
            dropped_assignments_L=self._dropped_assign.cpu().clone(),
            calls_L=list(self.calls),
            pair_layers=list(self.pair_layers),
            pairs_PEE=self._pairs.cpu().view(len(self.pair_layers), E, E).clone(),
        )


def _spans(calls, part: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) in the concatenated tokens of the calls whose indices are ``part``."""
    starts, offset = [], 0
    for c in calls:
        starts.append(offset)
        offset += c[1]
    return [(starts[i], calls[i][1]) for i in part]


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
