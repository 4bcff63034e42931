"""Dense parameters sharded with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

With ``TrainConfig(sharding="fsdp")`` under torchrun, every process holds 1/W of each dense
parameter, of its gradient and of its AdamW moments instead of a full replica (ZeRO-3-like).
FSDP2 all-gathers a block's parameters before its forward (and again before its backward) and
reduce-scatters its gradients during backward, averaged over the processes: the step is the
step of one process on the mean of the processes' losses, as with replicated data parallelism.

    mesh = shard_dense(model)            # after init_distributed(); before building the optimizer
    loss = objective(batch)["loss"]; loss.backward()
    moe_gen.distributed.sync_gradients(model)   # only what FSDP does not manage (scalars)
    moe_gen.distributed.clip_grad_norm_(model, 1.0); optimizer.step()

Units: every encoder and decoder block, then the root (embeddings, feature adapters, output head).
FSDP2 reduces a unit's gradients only for the parameters that have one, so every process must
have the same ones: a process whose batch has no rows for an adapter still runs it into the loss
with weight 0 (``GeneralistModel.touch_all_adapters``), and an adapter that no process's batch
used (the model records which ones were) has its gradient set back to None by
``drop_unused_adapter_grads`` (called by ``sync_gradients``), so the optimizer skips it as it
would in one process. Scalar parameters (FSDP2 shards along dim 0, which a scalar has not; the
contrastive temperature) and the small parts only some objectives use (frame and stop heads,
contrastive heads) stay replicated and are averaged by ``sync_gradients``. With expert
parallelism (``shard_experts`` first), each process's expert slices stay out of FSDP too: the
all-to-all dispatcher moves tokens to them and ``sync_gradients`` reduces their gradients over
the processes holding the same slice.
Checkpoints hold whole dense tensors (gathered on save, sharded again on load) and expert shards,
so they load with any number of processes, sharded or not.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["shard_dense", "shard_group", "is_sharded", "full_tensors", "like_model", "shard_like", "unsharded_copy",
           "drop_unused_adapter_grads"]

# Parts that a process's batch may leave unused (frame and stop heads, contrastive heads): FSDP2
# reduce-scatters only the gradients a process has, so a unit whose parameters are used on some
# processes and not others would issue different collectives. They stay replicated, and
# sync_gradients averages them (a missing gradient as zeros). (And the image tokenizers, which
# encode data outside the forward and never train.) Adapters are sharded: the model touches the
# unused ones (touch_all_adapters).
_PER_BATCH_PARTS = ("frame_heads", "stop_heads", "contrastive_image", "contrastive_text", "image_tokenizers")

# GeneralistModel methods that training calls outside ``forward`` (the contrastive pass); methods
# that ``forward`` itself calls are not registered (the root would gather and reduce once per call)
_FORWARD_METHODS = ("decode_bidirectional",)


def shard_dense(model: nn.Module, shard_size: int | None = None, unit: str = "block",
                param_dtype: torch.dtype | None = None):
    """Shards the model's dense parameters with FSDP2; returns the device mesh.

    Every process must call it with the same model, after ``init_distributed()`` and before the
    optimizer is built (the parameters become ``DTensor`` shards).

    Args:
        model: the model (with expert parallelism, call ``shard_experts`` first: the experts'
            slices stay out of FSDP).
        shard_size: processes a parameter is sharded over. None (or the world size): all of them
            (FSDP). Smaller: hybrid sharding (HSDP) on a ``(replicate, shard)`` mesh, gradients
            reduce-scattered within a shard group and all-reduced across groups; 1 replicates every
            parameter, FSDP2 then all-reducing the gradients during backward (as DDP does).
        unit: what FSDP2 gathers and reduces at once: every ``block`` (least memory: one block's
            parameters whole at a time), or each ``stack`` (the encoder, the decoder: fewer and
            larger collectives; faster on gloo between CPU processes, see the README).
        param_dtype: gather parameters in this dtype for compute (``torch.bfloat16`` with
            ``TrainConfig(precision="bf16")``: half the all-gather traffic) while gradients are
            reduced, and parameters and AdamW state kept, in float32 (FSDP2's
            ``MixedPrecisionPolicy``). None: parameters as they are.

    Raises:
        ValueError: torch.distributed is not initialised, or ``shard_size`` does not divide the
            number of processes.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharding='fsdp' needs torch.distributed; launch with torchrun (init_distributed())")
    if unit not in ("block", "stack"):
        raise ValueError(f"unit must be 'block' or 'stack', got {unit!r}")
    mesh = _mesh(next(model.parameters()).device.type, shard_size)
    replicated = _replicated(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        blocks = list(getattr(stack, "blocks", ()))
        for part in (blocks if unit == "block" else [stack] if blocks else []):
            fully_shard(part, mesh=mesh, ignored_params=(replicated & set(part.parameters())) or None,
                        mp_policy=policy)
    # The root's inputs are batches: their feature rows stay fp32 (FSDP2 would cast them to param_dtype, merging
    # the integer ids of exact_features adapters, STRUCT text ids above 256 in bf16); embed casts the others.
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=policy.reduce_dtype,
                                       cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, ignored_params=replicated or None, mp_policy=root_policy)
    if hasattr(model, "touch_all_adapters"):
        model.touch_all_adapters = True
    for name in _FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return mesh


def _mesh(device_type: str, shard_size: int | None):
    """``("shard",)`` over the world, or ``("replicate", "shard")`` with shard groups of ``shard_size``."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    shard_size = world if shard_size is None else shard_size
    if shard_size < 1 or world % shard_size:
        raise ValueError(f"shard_size={shard_size} must be a positive divisor of the number of processes ({world})")
    if shard_size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def _replicated(model: nn.Module) -> set:
    """Parameters FSDP leaves alone: expert slices of expert parallelism (exchanged by the all-to-all
    dispatcher, reduced over their replica group by ``sync_gradients``), scalars, and the parts a
    process's batch may leave unused (``_PER_BATCH_PARTS``)."""
    from moe_gen.moe import MoE

    replicated = {p for m in model.modules() if isinstance(m, MoE) and m.expert_parallel is not None
                  for p in m.experts.parameters()}
    replicated |= {p for p in model.parameters() if p.dim() == 0}
    for name in _PER_BATCH_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            replicated |= set(part.parameters())
    return replicated


def drop_unused_adapter_grads(model: nn.Module) -> None:
    """Sets ``grad=None`` on the parameters of every adapter, and of every adapter's frame and stop
    heads, that no process's batch used since the last call (``model.adapters_in_step``, which it
    then clears; they were only touched with weight 0, ``touch_all_adapters``), so that the
    optimizer skips them as it would in one process. One small all-reduce; every process must call
    it. A no-op for a model that does not touch its adapters."""
    from moe_gen.model.model import NEW_HEADS

    adapters = getattr(model, "adapters", None)
    if adapters is None or not len(adapters) or not getattr(model, "touch_all_adapters", False):
        return
    parts = {name: [adapter] for name, adapter in adapters.items()}
    for name in getattr(model, "frame_heads", {}):
        parts[f"{name}{NEW_HEADS}"] = [model.frame_heads[name], model.stop_heads[name]]
    names = sorted(parts)
    used_here = getattr(model, "adapters_in_step", set())
    used = torch.tensor([name in used_here for name in names], dtype=torch.int32,
                        device=next(model.parameters()).device)
    # over every process: under HSDP the replicas' gradients are averaged too, so an adapter one
    # replica used has a gradient on all of them
    dist.all_reduce(used)
    for name, flag in zip(names, used.tolist()):
        if not flag:
            for p in (p for module in parts[name] for p in module.parameters()):
                p.grad = None
    used_here.clear()


def shard_group(model: nn.Module):
    """The process group over which this process's FSDP gradient shards are split (the mesh's
    ``shard`` dimension), or None when no parameter is sharded."""
    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh.get_group("shard")
    return None


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is an FSDP shard (a ``DTensor``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``DTensor`` gathered into the full tensor (a collective: every process
    must call it with the same keys, in the same order)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def like_model(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors (a checkpoint's) sharded like the model's parameters and buffers of the same
    name, so ``load_state_dict`` can copy them into the shards; other entries pass through."""
    current = model.state_dict()
    out = {}
    for key, value in tensors.items():
        mine = current.get(key)
        if isinstance(mine, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(value.to(mine.dtype), mine.device_mesh, mine.placements)
        out[key] = value
    return out


def shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor shaped like ``param``) as a shard laid out like ``param``."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of a model whose parameters FSDP shards: built again from its config
    and tokenizer and loaded with the gathered weights (experts sharded by expert parallelism keep
    their slices and exchange). Every process must call it."""
    from torch.distributed.fsdp import FSDPModule

    from moe_gen.experts.parallel import keep_local_experts
    from moe_gen.moe import MoE

    weights = full_tensors(model.state_dict())
    # fully_shard swapped the model's class for a subclass of FSDPModule and the original
    original = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing from the run's RNG
        copy = original(model.config, model.tokenizer)
    # on the sharded model's device (built on the CPU, a GPU run's copy evaluated there and sent CPU
    # tensors through NCCL's all-to-alls under expert parallelism)
    device = next((v.device for v in weights.values() if v.is_floating_point()), None)
    if device is not None:
        copy.to(device)
    mine = dict(copy.named_modules())
    for name, layer in model.named_modules():  # expert slices stay where they are, exchanged as before
        if isinstance(layer, MoE) and layer.expert_parallel is not None:
            keep_local_experts(mine[name], layer.expert_parallel.plan, layer.expert_parallel.shard)
    copy.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    copy.train(model.training)
    return copy
