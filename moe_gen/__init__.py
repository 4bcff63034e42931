"""moe_gen: generalist multimodal transformers with mixture-of-experts layers routed by tags.

The public API is listed in ``__all__``; subpackages: ``moe_gen.routing`` (tags, routers, gates,
capacity, losses) and ``moe_gen.experts`` (stacked experts, dispatch backends).
"""

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.experts import DenseFFN
from moe_gen.interop import moe_from_mixtral
from moe_gen.moe import MoE, MoEOutput
from moe_gen.registry import BACKENDS, EXPERTS, GATES, ROUTERS, Registry
from moe_gen.routing import MODALITIES, PASSES, ROLES, RouterOutput, TokenTags

__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEOutput", "MoEConfig", "RouterConfig", "ExpertsConfig", "RouterOutput",
    "TokenTags", "MODALITIES", "ROLES", "PASSES", "DenseFFN", "moe_from_mixtral",
    "Registry", "ROUTERS", "GATES", "EXPERTS", "BACKENDS",
]
