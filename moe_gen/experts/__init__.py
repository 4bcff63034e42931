"""Experts with stacked weights and the dispatch backends that feed them."""

from moe_gen.experts.dispatch import (
    DispatchBackend,
    EagerDispatch,
    EinsumDispatch,
    MergedDispatch,
    TorchDispatch,
)
from moe_gen.experts.experts import DenseFFN, GLUExperts, LinearExperts, MLPExperts, StackedExperts
from moe_gen.experts.grouped import grouped_ffn

# GPU backends: they register by name whatever is installed, and explain what is missing when asked for.
from moe_gen.experts.triton_dispatch import TritonDispatch  # noqa: E402  isort: skip
from moe_gen.experts.tutel_dispatch import TutelDispatch  # noqa: E402  isort: skip

__all__ = [
    "StackedExperts", "MLPExperts", "GLUExperts", "LinearExperts", "DenseFFN", "grouped_ffn",
    "DispatchBackend", "EagerDispatch", "TorchDispatch", "EinsumDispatch", "MergedDispatch",
    "TritonDispatch", "TutelDispatch",
]
