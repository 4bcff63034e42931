"""Small collective helpers that also work in a single process (no process group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank", "world", "barrier", "any_true", "mean_scalar"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world() -> int:
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        dist.barrier()


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is True on any process (every process gets the same answer)."""
    if not _active():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_scalar(value: float) -> float:
    """The mean of a float over processes."""
    if not _active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()
