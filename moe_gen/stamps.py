"""Version stamps of a module's tensors, for inference caches that must notice weight updates.

A stamp is the (storage address, version counter) of every parameter and buffer: in-place updates
(optimizer steps, ``copy_``, ``load_state_dict``) bump the version, moving the module (``.to()``)
changes the address, and replacing a parameter (``module.weight = nn.Parameter(...)``,
``load_state_dict(assign=True)``) changes the tensors listed in the submodules' parameter dicts,
which are read on every call. Writes through ``tensor.data`` bypass the version counter: caches
keyed by a stamp must be cleared by hand after them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["weights_stamp"]


def weights_stamp(module: nn.Module) -> tuple:
    """The stamp of ``module``'s parameters and buffers (cheap: the submodule list is kept on the
    module after the first call, so no recursion per call; swapping a whole submodule afterwards
    is not noticed)."""
    tables = module.__dict__.get("_stamp_tables")
    if tables is None:
        tables = [(m._parameters, m._buffers) for m in module.modules()]
        module.__dict__["_stamp_tables"] = tables
    return tuple((t.data_ptr(), t._version) for params, buffers in tables
                 for table in (params, buffers) for t in table.values() if t is not None)
