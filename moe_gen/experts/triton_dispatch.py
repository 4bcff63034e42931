"""The ``triton`` dispatch backend: routing metadata, gather and combine as Triton kernels.

Shape legend: T tokens, K assignment slots per token, A = T·K flat assignments (a = t·K + k),
N rows sorted by expert (the computed assignments, or every slot: N = A), D width of the rows moved
(D for inputs, D' for expert outputs), E experts, B blocks of assignments, E' = E padded to a power
of two.

Where ``grouped_mm`` runs as one kernel (``grouped_mm_fits``: bf16 on CUDA capability 9.x/10.x, or
the CPU through the interpreter) the layout is the ``grouped`` backend's: every assignment slot is a
row, sorted by expert (stable, so within an expert in flat-assignment order; slots not computed,
dropped by capacity or padding, join the last expert's rows with weight 0 and padding inputs
zeroed), the experts' ``forward_sorted`` runs on them from the rows per expert kept on the device
(one grouped GEMM per projection), and nothing is read back to the host. Elsewhere it is the
``torch`` backend's: the computed assignments only, the counts read back once for the experts'
per-expert loop. Either way a gate-weighted sum goes back into tokens, and only the data movement
differs from those backends:

    routing metadata    _histogram_kernel    block_counts[B, E'] = computed assignments per (block, expert)
                        _offsets_kernel      counts[E]; block_offsets[b, e] = first row of (b, e)
                        _permute_kernel      row_A (row of each assignment, -1 if not computed)
                                             source_N (assignment of each row): the permutation
    dispatch            _gather_rows_kernel  x_ND[n] = x_TD[source_N[n] // K]
    combine             _gather_sum_kernel   y_TD[t] = Σ_k w[t, k] · y_ND[row_A[t·K + k]]

The combine is the scatter-add ``y_TD.index_add_(0, token_N, w_N · y_ND)`` written owner-computes:
each token gathers its (at most K) rows through ``row_A`` and sums them in fp32, so no atomics are
needed and results are deterministic run to run. The permutation is computed without a sort: a
per-block histogram, a prefix sum over (expert, block), and within a block each assignment's rank
among equal experts from a cumulative sum of one-hot rows (``[BLOCK, E']``, kept ≤ 8192 values).

Autograd. Gathering and gathered sums are each other's transpose, so every backward is one of
the same kernels: ``_DispatchRows`` (forward gather) has the backward ``grad_x[t] = Σ_k
grad_x_ND[row_A[t·K + k]]`` (gather-sum, unweighted); ``_CombineRows`` (forward weighted
gather-sum) has the backward ``grad_y_ND[n] = w[source_N[n]] · grad_y[source_N[n] // K]``
(weighted gather) and ``grad_w[t, k] = <grad_y[t], y_ND[row_A[t·K + k]]>`` (``_row_dot_kernel``),
zero for assignments that were not computed. The expert weights get their gradients from
``forward_sorted``'s own backward. Double backward is not supported (as for ``grouped_ffn``).

Where it runs. On CUDA tensors the kernels are compiled by Triton. Anywhere else they need
Triton's interpreter (``TRITON_INTERPRET=1`` in the environment): slow, but the same kernels, which
is how the tests check them against the ``eager`` oracle on a CPU-only machine. Triton fixes the
mode of its own library functions when it is imported, so the variable must be set before the first
``import triton``; moe_gen imports triton only on first use of this backend (a mismatch is reported
as an error rather than a crash deep inside a kernel).

    moe = MoE(MoEConfig(d_model=512, d_hidden=1024, num_experts=8, backend="triton")).cuda()

Install: ``pip install triton`` (PyTorch's CUDA wheels on Linux already bring it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os

import torch

from moe_gen.experts.dispatch import DispatchBackend, Dispatched, _every_slot
from moe_gen.experts.experts import _autocast_dtype
from moe_gen.experts.grouped import grouped_mm_fits
from moe_gen.registry import BACKENDS

# Imported on first use (_import_triton): an optional dependency, and one whose interpreter mode is
# fixed at import. The kernels below name `tl` as a module global, which Triton resolves when it
# builds them, after the import.
triton = tl = None

__all__ = ["TritonDispatch", "TritonPlan", "triton_interpreting", "triton_unavailable_reason", "routing_plan"]

# One-hot tiles in the metadata kernels hold BLOCK × E' int32 values (BLOCK ≥ 16, about 8192 values
# in all); past this E a tile would be too large for one thread block.
MAX_EXPERTS = 1024
_ONE_HOT_VALUES = 8192


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read from the environment now)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _import_triton():
    """Imports triton into this module's globals (where the kernels find ``tl``) on first use."""
    global triton, tl
    if triton is None:
        import triton as triton_module
        import triton.language as language

        triton, tl = triton_module, language
    return triton


def _triton_imported_interpreting() -> bool | None:
    """The mode Triton's own library functions were built in at its import (None: unknown)."""
    cdiv = getattr(getattr(tl, "standard", None), "cdiv", None)
    return None if cdiv is None else type(cdiv).__name__ == "InterpretedFunction"


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the ``triton`` backend cannot run on ``device`` (None: the machine's default, CUDA if
    any), or None when it can."""
    if triton is None and importlib.util.find_spec("triton") is None:
        return ("backend='triton' needs the triton package, which is not installed; `pip install triton` "
                "(Linux, with a CUDA build of PyTorch) or use backend='torch'")
    if triton_interpreting():
        return None
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not on_cuda:
        where = "this machine has no CUDA device" if device is None else f"the input is on {torch.device(device)}"
        return (f"backend='triton' compiles its kernels for CUDA, but {where}; use backend='torch', or set "
                "TRITON_INTERPRET=1 in the environment to run the kernels in Triton's (slow) interpreter")
    return None


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, turned into Triton kernels by _kernels() on first use)
# ---------------------------------------------------------------------------------------------


def _histogram_kernel(ids_ptr, keep_ptr, block_counts_ptr, num_assignments,
                      E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """block_counts[b, e] = computed assignments of block b that go to expert e."""
    b = tl.program_id(0)
    a = b * BLOCK + tl.arange(0, BLOCK)
    inside = a < num_assignments
    ids = tl.load(ids_ptr + a, mask=inside, other=0).to(tl.int32)
    keep = tl.load(keep_ptr + a, mask=inside, other=0)
    key = tl.where(inside & (keep != 0), ids, E_PAD)  # E_PAD matches no column: not counted
    one_hot = (key[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)  # [BLOCK, E']
    tl.store(block_counts_ptr + b * E_PAD + tl.arange(0, E_PAD), tl.sum(one_hot, axis=0))


def _offsets_kernel(block_counts_ptr, block_offsets_ptr, counts_ptr, num_blocks, num_experts,
                    E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program. counts[e] = Σ_b block_counts[b, e]; block_offsets[b, e] = first row of block b's
    assignments to expert e = (rows of experts < e) + (rows of expert e in blocks < b)."""
    e = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_blocks, CHUNK):
        b = start + tl.arange(0, CHUNK)
        c = tl.load(block_counts_ptr + b[:, None] * E_PAD + e[None, :], mask=b[:, None] < num_blocks, other=0)
        total += tl.sum(c, axis=0)
    tl.store(counts_ptr + e, total.to(tl.int64), mask=e < num_experts)
    running = tl.cumsum(total, axis=0) - total  # exclusive prefix: first row of each expert
    for start in range(0, num_blocks, CHUNK):
        b = start + tl.arange(0, CHUNK)
        inside = b[:, None] < num_blocks
        c = tl.load(block_counts_ptr + b[:, None] * E_PAD + e[None, :], mask=inside, other=0)
        first = tl.cumsum(c, axis=0) - c + running[None, :]
        tl.store(block_offsets_ptr + b[:, None] * E_PAD + e[None, :], first, mask=inside)
        running += tl.sum(c, axis=0)


def _permute_kernel(ids_ptr, keep_ptr, block_offsets_ptr, row_ptr, source_ptr, num_assignments,
                    E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """row[a] = row of assignment a in expert order (-1 if not computed); source[row[a]] = a.

    Within a block, an assignment's rank among those of the same expert is the inclusive
    cumulative sum of the one-hot rows at its own column, minus one: a stable order."""
    b = tl.program_id(0)
    a = b * BLOCK + tl.arange(0, BLOCK)
    inside = a < num_assignments
    ids = tl.load(ids_ptr + a, mask=inside, other=0).to(tl.int32)
    keep = tl.load(keep_ptr + a, mask=inside, other=0)
    computed = inside & (keep != 0)
    key = tl.where(computed, ids, E_PAD)
    one_hot = (key[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    first = tl.load(block_offsets_ptr + b * E_PAD + key, mask=computed, other=0)
    row = first + rank
    tl.store(row_ptr + a, tl.where(computed, row, -1), mask=inside)
    tl.store(source_ptr + row, a, mask=computed)


def _gather_rows_kernel(src_ptr, source_ptr, scale_ptr, out_ptr, num_rows, width, K,
                        HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[n] = src[source[n] // K] (· scale[source[n]] if HAS_SCALE, computed in fp32)."""
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = n < num_rows
    inside = row_ok[:, None] & (w[None, :] < width)
    a = tl.load(source_ptr + n, mask=row_ok, other=0).to(tl.int64)
    t = a // K
    values = tl.load(src_ptr + t[:, None] * width + w[None, :], mask=inside, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + a, mask=row_ok, other=0.0).to(tl.float32)
        values = values * scale[:, None]
    tl.store(out_ptr + n.to(tl.int64)[:, None] * width + w[None, :], values.to(out_ptr.dtype.element_ty),
             mask=inside)


def _gather_sum_kernel(src_ptr, row_ptr, scale_ptr, out_ptr, num_tokens, width, K,
                       HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[t] = Σ_k src[row[t·K + k]] (· scale[t·K + k] if HAS_SCALE) over computed assignments
    (row ≥ 0), accumulated in ACC (fp32, or fp64 for fp64 data)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    token_ok = t < num_tokens
    width_ok = w[None, :] < width
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=ACC)
    for k in range(K):
        a = t.to(tl.int64) * K + k
        row = tl.load(row_ptr + a, mask=token_ok, other=-1).to(tl.int64)
        hit = row >= 0
        values = tl.load(src_ptr + row[:, None] * width + w[None, :], mask=hit[:, None] & width_ok, other=0.0)
        if HAS_SCALE:
            # Masked like the values: a dropped assignment adds nothing, whatever its weight.
            scale = tl.load(scale_ptr + a, mask=hit, other=0.0).to(ACC)
            acc += values.to(ACC) * scale[:, None]
        else:
            acc += values.to(ACC)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * width + w[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & width_ok)


def _row_dot_kernel(a_ptr, b_ptr, row_ptr, out_ptr, num_tokens, width, K,
                    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[t·K + k] = <a[t], b[row[t·K + k]]> for computed assignments, 0 for the others."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = t < num_tokens
    for k in range(K):
        a = t.to(tl.int64) * K + k
        row = tl.load(row_ptr + a, mask=token_ok, other=-1).to(tl.int64)
        hit = row >= 0
        acc = tl.zeros([BLOCK_T], dtype=ACC)
        for start in range(0, width, BLOCK_W):
            w = start + tl.arange(0, BLOCK_W)
            width_ok = w[None, :] < width
            left = tl.load(a_ptr + t.to(tl.int64)[:, None] * width + w[None, :], mask=hit[:, None] & width_ok,
                           other=0.0)
            right = tl.load(b_ptr + row[:, None] * width + w[None, :], mask=hit[:, None] & width_ok, other=0.0)
            acc += tl.sum(left.to(ACC) * right.to(ACC), axis=1)
        tl.store(out_ptr + a, acc.to(out_ptr.dtype.element_ty), mask=token_ok)


_KERNEL_SOURCES = (_histogram_kernel, _offsets_kernel, _permute_kernel, _gather_rows_kernel,
                   _gather_sum_kernel, _row_dot_kernel)

def _kernels() -> dict:
    """The kernels as Triton functions, built on first use for the current interpreter setting
    (``triton.jit`` decides between compiling and interpreting when it wraps a function)."""
    _import_triton()
    interpret = triton_interpreting()
    imported = _triton_imported_interpreting()
    if imported is not None and imported != interpret:
        raise ValueError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} now, but triton was imported "
            f"{'with' if imported else 'without'} its interpreter; set TRITON_INTERPRET before anything "
            "imports triton (in the shell, or at the top of conftest.py), or use backend='torch'")
    return _jit_kernels(interpret)


@functools.cache
def _jit_kernels(interpret: bool) -> dict:
    """The kernels wrapped by ``triton.jit`` once per interpreter setting (Triton compiles them per
    shape and device itself)."""
    return {fn.__name__.strip("_"): triton.jit(fn) for fn in _KERNEL_SOURCES}


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _on_device(t: torch.Tensor):
    """Compiled kernels launch on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _width_block(width: int) -> int:
    return min(_pow2(width), 128)


# ---------------------------------------------------------------------------------------------
# Routing metadata
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TritonPlan:
    """Where each computed assignment goes, as the metadata kernels computed it.

    Attributes:
        row_A: int32 ``[T·K]`` row of each assignment in expert order; -1 if not computed.
        source_N: int32 ``[N]`` flat assignment (t·K + k) of each row; its token is ``// K``.
        counts_E: int64 ``[E]`` rows per expert (on the device).
        counts: the same as Python ints (one device sync), or None for a plan of every slot
            (``mask_TK=None``), which reads nothing back.
        num_tokens: T.
        top_k: K.
    """

    row_A: torch.Tensor
    source_N: torch.Tensor
    counts_E: torch.Tensor
    counts: list[int] | None
    num_tokens: int
    top_k: int


def routing_plan(ids_TK: torch.Tensor, mask_TK: torch.Tensor | None, num_experts: int) -> TritonPlan:
    """The expert-order permutation of the computed assignments (a stable sort by expert, as
    ``torch.sort(..., stable=True)`` gives it), from three kernels and one host sync for the counts
    (none when every assignment is computed: then there are T·K rows whatever the experts).

    Args:
        ids_TK: long expert of each assignment.
        mask_TK: bool, which assignments are computed (the router's capacity decisions included);
            None: all of them.
        num_experts: E (at most ``MAX_EXPERTS``).

    Returns:
        ``TritonPlan``.
    """
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"backend='triton' supports at most {MAX_EXPERTS} experts per layer, got E={num_experts}; "
                         "use backend='torch'")
    reason = triton_unavailable_reason(ids_TK.device)  # compiled kernels given host tensors: Triton's own error
    if reason is not None:                             # ("cannot be accessed from Triton (cpu tensor?)") named no fix
        raise ValueError(reason)
    T, K = ids_TK.shape
    A, device = T * K, ids_TK.device
    row_A = torch.full((A,), -1, dtype=torch.int32, device=device)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
    every_slot = mask_TK is None
    if A == 0:
        return TritonPlan(row_A, row_A[:0], counts_E, None if every_slot else [0] * num_experts, T, K)
    kernels = _kernels()
    ids_A = ids_TK.reshape(-1).contiguous()
    if every_slot:
        keep_A = torch.ones(A, dtype=torch.uint8, device=device)
    else:
        keep_A = mask_TK.reshape(-1).contiguous().view(torch.uint8)
    e_pad = _pow2(num_experts)
    block = max(16, min(_pow2(A), _ONE_HOT_VALUES // e_pad))
    num_blocks = _cdiv(A, block)
    chunk = min(_pow2(num_blocks), max(16, _ONE_HOT_VALUES // e_pad))
    block_counts = torch.empty(num_blocks, e_pad, dtype=torch.int32, device=device)
    block_offsets = torch.empty_like(block_counts)
    with _on_device(ids_A):
        kernels["histogram_kernel"][(num_blocks,)](ids_A, keep_A, block_counts, A, E_PAD=e_pad, BLOCK=block)
        kernels["offsets_kernel"][(1,)](block_counts, block_offsets, counts_E, num_blocks, num_experts,
                                        E_PAD=e_pad, CHUNK=chunk)
        # the rows: every slot, or as many as were computed (read back: the host sizes source_N)
        counts = None if every_slot else counts_E.tolist()
        source_N = torch.empty(A if every_slot else sum(counts), dtype=torch.int32, device=device)
        kernels["permute_kernel"][(num_blocks,)](ids_A, keep_A, block_offsets, row_A, source_N, A,
                                                 E_PAD=e_pad, BLOCK=block)
    return TritonPlan(row_A, source_N, counts_E, counts, T, K)


# ---------------------------------------------------------------------------------------------
# Gather and combine with autograd
# ---------------------------------------------------------------------------------------------


def _gather_rows(src_TD: torch.Tensor, plan: TritonPlan, scale_A: torch.Tensor | None) -> torch.Tensor:
    """``out[n] = src[source_N[n] // K] (· scale_A[source_N[n]])`` → ``[N, D]``."""
    N, D = plan.source_N.shape[0], src_TD.shape[1]
    out_ND = src_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return out_ND
    block_w = _width_block(D)
    grid = (_cdiv(N, 32), _cdiv(D, block_w))
    with _on_device(src_TD):
        _kernels()["gather_rows_kernel"][grid](
            src_TD, plan.source_N, src_TD if scale_A is None else scale_A, out_ND, N, D, plan.top_k,
            HAS_SCALE=scale_A is not None, BLOCK_R=32, BLOCK_W=block_w)
    return out_ND


def _gather_sum(src_ND: torch.Tensor, plan: TritonPlan, scale_A: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = Σ_k src[row_A[t·K + k]] (· scale_A[t·K + k])`` over computed assignments → ``[T, D]``."""
    T, D = plan.num_tokens, src_ND.shape[1]
    if src_ND.shape[0] == 0:  # nothing computed: every token sums nothing
        return src_ND.new_zeros(T, D)
    out_TD = src_ND.new_empty(T, D)
    if T == 0 or D == 0:
        return out_TD
    block_w = _width_block(D)
    grid = (_cdiv(T, 32), _cdiv(D, block_w))
    with _on_device(src_ND):
        _kernels()["gather_sum_kernel"][grid](
            src_ND, plan.row_A, src_ND if scale_A is None else scale_A, out_TD, T, D, plan.top_k,
            HAS_SCALE=scale_A is not None, ACC=_acc_dtype(src_ND), BLOCK_T=32, BLOCK_W=block_w)
    return out_TD


def _row_dot(grad_TD: torch.Tensor, y_ND: torch.Tensor, plan: TritonPlan, dtype: torch.dtype) -> torch.Tensor:
    """``out[t·K + k] = <grad[t], y[row_A[t·K + k]]>`` (0 where not computed) → ``[T·K]``."""
    T, K, D = plan.num_tokens, plan.top_k, grad_TD.shape[1]
    if y_ND.shape[0] == 0 or T == 0 or D == 0:
        return torch.zeros(T * K, dtype=dtype, device=grad_TD.device)
    out_A = torch.empty(T * K, dtype=dtype, device=grad_TD.device)
    with _on_device(grad_TD):
        _kernels()["row_dot_kernel"][(_cdiv(T, 32),)](
            grad_TD, y_ND, plan.row_A, out_A, T, D, K,
            ACC=_acc_dtype(y_ND), BLOCK_T=32, BLOCK_W=_width_block(D))
    return out_A


class _DispatchRows(torch.autograd.Function):
    """x_TD → x_ND in expert order; backward: each token sums the gradients of its rows."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: TritonPlan) -> torch.Tensor:
        ctx.plan = plan
        return _gather_rows(x_TD.contiguous(), plan, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_ND):
        return _gather_sum(grad_x_ND.contiguous(), ctx.plan, None), None


class _CombineRows(torch.autograd.Function):
    """(y_ND, w_A) → y_TD[t] = Σ_k w[t, k] · y_ND[row of (t, k)]; backward: a weighted gather for
    y_ND and a row dot product for the gate weights."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weights_A: torch.Tensor, plan: TritonPlan) -> torch.Tensor:
        y_ND, weights_A = y_ND.contiguous(), weights_A.contiguous()
        ctx.plan = plan
        ctx.save_for_backward(y_ND, weights_A)
        return _gather_sum(y_ND, plan, weights_A)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        y_ND, weights_A = ctx.saved_tensors
        grad_y_TD = grad_y_TD.contiguous()
        grad_y_ND = _gather_rows(grad_y_TD, ctx.plan, weights_A) if ctx.needs_input_grad[0] else None
        grad_w_A = _row_dot(grad_y_TD, y_ND, ctx.plan, weights_A.dtype) if ctx.needs_input_grad[1] else None
        return grad_y_ND, grad_w_A, None


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _TritonDispatchPlan:
    plan: TritonPlan
    weights_A: torch.Tensor  # the router's gate weights, flat; in the autograd graph


@BACKENDS.register("triton")
class TritonDispatch(DispatchBackend):
    """Assignments sorted by expert with Triton kernels (every slot, for one grouped GEMM per projection
    and no host reads, where ``grouped_mm`` is one kernel; the computed ones, for the per-expert loop,
    elsewhere); Triton weighted combine.

    Same function and row layout as ``grouped`` or ``torch``; see the module docstring for the kernels.

    Raises:
        ValueError: when built on a machine where it cannot run (no triton, or no CUDA device and
            no ``TRITON_INTERPRET=1``), or when called on tensors it cannot run on.
    """

    @classmethod
    def unavailable_reason(cls, device=None):
        return triton_unavailable_reason(device)

    def __init__(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise ValueError(reason)

    def dispatch(self, x_TD, routing):
        ids_TK, weights_TK, computed_TK = _every_slot(routing)
        if not grouped_mm_fits(_autocast_dtype(x_TD), device=x_TD.device):
            # no one-kernel grouped GEMM here (fp32 on CUDA, ...): the experts loop after one read
            # of the counts, so plan only the computed assignments (padding and drops cost nothing)
            plan = routing_plan(ids_TK, computed_TK, routing.num_experts)
            return Dispatched(_DispatchRows.apply(x_TD, plan), _TritonDispatchPlan(plan, weights_TK.reshape(-1)))
        # slots not computed go to the last expert (its rows, in flat order), with gate weight 0
        last = routing.num_experts - 1
        plan = routing_plan(torch.where(computed_TK, ids_TK, last), None, routing.num_experts)
        # padding may hold anything, and 0 · NaN = NaN: its rows go through the last expert as zeros
        x_TD = torch.where(routing.valid.unsqueeze(1), x_TD, 0.0)
        weights_A = torch.where(computed_TK, weights_TK, 0.0).reshape(-1)
        return Dispatched(_DispatchRows.apply(x_TD, plan), _TritonDispatchPlan(plan, weights_A))

    def run(self, experts, dispatched):
        plan = dispatched.plan.plan  # counts as ints (computed assignments) or on the device (every slot)
        return experts.forward_sorted(dispatched.inputs, plan.counts_E if plan.counts is None else plan.counts)

    def combine(self, y_ND, dispatched, x_TD):
        return _CombineRows.apply(y_ND, dispatched.plan.weights_A, dispatched.plan.plan)

    def sort_assignments(self, routing):
        """The permutation kernels' order (equal to the stable sort of the base class)."""
        plan = routing_plan(routing.topk_ids, routing.mask, routing.num_experts)
        return plan.source_N.long(), plan.counts_E
