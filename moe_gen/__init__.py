"""moe_gen: generalist multimodal transformers with mixture-of-experts layers routed by tags.

The public API is listed in ``__all__``; subpackages: ``moe_gen.routing`` (tags, routers, gates,
capacity, losses) and ``moe_gen.experts`` (stacked experts, dispatch backends).
"""

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.experts import DenseFFN
from moe_gen.interop import from_hf_moe, moe_from_mixtral
from moe_gen.moe import MoE, MoEOutput, merge_for_inference
from moe_gen.registry import (
    ADAPTERS,
    BACKENDS,
    EXPERTS,
    GATES,
    METRICS,
    MODALITIES,
    PREPROCESSORS,
    ROUTERS,
    TASKS,
    Registry,
)
from moe_gen.routing import RouterOutput, TagBatch, TokenTags

__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEOutput", "merge_for_inference", "MoEConfig", "RouterConfig", "ExpertsConfig", "RouterOutput",
    "TagBatch", "TokenTags", "DenseFFN", "from_hf_moe", "moe_from_mixtral",
    "Registry", "ROUTERS", "GATES", "EXPERTS", "BACKENDS", "MODALITIES", "PREPROCESSORS", "ADAPTERS",
    "TASKS", "METRICS", "Instruction", "InstructionError", "Task", "GeneralistModel", "ModelConfig",
    "MoELayers", "Trainer", "TrainConfig",
]


def __getattr__(name):
    # The task layer (sentencepiece, PIL, ...) loads on first use, so `import moe_gen` stays light.
    if name in ("Instruction", "InstructionError", "Task"):
        from moe_gen import tasks

        return getattr(tasks, name)
    if name in ("GeneralistModel", "ModelConfig", "MoELayers"):
        from moe_gen import model

        return getattr(model, name)
    if name in ("Trainer", "TrainConfig"):
        from moe_gen import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'moe_gen' has no attribute {name!r}")
