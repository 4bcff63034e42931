"""The generalist model: shared encoder-decoder with tag-routed MoE blocks."""

from moe_gen.model.chain import Link, chain
from moe_gen.model.config import FLAVOURS, ModelConfig, MoELayers, flavour
from moe_gen.model.model import GeneralistModel, ModelOutput

__all__ = ["ModelConfig", "MoELayers", "flavour", "FLAVOURS", "GeneralistModel", "ModelOutput", "chain", "Link"]
