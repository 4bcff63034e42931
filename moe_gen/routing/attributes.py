"""The attribute vector of Uni-Perceiver-MoE, generalised: the tag layout attribute routers read.

Layout (width ``attribute_dim(M, R, P)``): the modalities the token's task uses (M bits), the
token's modality (M, one-hot), its role (R, one-hot), causal (1 bit), its pass (P, one-hot). New
tasks are new combinations of known bits, which is what lets attribute routing generalise.
"""

from __future__ import annotations

import torch

__all__ = ["attribute_dim", "attribute_vector"]


def attribute_dim(num_modalities: int, num_roles: int, num_passes: int) -> int:
    """Width A of the attribute vector."""
    return 2 * num_modalities + num_roles + 1 + num_passes


def attribute_vector(tags, num_modalities: int, num_roles: int, num_passes: int) -> torch.Tensor:
    """float32 ``[..., A]``: the attribute vector of every token of ``tags`` (a ``TokenTags``)."""
    one_hot = torch.nn.functional.one_hot
    return torch.cat(
        [
            tags.task_modalities.float(),
            one_hot(tags.modality, num_modalities).float(),
            one_hot(tags.role, num_roles).float(),
            tags.causal.float().unsqueeze(-1),
            one_hot(tags.pass_id, num_passes).float(),
        ],
        dim=-1,
    )
