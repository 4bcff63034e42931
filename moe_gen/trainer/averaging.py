"""A running average of the weights (``TrainConfig.ema_decay``), on PyTorch's ``AveragedModel``.

The average is an exponential moving average of the parameters after every optimizer step;
buffers (routing selection biases, running loads) are copied from the model rather than averaged,
so the averaged model routes as the model does at the same step. ``Trainer.evaluate`` and
``Trainer.save_model`` use it; checkpoints keep it (``average-*.safetensors`` and its step count),
so a resumed run continues the same average.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from moe_gen.model.model import GeneralistModel
from moe_gen.trainer.config import TrainConfig

__all__ = ["weight_average", "update_average"]

logger = logging.getLogger("moe_gen")


def weight_average(model: GeneralistModel, config: TrainConfig, *, sharded: bool) -> Optional[AveragedModel]:
    """An average of ``model``'s weights when ``config.ema_decay`` > 0 (else None), starting from
    the model's weights at its first update.

    Raises:
        ValueError: with expert parallelism or FSDP (``sharded``): the copy would need the same
            sharding, which is not built.
    """
    if config.ema_decay == 0:
        return None
    if sharded:
        raise ValueError(f"ema_decay={config.ema_decay} needs the whole model on every process: it works on one "
                         "process or with sharding='replicate', not with FSDP or expert_parallel > 1")
    horizon = 1.0 / (1.0 - config.ema_decay)
    if horizon > config.steps / 2:
        logger.warning("ema_decay %g averages over about %d steps, more than half of this run's %d: the average "
                       "will lean on the first steps' weights (choose 1 / (1 - ema_decay) well below the steps)",
                       config.ema_decay, round(horizon), config.steps)
    average = AveragedModel(model, multi_avg_fn=_ema_in_average_dtype(config.ema_decay), use_buffers=False)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in average.module.parameters()):
        average.module.float()  # bf16 would round each step's (1 - decay)·change away: the average kept in fp32
    average.module.eval()  # its parameters keep requires_grad, so analysis can take gradients of it
    return average


def _ema_in_average_dtype(decay: float):
    """PyTorch's EMA update, given the model's parameters in the average's dtype (fp32 for a bf16 model)."""
    ema = get_ema_multi_avg_fn(decay)

    def update(averaged, current, num_averaged):
        ema(averaged, [c.to(a.dtype) for a, c in zip(averaged, current)], num_averaged)

    return update


@torch.no_grad()
def update_average(average: AveragedModel, model: GeneralistModel) -> None:
    """Moves the average one step towards ``model``'s parameters and copies its buffers."""
    average.update_parameters(model)
    for mine, theirs in zip(average.module.buffers(), model.buffers()):
        mine.copy_(theirs)
