"""What building a ``Trainer`` changes on the model, put back when the build is refused.

``Trainer`` adds the run's new tasks to the model (adapters, heads, image tokenizers, the task
vocabulary), moves it to the run's device, turns activation checkpointing on and freezes what
``trainable`` leaves out, and only then meets some refusals (a misspelt ``lr_scales`` prefix, a task
its objective cannot train, a checkpoint that cannot be resumed). Without the undo, a corrected
second ``Trainer`` on the same model (a notebook's retry) found the tasks already added:
``trainable="new_adapters"`` then had nothing to train.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["model_undo"]

_ADDED_MODULES = ("adapters", "frame_heads", "stop_heads", "image_tokenizers")


def model_undo(model) -> Callable[[], None]:
    """Records the model's tasks, added modules, device, trainable flags and activation
    checkpointing; the function returned restores them. Models whose parameters a multi-process
    build sharded (expert parallelism, FSDP) are left as they are: their shards cannot be put back."""
    config = model.config
    keys = {name: set(getattr(model, name).keys()) for name in _ADDED_MODULES}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    device = model.token_embedding.weight.device
    checkpointing = {stack: getattr(model, stack).checkpoint_blocks for stack in ("encoder", "decoder")}

    def restore() -> None:
        from moe_gen.fsdp import is_sharded
        from moe_gen.moe import MoE
        from moe_gen.routing.inputs import InstructionInput

        if is_sharded(model) or any(isinstance(m, MoE) and m.expert_parallel is not None for m in model.modules()):
            return
        model.config = config
        for name, known in keys.items():
            modules = getattr(model, name)
            for key in [k for k in modules.keys() if k not in known]:
                del modules[key]
        for module in model.modules():
            if isinstance(module, InstructionInput):
                module.set_task_words(config.moe.router.task_words)
        for name, p in model.named_parameters():
            if name in trainable:
                p.requires_grad_(trainable[name])
        if model.token_embedding.weight.device != device:
            model.to(device)
        for stack, enabled in checkpointing.items():
            getattr(model, stack).checkpoint_blocks = enabled

    return restore
