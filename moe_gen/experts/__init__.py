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

__all__ = [
    "StackedExperts", "MLPExperts", "GLUExperts", "LinearExperts", "DenseFFN", "grouped_ffn",
    "DispatchBackend", "EagerDispatch", "TorchDispatch", "EinsumDispatch", "MergedDispatch",
]
