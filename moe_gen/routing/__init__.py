"""Routing: per-token tags, router inputs by strategy, gates, capacity and auxiliary losses."""

from moe_gen.routing import gates, inputs  # noqa: F401  (fill the ROUTERS and GATES registries)
from moe_gen.routing.capacity import capacity_for, slot_positions
from moe_gen.routing.gates import GateChoice
from moe_gen.routing.losses import auxiliary_losses, balance_loss, importance_loss, z_loss
from moe_gen.routing.output import RouterOutput
from moe_gen.routing.router import Router
from moe_gen.routing.tags import MODALITIES, PASSES, ROLES, TagBatch, TokenTags, attribute_dim, modality_index

__all__ = [
    "MODALITIES", "PASSES", "ROLES", "TagBatch", "TokenTags", "attribute_dim", "modality_index",
    "Router", "RouterOutput", "GateChoice", "capacity_for", "slot_positions",
    "auxiliary_losses", "balance_loss", "importance_loss", "z_loss",
]
