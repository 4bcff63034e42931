"""The ``tutel`` dispatch backend: moe_gen's routing decisions, tutel's dispatch kernels.

Shape legend: T tokens, K assignment slots per token, D model width, D' expert output width,
E experts, C slots per expert.

tutel (https://github.com/microsoft/tutel) moves tokens with its "fast dispatcher"
(``tutel.moe.fast_dispatcher``): given, for each of the K choices, every token's expert
(``indices``), slot within that expert (``locations``) and gate (``gates``), ``encode`` writes each
token's row into slot ``expert · C + location`` of a zero-initialised ``[E·C, D]`` buffer, and
``decode`` returns ``y[t] = Σ_k gate_k[t] · out[expert_k[t] · C + location_k[t]]``. A choice is
skipped when its expert index is negative or its location is ``≥ C``. Both run as CUDA kernels on
GPU tensors (C++ loops on CPU tensors, fp32/fp64 only) and carry their own backward (data and gates).

moe_gen keeps every routing decision: the router (any strategy, tag routing included) picks the
experts and weights, and its capacity step decides which assignments are kept and in which slot
(``RouterOutput.slot_positions()``; in dropless mode C is the largest expert load). This backend
only translates: expert index -1 for assignments moe_gen did not keep, moe_gen's slots as tutel's
locations, ``C = routing.capacity``. The experts then run on the padded ``[E, C, D]`` batch
(``forward_padded``: one batched matmul, as in tutel's own layers); empty slots hold zeros and are
never read back. In dropless mode the padding costs E·C - N rows of compute (the ``torch`` and
``triton`` backends have none).

Installing tutel: from its source, after PyTorch, without build isolation (its setup compiles a
C++/CUDA extension, ``tutel_custom_kernel``, against the installed PyTorch)::

    python -m pip install setuptools wheel
    python -m pip install -v --no-build-isolation git+https://github.com/microsoft/tutel@main

or from a checkout::

    git clone https://github.com/microsoft/tutel && cd tutel
    python -m pip install -v --no-build-isolation .          # NO_CUDA=1 in front: CPU-only build

The CUDA build needs the CUDA toolkit (nvcc, ``CUDA_HOME``) matching PyTorch's CUDA; without it
tutel's setup falls back to a CPU-only extension, which ``backend="auto"`` will not pick for GPU
tensors (``backend="tutel"`` still runs it on CPU tensors). Check with
``python -c "import torch, tutel.moe"`` (import torch first: the extension links against it).
Written against tutel 0.3 (``main`` of January 2025), whose ``fast_dispatcher`` API is above.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from moe_gen.experts.dispatch import DispatchBackend, Dispatched
from moe_gen.registry import BACKENDS

__all__ = ["TutelDispatch", "tutel_unavailable_reason", "TUTEL_INSTALL"]

TUTEL_INSTALL = ("install tutel from source after PyTorch with `pip install -v --no-build-isolation "
                 "git+https://github.com/microsoft/tutel@main` (see moe_gen.experts.tutel_dispatch)")


def _tutel_moe():
    """``tutel.moe`` (where ``fast_dispatcher`` lives), or the ImportError."""
    return importlib.import_module("tutel.moe")


def tutel_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the ``tutel`` backend cannot run on ``device`` (None: on this machine at all), or None.

    On a CUDA device tutel must have been built with its CUDA extension; on CPU its C++ loops
    handle fp32 and fp64."""
    try:
        _tutel_moe()
    except Exception as exc:  # ImportError, or tutel's extension failing to load
        return (f"backend='tutel' needs tutel, which cannot be imported ({type(exc).__name__}: {exc}); "
                f"{TUTEL_INSTALL}; or use backend='triton' (CUDA) or backend='torch'")
    if device is not None and torch.device(device).type == "cuda":
        import tutel_custom_kernel

        if not hasattr(tutel_custom_kernel, "inject_source"):
            return ("backend='tutel' got CUDA tensors, but tutel was built without its CUDA extension; "
                    f"{TUTEL_INSTALL} where the CUDA toolkit (nvcc) is present; or use backend='triton'")
    return None


@dataclasses.dataclass
class _TutelPlan:
    indices: list[torch.Tensor]  # K × int32 [T], expert of each choice (-1: not computed)
    locations: list[torch.Tensor]  # K × int32 [T], slot of each choice within its expert
    gates: list[torch.Tensor]  # K × fp32 [T], gate weights (in the autograd graph)
    num_experts: int
    capacity: int


@BACKENDS.register("tutel")
class TutelDispatch(DispatchBackend):
    """tutel's fast dispatcher encodes tokens into ``[E, C, D]`` slots and decodes the expert
    outputs with the gate weights; routing, capacity and slots are moe_gen's.

    Raises:
        ValueError: tutel is not importable (with install instructions and the alternatives).
    """

    @classmethod
    def unavailable_reason(cls, device=None):
        return tutel_unavailable_reason(device)

    def __init__(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise ValueError(reason)
        self._fast_dispatcher = _tutel_moe().fast_dispatcher

    def _dispatcher(self, plan: _TutelPlan, width: int, dtype: torch.dtype):
        dispatcher = self._fast_dispatcher(plan.num_experts, plan.capacity, width, dtype)
        dispatcher.update(plan.indices, plan.locations, plan.gates, capacity=plan.capacity, is_postscore=True)
        return dispatcher

    def dispatch(self, x_TD, routing):
        reason = self.unavailable_reason(x_TD.device)
        if reason is not None:
            raise ValueError(reason)
        E, D = routing.num_experts, x_TD.shape[1]
        # C ≥ 1: tutel's buffers are [E·C, D]; with nothing computed every slot stays empty.
        C = max(int(routing.capacity), 1)
        keep_TK = routing.mask
        ids_TK = torch.where(keep_TK, routing.topk_ids, -1).to(torch.int32)
        slots_TK = torch.where(keep_TK, routing.slot_positions(), 0).to(torch.int32)
        plan = _TutelPlan(
            indices=[ids.contiguous() for ids in ids_TK.unbind(1)],
            locations=[slots.contiguous() for slots in slots_TK.unbind(1)],
            gates=[w.contiguous() for w in routing.topk_weights.unbind(1)],  # tutel wants contiguous rows
            num_experts=E,
            capacity=C,
        )
        if x_TD.shape[0] == 0:
            return Dispatched(x_TD.new_zeros(E, C, D), plan)
        # Padding may hold anything: tutel never reads rows whose index is -1, so NaNs stay put.
        x_ECD = self._dispatcher(plan, D, x_TD.dtype).encode(x_TD.contiguous()).view(E, C, D)
        return Dispatched(x_ECD, plan)

    def run(self, experts, dispatched):
        return experts.forward_padded(dispatched.inputs)

    def combine(self, y_ECD, dispatched, x_TD):
        plan = dispatched.plan
        E, C, width = y_ECD.shape
        if x_TD.shape[0] == 0:
            return y_ECD.new_zeros(0, width)
        # A second dispatcher sized for the output width: decode writes rows of `model_dim` values,
        # and linear experts change the width (D' = H).
        dispatcher = self._dispatcher(plan, width, y_ECD.dtype)
        return dispatcher.decode(y_ECD.reshape(E * C, width).contiguous())
