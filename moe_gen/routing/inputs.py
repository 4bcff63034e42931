"""Router inputs by strategy: what a router looks at before it scores experts.

Shape legend: T tokens (flattened, padding included), D model width, A attribute width.

| strategy    | z (router input, [T, D])                        | content-dependent |
|-------------|--------------------------------------------------|-------------------|
| token       | x                                                | yes               |
| context     | x + W·mean(x over the token's sequence)          | yes               |
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
    """

    content_dependent: bool = True
    needs_tags: bool = False
    reads_segments: bool = True

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
    """z = x + W·pooled(x): the token plus a summary of its own sequence.

    The mean is taken over the valid tokens of each sequence (``segment_T``), so neither padding
    nor the other examples in the batch change a token's route.
    """

    def __init__(self, d_model: int, config: RouterConfig) -> None:
        super().__init__(d_model, config)
        self.context_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_TD, tags, segment_T, valid_T):
        num_segments = int(segment_T.max()) + 1 if segment_T.numel() else 1
        weight_T1 = valid_T.to(x_TD.dtype).unsqueeze(1)
        # where() and not multiplication: padding may hold non-finite values.
        x_valid_TD = torch.where(valid_T.unsqueeze(1), x_TD, torch.zeros_like(x_TD))
        sums_SD = x_TD.new_zeros(num_segments, x_TD.shape[1]).index_add(0, segment_T, x_valid_TD)
        counts_S1 = weight_T1.new_zeros(num_segments, 1).index_add(0, segment_T, weight_T1)
        mean_SD = sums_SD / counts_S1.clamp_min(1.0)
        # The router runs with autocast off: match the projection's dtype (bf16 inputs, fp32 weights).
        context_SD = self.context_proj(mean_SD.to(self.context_proj.weight.dtype)).to(x_TD.dtype)
        return x_TD + context_SD[segment_T]


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
        return x_TD + self.attributes(tags).to(x_TD.dtype)


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
