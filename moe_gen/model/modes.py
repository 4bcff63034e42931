"""Eval mode for the length of a call (``eval_mode``), on a module that calls of several threads
may share, and what a mode switch asked for while such calls run does (``mode_during_calls``)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from torch import nn

__all__ = ["eval_mode", "mode_during_calls"]


@dataclasses.dataclass
class _EvalBlock:
    """The submodules an ``eval_mode`` block switched to eval mode, and how many blocks (of any
    thread) run on that module now."""

    training: list
    blocks: int = 0


# Entering and leaving eval_mode: the first block on a module switches it, the last gives the modes back.
_EVAL_LOCK = threading.Lock()


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule of ``module`` in eval mode for the duration; afterwards each is back in the
    mode it was in (a submodule kept in eval mode inside a training model stays so). A module
    already wholly in eval mode is left alone: no pass over its submodules to switch them. Blocks on
    one module may overlap (``infer`` from several threads): the modes come back when the last ends."""
    joined = None
    try:
        with _EVAL_LOCK:
            joined = module.__dict__.get("_eval_block")
            if joined is None:
                training = [m for m in module.modules() if m.training]
                if training:
                    module.eval()
                joined = module.__dict__["_eval_block"] = _EvalBlock(training)
            joined.blocks += 1
        yield module
    finally:
        if joined is not None:
            with _EVAL_LOCK:
                joined.blocks -= 1
                if joined.blocks == 0 and module.__dict__.get("_eval_block") is joined:
                    del module.__dict__["_eval_block"]
                    for m in joined.training:
                        m.training = True


def mode_during_calls(model: nn.Module, mode: bool) -> None:
    """What ``model.train(mode)`` does while ``eval_mode`` blocks (another thread's ``infer``) or
    ``merged_in_place`` blocks run on ``model``: training mode is refused, naming the running call
    (it was refused as if the model were a copy for inference); eval mode becomes what the blocks
    give back when they end (they gave back training mode, undoing ``eval()``, before the
    twenty-seventh session's audit)."""
    record = model.__dict__.get("_eval_block")
    if mode and (record is not None or any(getattr(m, "_in_place", None) is not None for m in model.modules())):
        raise ValueError("an infer or evaluation call (or a merged_in_place block) is running on this model, here "
                         "or in another thread: it cannot train until that ends")
    if not mode and record is not None:
        with _EVAL_LOCK:
            record = model.__dict__.get("_eval_block")
            if record is not None:
                record.training = []
