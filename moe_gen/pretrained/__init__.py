"""Pretrained dense checkpoints in moe_gen's own transformer, and sparse upcycling.

``locate`` finds the checkpoints that ship inside installed packages (``checkpoints.py``).
"""

from moe_gen.pretrained.checkpoints import CHECKPOINTS, CheckpointMissing, locate

__all__ = ["CHECKPOINTS", "CheckpointMissing", "locate"]
