"""The multi-task trainer: task mixing, modality budgets, checkpoints with exact resume, logs,
fine-tuning, data and expert parallelism (``moe_gen.trainer.Trainer``)."""

from moe_gen.trainer.config import RunConfig, TrainConfig
from moe_gen.trainer.evaluation import evaluate, evaluate_task
from moe_gen.trainer.optim import WarmupCosine, select_trainable
from moe_gen.trainer.sampling import TaskSampler, mixing_weights
from moe_gen.trainer.trainer import Trainer

__all__ = ["TrainConfig", "RunConfig", "Trainer", "TaskSampler", "mixing_weights", "evaluate", "evaluate_task",
           "select_trainable", "WarmupCosine"]
