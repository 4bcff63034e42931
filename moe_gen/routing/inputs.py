"""Router inputs by strategy: what a router looks at before it scores experts.

Shape legend: T tokens (flattened, padding included), D model width, A attribute width.

| strategy    | z (router input, [T, D])                        | content-dependent |
|-------------|--------------------------------------------------|-------------------|
| token       | x                                                | yes               |
| context     | x + W·mean(x over what it sees of its sequence)  | yes               |
| modality    | Embedding(modality)                              | no                |
| task        | Embedding(task)                                  | no                |
| attribute   | LayerNorm(Linear(attribute vector))              | no                |
| hybrid      | x + LayerNorm(Linear(attribute vector))          | yes               |
| instruction | LayerNorm(Linear([attributes, prompt words]))    | no                |

Content-independent strategies give every token of a tag group the same z, hence the same route:
that is what makes merged inference (one dense layer per tag group) exact.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
from torch import nn

from moe_gen.config import RouterConfig
from moe_gen.registry import ROUTERS
from moe_gen.routing.attributes import attribute_dim, attribute_vector
from moe_gen.routing.tags import TokenTags

__all__ = [
    "RouterInput", "TokenInput", "ContextInput", "ModalityInput", "TaskInput", "AttributeInput",
    "HybridInput", "InstructionInput", "word_table",
]


class RouterInput(nn.Module):
    """Base class: ``forward(x_TD, tags, segment_T, valid_T) -> z_TD``.

    Class attributes:
        content_dependent: whether z depends on the hidden state (else only on tags).
        needs_tags: whether ``tags`` must be given.
        reads_segments: whether ``forward`` reads ``segment_T`` (the token's sequence, for pooling);
            inputs that do not get None there, and the router does not derive the segments.
        carries: whether ``forward`` takes ``carry=``: a dict it keeps across the calls of one
            cached decoding (what earlier calls saw of each sequence); given only in cached
            decoding, and only to inputs that set this.
    """

    content_dependent: bool = True
    needs_tags: bool = False
    reads_segments: bool = True
    carries: bool = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.config = config

    def forward(
        self,
        x_TD: torch.Tensor,
        tags: TokenTags | None,
        segment_T: torch.Tensor,
        valid_T: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError


class _AttributeEmbedding(nn.Module):
    """LayerNorm(Linear(attribute vector)): the Uni-Perceiver-MoE attribute router input; with
    ``extra_width``, LayerNorm(Linear([attribute vector, extra features])) (the instruction words)."""

    def __init__(self, d_model: int, config: RouterConfig, extra_width: int = 0) -> None:
        super().__init__()
        self.sizes = (config.num_modalities, config.num_roles, config.num_passes)
        self.proj = nn.Linear(attribute_dim(*self.sizes) + extra_width, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tags: TokenTags, extra_TF: torch.Tensor | None = None) -> torch.Tensor:
        features_TA = attribute_vector(tags, *self.sizes)
        if extra_TF is not None:
            features_TA = torch.cat([features_TA, extra_TF.to(features_TA.dtype)], dim=-1)
        return self.norm(self.proj(features_TA.to(self.proj.weight.dtype)))


@ROUTERS.register("token")
class TokenInput(RouterInput):
    """z = x: the classic learned router (Switch, GShard, Mixtral)."""

    reads_segments = False

    def forward(self, x_TD, tags, segment_T, valid_T):
        return x_TD


@ROUTERS.register("context")
class ContextInput(RouterInput):
    """z = x + W·pooled(x): the token plus a summary of what it sees of its own sequence.

    The mean is taken over the valid tokens of the token's sequence (``segment_T``), so neither
    padding nor the other examples in the batch change its route. A token that is not causal
    (``tags.causal`` False: encoder, prompt) pools over the sequence's tokens that are not causal
    either; a causal one (decoder) over those and the causal tokens up to itself, as it attends: so
    a decoder's routes in training do not read the future, and cached decoding, which pools the
    tokens of earlier calls kept in ``carry``, routes as the full forward does. Tokens of a
    sequence come in position order (the flattened ``[B, S]`` rows).

    ``carry`` (cached decoding: one dict per layer, kept by the caller across calls): ``sum``
    float64 ``[S, D]`` and ``count`` ``[S, 1]`` of each sequence's valid tokens in earlier calls,
    which come before every token of this call; updated in place with this call's tokens.

    What a token sees follows its ``causal`` tag, not the attention mask: the parallel (MaskGIT)
    objective's decoder tokens keep their causal tags while attending both ways, so they pool their
    prefix, and with ``prefix_attention="causal"`` prompt tokens pool the whole prompt; both the
    same in training and inference.
    """

    carries = True

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.context_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_TD, tags, segment_T, valid_T, carry: dict | None = None):
        num_segments = int(segment_T.max()) + 1 if segment_T.numel() else 1
        causal_T = None if tags is None else tags.causal.reshape(-1).bool() & valid_T  # (0/1 integers read as bools)
        causal_T = causal_T if causal_T is not None and bool(causal_T.any()) else None
        if carry:
            num_segments = max(num_segments, carry["sum"].shape[0])
        # Sums in fp32 at least (bf16 would stop counting at 256); fp64 for causal prefixes outside
        # training, where a full forward and cached decoding's carried sums must agree to rounding
        # (training keeps fp32: about half the memory kept for backward).
        acc = torch.promote_types(x_TD.dtype, torch.float32)
        if causal_T is not None or carry is not None:
            acc = acc if torch.is_grad_enabled() and x_TD.requires_grad else torch.float64
        # where() and not multiplication: padding may hold non-finite values.
        open_T = valid_T if causal_T is None else valid_T & ~causal_T
        x_open_TD = torch.where(open_T.unsqueeze(1), x_TD.to(acc), 0.0)
        weight_T1 = open_T.to(acc).unsqueeze(1)
        sums_SD = x_open_TD.new_zeros(num_segments, x_TD.shape[1]).index_add(0, segment_T, x_open_TD)
        counts_S1 = weight_T1.new_zeros(num_segments, 1).index_add(0, segment_T, weight_T1)
        # The router runs with autocast off: match the projection's dtype (bf16 inputs, fp32 weights),
        # and add in the wider of the two (bf16 states of an fp32 layer route as their fp32 values
        # would: the sum was rounded to bf16 before the twenty-sixth session's audit)
        dtype = self.context_proj.weight.dtype
        z_dtype = torch.promote_types(x_TD.dtype, dtype)
        if causal_T is None and carry is None:  # no causal token: every token pools its whole sequence
            mean_SD = sums_SD / counts_S1.clamp_min(1.0)
            return x_TD.to(z_dtype) + self.context_proj(mean_SD.to(dtype)).to(z_dtype)[segment_T]
        mean_TD = self._causal_mean(x_TD.to(acc), segment_T, causal_T, sums_SD, counts_S1, carry)
        return x_TD.to(z_dtype) + self.context_proj(mean_TD.to(dtype)).to(z_dtype)

    @staticmethod
    def _causal_mean(x_TD, segment_T, causal_T, sums_SD, counts_S1, carry):
        """Each token's mean over what it sees (``sums_SD``, ``counts_S1``: the sequences' tokens that
        are not causal); updates ``carry``."""
        if carry:
            sums_SD = sums_SD.index_add(0, torch.arange(carry["sum"].shape[0], device=sums_SD.device),
                                        carry["sum"].to(sums_SD.dtype))
            counts_S1 = counts_S1.index_add(0, torch.arange(carry["count"].shape[0], device=sums_SD.device),
                                            carry["count"].to(sums_SD.dtype))
        seen_TD, seen_T1 = sums_SD[segment_T], counts_S1[segment_T]
        closed_SD, closed_S1 = torch.zeros_like(sums_SD), torch.zeros_like(counts_S1)
        if causal_T is not None:
            # causal tokens: a running sum within the sequence, in position order (a stable sort
            # by sequence keeps it), up to and including the token itself
            causal_T1 = causal_T.unsqueeze(1)
            x_closed_TD = torch.where(causal_T1, x_TD, 0.0)
            c_T1 = causal_T1.to(x_TD.dtype)
            order = torch.sort(segment_T, stable=True).indices
            back, seg_sorted = order.argsort(), segment_T[order]
            closed_SD = closed_SD.index_add(0, segment_T, x_closed_TD)
            closed_S1 = closed_S1.index_add(0, segment_T, c_T1)
            # minus the running sum of the sequences sorted before this one
            before_SD, before_S1 = closed_SD.cumsum(0) - closed_SD, closed_S1.cumsum(0) - closed_S1
            prefix_TD = (x_closed_TD[order].cumsum(0) - before_SD[seg_sorted]).index_select(0, back)
            prefix_T1 = (c_T1[order].cumsum(0) - before_S1[seg_sorted]).index_select(0, back)
            seen_TD = torch.where(causal_T1, seen_TD + prefix_TD, seen_TD)
            seen_T1 = torch.where(causal_T1, seen_T1 + prefix_T1, seen_T1)
        if carry is not None:
            carry["sum"], carry["count"] = (sums_SD + closed_SD).detach(), (counts_S1 + closed_S1).detach()
        return seen_TD / seen_T1.clamp_min(1.0)


@ROUTERS.register("modality")
class ModalityInput(RouterInput):
    """z = Embedding(token modality): one route per modality (OFA+'s MoE, but learned)."""

    content_dependent = False
    needs_tags = True
    reads_segments = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.embedding = nn.Embedding(config.num_modalities, d_model)

    def forward(self, x_TD, tags, segment_T, valid_T):
        return self.embedding(tags.modality)


@ROUTERS.register("task")
class TaskInput(RouterInput):
    """z = Embedding(task id): one route per task; no zero-shot transfer to unseen tasks."""

    content_dependent = False
    needs_tags = True
    reads_segments = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.embedding = nn.Embedding(config.num_tasks, d_model)

    def forward(self, x_TD, tags, segment_T, valid_T):
        return self.embedding(tags.task)


@ROUTERS.register("attribute")
class AttributeInput(RouterInput):
    """z = LayerNorm(Linear(attributes)): Uni-Perceiver-MoE's choice; new tasks are new combos."""

    content_dependent = False
    needs_tags = True
    reads_segments = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.attributes = _AttributeEmbedding(d_model, config)

    def forward(self, x_TD, tags, segment_T, valid_T):
        return self.attributes(tags)


@ROUTERS.register("hybrid")
class HybridInput(RouterInput):
    """z = x + LayerNorm(Linear(attributes)): content routing conditioned on the tags."""

    needs_tags = True
    reads_segments = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.attributes = _AttributeEmbedding(d_model, config)

    def forward(self, x_TD, tags, segment_T, valid_T):
        attributes = self.attributes(tags)  # (added in the wider dtype, as ContextInput adds its context)
        z_dtype = torch.promote_types(x_TD.dtype, attributes.dtype)
        return x_TD.to(z_dtype) + attributes.to(z_dtype)


def word_table(task_words: Sequence[Sequence[str]], num_tasks: int, buckets: int) -> torch.Tensor:
    """float32 ``[num_tasks, W]``: row t is the hashed bag of task t's prompt words (bucket
    ``crc32(word) mod W`` set to 1; a stable hash, so a saved model reads the same buckets)."""
    table = torch.zeros(num_tasks, buckets)
    for t, words in enumerate(task_words):
        for word in words:
            table[t, zlib.crc32(word.encode("utf-8")) % buckets] = 1.0
    return table


@ROUTERS.register("instruction")
class InstructionInput(RouterInput):
    """z = LayerNorm(Linear([attributes, hashed prompt words of the token's task])): the attribute
    vector plus the words of the task's instruction outside its slots, so that tasks over the same
    modalities that ask different things ("what digit is this?", "which digit comes after this
    one?") can take different experts, and a new task is a new combination of known attribute
    bits and words. The words of each task id come from ``RouterConfig.task_words``."""

    content_dependent = False
    needs_tags = True
    reads_segments = False

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.attributes = _AttributeEmbedding(d_model, config, extra_width=config.word_buckets)
        self.register_buffer("words_TkW", word_table(config.task_words, config.num_tasks, config.word_buckets),
                             persistent=False)

    def set_task_words(self, task_words: Sequence[Sequence[str]]) -> None:
        """Replaces the prompt words of the task ids (after the model learns new tasks)."""
        table = word_table(task_words, self.words_TkW.shape[0], self.words_TkW.shape[1])
        self.words_TkW = table.to(self.words_TkW.device)

    def forward(self, x_TD, tags, segment_T, valid_T):
        return self.attributes(tags, self.words_TkW[tags.task])
