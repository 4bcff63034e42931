"""Grouped expert FFN over tokens sorted by expert, with a hand-written backward.

Shape legend: N assignments sorted by expert, D model width, H expert hidden width (2H for the
fused gate|up projection of gated experts), E experts.

Why a custom autograd function: with plain autograd, indexing ``w[e]`` for each expert makes the
backward pass allocate a full ``[E, D, H]`` zero gradient per expert, and every slice adds graph
nodes. Here the forward writes each expert's rows straight into one preallocated buffer
(``torch.mm(..., out=rows)``), the activation runs once over all rows, and the backward writes
each expert's weight gradient into its own slice of one ``[E, D, H]`` tensor. The result is the
same math as a loop of per-expert FFNs (the ``eager`` backend checks it) at the cost of one dense
FFN plus a few microseconds per expert.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activate", "expert_of_rows", "grouped_ffn", "grouped_ffn_scaled", "grouped_mm_fits",
           "grouped_mm_linear", "scaled_ffn"]

# name -> (forward, backward(grad_out, pre_activation) -> grad_in)
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward(g, h)),
    "gelu_tanh": (
        lambda h: F.gelu(h, approximate="tanh"),
        lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    ),
    "relu": (F.relu, lambda g, h: torch.where(h > 0, g, 0.0)),
    "silu": (F.silu, lambda g, h: torch.ops.aten.silu_backward(g, h)),
}


# name -> the activation in place (inference on buffers nothing else reads). Not GELU: PyTorch has
# no public in-place GELU, and ``torch.ops.aten.gelu_`` pays the Python operator dispatch on every
# call (11.5 against 9.4 µs for F.gelu on a [16, 128] decoding-step buffer on this project's CPU)
_INPLACE: dict[str, Callable] = {
    "relu": torch.relu_,
    "silu": lambda h: F.silu(h, inplace=True),
}


def activate(h: torch.Tensor, activation: str, gated: bool, inplace: bool = False) -> torch.Tensor:
    """act(h), or act(gate) * up for gated experts whose last dim holds ``[gate | up]``.
    ``inplace`` (no autograd, ``h`` read by nothing else): a plain activation may overwrite ``h``
    instead of allocating its result (those in ``_INPLACE``); use the returned tensor."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return ACTIVATIONS[activation][0](gate) * up
    act = _INPLACE.get(activation) if inplace else None
    return (act or ACTIVATIONS[activation][0])(h)


def _activation_backward(
    grad_a: torch.Tensor, h: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    act, act_backward = ACTIVATIONS[activation]
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([act_backward(grad_a * up, gate), grad_a * act(gate)], dim=-1)
    return act_backward(grad_a, h)


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _expert_grad_buffer(like: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An uninitialised [E, ...] gradient buffer; only experts with no rows are zeroed (the
    others are fully written by their matmul), which saves a pass over E·D·H values."""
    buffer = torch.empty_like(like)
    for e, n in enumerate(counts):
        if n == 0:
            buffer[e].zero_()
    return buffer


def _linear_rows(x, w, b, out):
    if b is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b, x, w, out=out)


def _grouped_linear(x_ND: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None, counts: list[int],
                    out_NO: torch.Tensor) -> None:
    """``out_NO``'s rows of group e = ``x_ND``'s rows of group e · ``w_EIO[e]`` (+ ``b_EO[e]``), in
    place; groups are consecutive blocks of ``counts[e]`` rows. One split or unbind per tensor
    rather than a slice per group and tensor: with many small groups (inference) the operations
    around the matmuls cost more than the matmuls."""
    if len(counts) == 1:
        _linear_rows(x_ND, w_EIO[0], None if b_EO is None else b_EO[0], out_NO)
        return
    biases = b_EO.unbind(0) if b_EO is not None else (None,) * len(counts)
    for n, x, w, b, out in zip(counts, x_ND.split(counts), w_EIO.unbind(0), biases, out_NO.split(counts)):
        if n:
            _linear_rows(x, w, b, out)


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_in, b_in, w_out, b_out, counts, activation, gated):
        N = x_ND.shape[0]
        h_NH = x_ND.new_empty(N, w_in.shape[2])
        _grouped_linear(x_ND, w_in, b_in, counts, h_NH)
        a_NH = activate(h_NH, activation, gated)
        y_ND = x_ND.new_empty(N, w_out.shape[2])
        _grouped_linear(a_NH, w_out, b_out, counts, y_ND)
        # Keep both the pre-activation (for act') and the activation (for the w_out gradient),
        # as autograd would for a dense FFN: recomputing act() costs a full elementwise pass.
        ctx.save_for_backward(x_ND, h_NH, a_NH, w_in, w_out)
        ctx.counts, ctx.activation, ctx.gated = counts, activation, gated
        ctx.has_bias = (b_in is not None, b_out is not None)
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_ND):
        x_ND, h_NH, a_NH, w_in, w_out = ctx.saved_tensors
        counts, activation, gated = ctx.counts, ctx.activation, ctx.gated
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad_y_ND = grad_y_ND.contiguous()
        N, E = x_ND.shape[0], w_in.shape[0]

        grad_a_NH = grad_y_ND.new_empty(N, w_out.shape[1])
        grad_w_out = _expert_grad_buffer(w_out, counts) if need_w_out else None
        grad_b_out = grad_y_ND.new_zeros(E, w_out.shape[2]) if need_b_out and ctx.has_bias[1] else None
        for e, s, t in _segments(counts):
            torch.mm(grad_y_ND[s:t], w_out[e].t(), out=grad_a_NH[s:t])
            if grad_w_out is not None:
                torch.mm(a_NH[s:t].t(), grad_y_ND[s:t], out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(grad_y_ND[s:t], dim=0, out=grad_b_out[e])
        del a_NH

        grad_h_NH = _activation_backward(grad_a_NH, h_NH, activation, gated)
        del grad_a_NH
        grad_x = grad_y_ND.new_empty(N, x_ND.shape[1]) if need_x else None  # every row is written
        grad_w_in = _expert_grad_buffer(w_in, counts) if need_w_in else None
        grad_b_in = grad_y_ND.new_zeros(E, w_in.shape[2]) if need_b_in and ctx.has_bias[0] else None
        for e, s, t in _segments(counts):
            if grad_x is not None:
                torch.mm(grad_h_NH[s:t], w_in[e].t(), out=grad_x[s:t])
            if grad_w_in is not None:
                torch.mm(x_ND[s:t].t(), grad_h_NH[s:t], out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(grad_h_NH[s:t], dim=0, out=grad_b_in[e])
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def grouped_ffn(
    x_ND: torch.Tensor,
    counts: list[int],
    w_in_EDH: torch.Tensor,
    b_in_EH: torch.Tensor | None,
    w_out_EHD: torch.Tensor,
    b_out_ED: torch.Tensor | None,
    activation: str,
    gated: bool,
) -> torch.Tensor:
    """Runs expert e's FFN on rows ``counts[:e].sum() : counts[:e+1].sum()`` of ``x_ND``.

    Args:
        x_ND: inputs sorted by expert (contiguous per expert).
        counts: rows per expert (Python ints, length E, summing to N).
        w_in_EDH, b_in_EH: input projection (for gated experts H is 2·hidden: ``[gate | up]``).
        w_out_EHD, b_out_ED: output projection.
        activation: a key of ``ACTIVATIONS``.
        gated: act(gate) * up instead of act(h).

    Returns:
        ``[N, D_out]`` expert outputs in the same row order.
    """
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {x_ND.shape[0]} rows")
    return _GroupedFFN.apply(
        x_ND.contiguous(), w_in_EDH, b_in_EH, w_out_EHD, b_out_ED, counts, activation, gated
    )


@torch.no_grad()
def grouped_ffn_scaled(
    x_ND: torch.Tensor,
    counts: list[int],
    w_in_RDX: torch.Tensor,
    b_in_RX: torch.Tensor | None,
    w_out_RYD: torch.Tensor,
    scale_NK: torch.Tensor,
    activation: str,
    gated: bool,
) -> torch.Tensor:
    """Inference only (no autograd): like ``grouped_ffn``, with each row's K blocks of hidden
    units multiplied by that row's K gate weights before the output projection.

    With ``w_in_RDX``/``w_out_RYD`` the concatenated weights of K experts (X = K·H hidden units),
    rows of group r compute Σ_k scale[n, k] · (act(x·W_in,k + b_in,k) · W_out,k + b_out,k): one
    matmul pair per *set* of experts, whatever the rows' gate weights. ``w_out_RYD`` has Y = X
    rows, or X + K when its last K rows are the experts' output biases (then each row's output
    starts as its gate weights times those rows, and the scaled hidden units are added in place).
    """
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {x_ND.shape[0]} rows")
    if len(counts) == 1:  # one group (decoding steps, small batches): no per-group splitting
        return scaled_ffn(x_ND, w_in_RDX[0], None if b_in_RX is None else b_in_RX[0], w_out_RYD[0], scale_NK,
                          activation, gated)
    x_ND = x_ND.contiguous()
    N, K = scale_NK.shape
    h_NX = x_ND.new_empty(N, w_in_RDX.shape[2])
    _grouped_linear(x_ND, w_in_RDX, b_in_RX, counts, h_NX)
    a_NX = activate(h_NX, activation, gated, inplace=True)  # h is ours, and nothing needs it after
    X = a_NX.shape[1]
    scale_NK = scale_NK.to(a_NX.dtype)
    a_NX.view(N, K, X // K).mul_(scale_NK.unsqueeze(-1))  # (X // K: N may be 0)
    y_ND = x_ND.new_empty(N, w_out_RYD.shape[2])
    if w_out_RYD.shape[1] == X:
        _grouped_linear(a_NX, w_out_RYD, None, counts, y_ND)
        return y_ND
    # the biases: the scaled gate weights times the bias rows, then the hidden units added in place
    # (no copy of the hidden units with the gate weights appended)
    _grouped_linear(scale_NK, w_out_RYD[:, X:], None, counts, y_ND)
    for y, a, w in zip(y_ND.split(counts), a_NX.split(counts), w_out_RYD[:, :X].unbind(0)):
        if y.shape[0]:
            y.addmm_(a, w)
    return y_ND


def scaled_ffn(
    x_ND: torch.Tensor,
    w_in_DX: torch.Tensor,
    b_in_X: torch.Tensor | None,
    w_out_YD: torch.Tensor,
    scale_NK: torch.Tensor,
    activation: str,
    gated: bool,
) -> torch.Tensor:
    """``grouped_ffn_scaled`` for one group (call it without autograd: the activation runs in
    place): every row through the K experts side by side (X = K·H hidden units), each row's K
    blocks of hidden units, and the K output biases when ``w_out_YD`` ends with them (Y = X + K),
    multiplied by its gate weights ``scale_NK``."""
    h_NX = x_ND @ w_in_DX if b_in_X is None else torch.addmm(b_in_X, x_ND, w_in_DX)
    a_NX = activate(h_NX, activation, gated, inplace=True)  # h is ours, and nothing needs it after
    N, K = scale_NK.shape
    X = a_NX.shape[1]
    scale_NK = scale_NK.to(a_NX.dtype)
    a_NX.view(N, K, X // K).mul_(scale_NK.unsqueeze(-1))  # (X // K: N may be 0)
    if w_out_YD.shape[0] == X:
        return a_NX @ w_out_YD
    return torch.mm(scale_NK, w_out_YD[X:]).addmm_(a_NX, w_out_YD[:X])


# One grouped GEMM per projection (torch's ``grouped_mm``), the rows per expert as a device tensor:
# nothing is read back to the host, and a projection is one kernel launch on a GPU instead of one
# per expert. ``grouped_mm`` needs every row stride to be a multiple of 16 bytes and fp32, bf16 or
# fp16; callers check ``grouped_mm_fits`` and use the loop above otherwise. On CUDA, PyTorch runs it
# as one kernel only for bf16 on compute capability 9.x and 10.x (its CUTLASS kernels); elsewhere
# its fallback reads the offsets back at every call (fp32), or refuses fp16 without cuBLASLt's
# grouped GEMM, so there the loop after one read of the counts is the better path.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(dtype: torch.dtype, *widths: int, device: torch.device | str | None = None) -> bool:
    """Whether ``grouped_mm`` takes matrices of ``dtype`` whose rows are ``widths`` wide, on
    ``device`` (None: the CPU) without reading its offsets back."""
    if not hasattr(F, "grouped_mm"):  # PyTorch < 2.9
        return False
    if dtype not in _GROUPED_MM_DTYPES or any(w * dtype.itemsize % 16 for w in widths):
        return False
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return True
    return dtype == torch.bfloat16 and torch.version.hip is None and _cuda_major(device) in (9, 10)


@functools.cache
def _cuda_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: ``grouped_mm``'s backward refuses
    expanded ones (the gradient of a ``sum()`` has stride 0)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_linear(x_ND: torch.Tensor, counts_E: torch.Tensor, w_EIO: torch.Tensor,
                      b_EO: torch.Tensor | None, expert_N: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of expert e (``counts_E[e]`` consecutive rows, in expert order) times ``w_EIO[e]``
    (+ ``b_EO[e]``) as one grouped GEMM. ``counts_E`` (long ``[E]``, on the rows' device) must sum
    to the number of rows: rows past the last expert's block would be left unwritten, and checking
    it would read the counts back to the host. ``expert_N``: each row's expert, when the caller has
    it (needed for biases only; derived from the counts otherwise)."""
    if x_ND.shape[0] == 0:  # grouped_mm's backward refuses empty operands: a plain [0, I] matmul, gradient 0
        return x_ND @ w_EIO[0]
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    y_NO = _ContiguousGrad.apply(F.grouped_mm(x_ND.contiguous(), w_EIO, offs=offsets_E))
    if b_EO is None:
        return y_NO
    if expert_N is None:
        expert_N = expert_of_rows(counts_E, x_ND.shape[0])
    return y_NO + b_EO.index_select(0, expert_N)


def expert_of_rows(counts_E: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's expert for rows sorted by expert, ``counts_E[e]`` of them for expert e (``rows``
    their sum, given so that nothing is read back to the host)."""
    return torch.repeat_interleave(torch.arange(counts_E.shape[0], device=counts_E.device), counts_E,
                                   output_size=rows)
