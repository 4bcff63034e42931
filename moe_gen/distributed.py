"""Multi-process training helpers: start-up, gradient synchronisation with expert parallelism, a
global gradient norm, and checkpoints of expert shards that load under any layout.

Launch with ``torchrun --nproc_per_node N script.py``; in the script:

    info = init_distributed()                   # nccl on GPUs, gloo on CPUs; a no-op without torchrun
    model = GeneralistModel.build(...)          # same seed on every rank
    plan = shard_experts(model, ep_size=2)      # moe_gen.experts.parallel
    optimizer = torch.optim.AdamW(model.parameters())
    ddp = replicate(model, {"generative": objective}, plan)  # PyTorch's DDP over the replicated params
    loss = ddp("generative", batch)["loss"]; loss.backward()  # their gradients averaged during backward
    sync_gradients(model, plan, dense_synced=True)           # the expert shards: see below
    clip_grad_norm_(model, 1.0, plan); optimizer.step()
    save_shards(directory, "model", model.state_dict(), plan)

The step equals one process holding every expert that minimises the mean of the ranks' losses.
Dense gradients are averaged over all ranks: by DDP in buckets while backward runs (the trainer's
way), or, without ``replicate``, by ``sync_gradients`` after backward in flat buckets. An expert's
gradient already sums the contributions of the tokens that every rank of its EP group sent it (the
all-to-all backward brings them home), so it is never all-reduced across the EP group: it is
summed over the replicas that hold the same shard (when world > ep_size) and divided by the world
size.

Checkpoint tensors are keyed by parameter name, or ``"<parameter name>::<suffix>"`` for optimizer
state (``exp_avg``); a key is expert-sharded when its parameter is an expert parameter and the
tensor's dim 0 holds the local experts. Files (safetensors only):

    {prefix}-dense.safetensors                      every other tensor; written by global rank 0; its
                                                    metadata lists the expert files of the save
    {prefix}-experts-{offset:04d}-{count:04d}.safetensors
                                                    experts [offset, offset + count) of the layers
                                                    with count·ep_size experts; written once per shard
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import tempfile
from typing import Iterable, Mapping, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from moe_gen.durable import fsync_file, shareable
from moe_gen.experts.parallel import ExpertParallelPlan, ExpertShard, destroy_mesh_groups, expert_plan
from moe_gen.routing.balance import sync_bias_updates

__all__ = [
    "WorldInfo", "init_distributed", "world_info", "local_rank", "is_main_process", "barrier", "shutdown",
    "release_groups", "LossModule",
    "replicate", "no_sync", "sync_gradients", "clip_grad_norm_", "save_shards", "load_shards",
]

FORMAT = "moe_gen.expert_shards/1"
_BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buckets of at most this size


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    """Where this process stands: global rank, world size, local rank (GPU index), backend."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> WorldInfo:
    """This process's ``WorldInfo`` (rank 0 of 1 when torch.distributed is not initialised)."""
    if not _active():
        return WorldInfo(rank=0, world_size=1, local_rank=0, backend=None)
    return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank(),
                     backend=str(dist.get_backend()))


def local_rank() -> int:
    """This process's GPU index on its machine: ``LOCAL_RANK``, or, where a launcher sets ``RANK``
    but not ``LOCAL_RANK``, the global rank (one process per GPU of one machine), else 0. The one
    rule that ``init_distributed`` (its ``cuda.set_device`` on NCCL), ``world_info`` and the
    ``Trainer``'s device follow (they disagreed: rank 1 set cuda:1 and put its model on cuda:0)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))


def is_main_process() -> bool:
    """Whether this is global rank 0 (or the only process)."""
    return world_info().rank == 0


def barrier() -> None:
    """Waits for every process (nothing to wait for in a single process)."""
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Ends a finished multi-process run: waits for every process, then destroys the process group
    (leaving it to interpreter shutdown can abort a process while gloo's threads still run). A
    no-op in a single process."""
    if _active():
        dist.barrier()
        dist.destroy_process_group()


def release_groups(model: nn.Module) -> None:
    """Destroys the process groups that ``shard_experts`` and ``moe_gen.fsdp.shard_dense`` created
    for ``model`` (not the default group, which ``shutdown()`` ends). Every process calls it, once
    it is done with the model: each sharding call creates new groups, and a process that trains
    several models in turn would otherwise keep all of them (threads and sockets with gloo,
    communicators with NCCL) until it ends. Save or gather what you need first: afterwards the
    model's forward and its sharded MoE layers raise instead of running. A model sharded by
    neither is left as it is; calling it again does nothing."""
    plan = expert_plan(model)
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    if plan.mesh is None and not meshes:
        return
    plan.release()
    for mesh in meshes.values():
        destroy_mesh_groups(mesh)
    if meshes and not getattr(model, "_groups_released", False):
        model._groups_released = True
        # first among the forward pre-hooks, so before FSDP2's, which would gather over a destroyed group
        model.register_forward_pre_hook(_refuse_released, prepend=True)


def _refuse_released(module: nn.Module, args) -> None:
    raise RuntimeError(f"{type(module).__name__}: the process groups its parameters are sharded over were destroyed "
                       "by moe_gen.distributed.release_groups(); it cannot run any more (load its checkpoint into "
                       "a new model)")


def _reduced(value: float, op) -> float:
    """``value`` all-reduced by ``op`` over the processes (every process must call it)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def merged_over_processes(means: Mapping[str, float], counts: Mapping[str, int]) -> tuple[dict, dict]:
    """Every process's ``means`` and ``counts`` (a step's loss parts, its positions per modality)
    combined: each mean averaged over the processes that reported it (keys differ where processes
    drew different tasks), each count summed. One gather; every process must call it and gets the
    same answer (itself in one process)."""
    if not _active():
        return dict(means), dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dict(means), dict(counts)))
    values: dict[str, list[float]] = {}
    summed: dict[str, int] = {}
    for part_means, part_counts in gathered:
        for key, value in part_means.items():
            values.setdefault(key, []).append(float(value))
        for key, count in part_counts.items():
            summed[key] = summed.get(key, 0) + int(count)
    return {key: sum(v) / len(v) for key, v in values.items()}, dict(sorted(summed.items()))


def summed_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (on the CPU) summed over the processes; itself in one process. Every process must
    call it with the same shape."""
    if not _active():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    summed = tensor.to(device)
    dist.all_reduce(summed)
    return summed.cpu()


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is True on any process (every process gets the same answer)."""
    if not _active():
        return bool(flag)
    return _reduced(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> WorldInfo:
    """Joins the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``local_rank()``), ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    ``RANK``/``WORLD_SIZE`` (not launched by torchrun) it does nothing and returns rank 0 of 1;
    when the group already exists it returns its info.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks nccl when CUDA is available, else gloo.
        timeout_s: how long a collective may wait for a peer. Finite, so that a crashed or stuck
            process turns into an error on the others instead of an eternal hang (with NCCL the
            watchdog then aborts the process).

    Returns:
        ``WorldInfo``.
    """
    if _active():
        return world_info()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return world_info()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun "
                         "or set the rendezvous address and port")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gpu = local_rank()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if gpu >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={gpu} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); launch at most one process per GPU")
        torch.cuda.set_device(gpu)
        # Let the NCCL watchdog abort on a timeout rather than leave the process hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return WorldInfo(rank=rank, world_size=world, local_rank=gpu, backend=backend)


# ---- gradients --------------------------------------------------------------------------------


class LossModule(nn.Module):
    """A model and its objectives as one module: ``forward(name, batch)`` is objective ``name``'s
    output (a dict with ``"loss"``) on ``batch``. ``replicate`` wraps this rather than the model, so
    that every model call an objective makes (the contrastive one makes several) runs inside the
    one forward that DistributedDataParallel watches."""

    def __init__(self, model: nn.Module, objectives: Mapping[str, object]) -> None:
        super().__init__()
        self.model = model
        self.objectives = objectives  # not modules (each holds ``model``); the mapping is shared, not copied

    def forward(self, name: str, batch, scales=None) -> dict:
        """Objective ``name`` on ``batch``; ``scales`` (``LossScales``) only when it has some (an
        objective written before them is called as it was)."""
        return self.objectives[name](batch) if scales is None else self.objectives[name](batch, scales=scales)


def replicate(model: nn.Module, objectives: Mapping[str, object], plan: ExpertParallelPlan | None = None,
              bucket_mb: float = 25.0) -> DistributedDataParallel | None:
    """Data parallelism on PyTorch's engine: the model's replicated parameters under
    ``DistributedDataParallel``, whose gradients are averaged over the world in buckets while
    backward still runs (overlapped with it); None when no replicated parameter trains (only the
    experts, sharded over an EP group): there is nothing for DDP to average.

    Experts that ``shard_experts`` spread over an EP group are left to DDP's side (each rank holds
    other experts; ``sync_gradients(model, plan, dense_synced=True)`` scales them and reduces them
    over their replicas). Parameters no rank used in a step keep ``grad=None``; one that only some
    ranks used counts as zeros on the others (``find_unused_parameters``: batches of different
    tasks use different adapters). Buffers are not broadcast (tag-balance biases are summed by
    ``sync_gradients``). Call the wrapper as ``ddp(objective_name, batch)``; wrap every backward
    but the step's last in ``no_sync(ddp)``.

    Raises:
        ValueError: without an initialised process group, or for FSDP-sharded models.
    """
    if not _active():
        raise ValueError("replicate needs torch.distributed; launch with torchrun (init_distributed())")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model's parameters are FSDP shards; FSDP2 reduces their gradients itself")
    plan = _check_plan(model, plan)
    module = LossModule(model, objectives)
    ignored = [f"model.{name}" for name in plan.expert_params] if plan.ep_size > 1 else []
    if not any(p.requires_grad for name, p in module.named_parameters() if name not in ignored):
        return None  # only the sharded experts train (trainable="experts"): sync_gradients reduces them
    if ignored:  # each rank holds other experts: DDP must neither broadcast nor average them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    device = next(model.parameters()).device
    # buffers are equal on every rank (synced at init); newer torch names the switch forward_sync_buffers
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, bucket_cap_mb=bucket_mb, **no_buffer_sync)


def no_sync(module: nn.Module):
    """``module.no_sync()`` for a DDP wrapper (gradients accumulate locally, no communication);
    a no-op context otherwise."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def _split_params(
    model: nn.Module, plan: ExpertParallelPlan
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters, (dense, expert, FSDP shards), in ``named_parameters`` order (the same
    on every rank). FSDP shards (``DTensor``, see ``moe_gen.fsdp``) have their gradients reduced by
    FSDP during backward; the other two are synchronised here."""
    dense, expert, sharded = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if isinstance(param, DTensor):
                sharded.append(param)
            else:
                (expert if name in plan.expert_params else dense).append(param)
    return dense, expert, sharded


def _check_plan(model: nn.Module, plan: ExpertParallelPlan | None) -> ExpertParallelPlan:
    """``plan``, or the one ``shard_experts`` attached to the model's MoE layers when None, after
    checking that its parameter names are the model's: given a wrapper of the sharded model (what
    ``replicate`` returns), the attached plan's names miss and the expert shards would pass for dense
    parameters (gradients of different experts averaged, half the experts saved as the whole)."""
    which = "the plan" if plan is not None else "the plan shard_experts attached to its MoE layers"
    plan = expert_plan(model) if plan is None else plan
    names = {name for name, _ in model.named_parameters()}
    unknown = sorted(set(plan.expert_params) - names)
    if unknown:
        raise ValueError(f"{which} names expert parameters the model does not have, e.g. {unknown[:3]}; pass the "
                         "model that shard_experts sharded (not a wrapper or a submodule)")
    return plan


def _all_reduce_grads(params: list[nn.Parameter], group, scale: float) -> None:
    """Sums the gradients of ``params`` over ``group`` and multiplies them by ``scale``.

    A missing gradient counts as zeros. A parameter whose gradient is missing on *every* rank of
    the group keeps ``grad=None``, so the optimizer skips it as it would in one process; the
    decision is itself all-reduced, so every rank takes part in the same collectives.
    """
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)
    synced = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    for p in synced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # Flat buckets by (device, dtype): one collective per bucket instead of one per tensor.
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for p in synced:
        key = (p.grad.device, p.grad.dtype)
        chain = buckets.setdefault(key, [[]])
        if chain[-1] and filled[key] + p.grad.nbytes > _BUCKET_BYTES:
            chain.append([])
            filled[key] = 0
        chain[-1].append(p.grad)
        filled[key] = filled.get(key, 0) + p.grad.nbytes
    for chain in buckets.values():
        for grads in chain:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.mul_(scale)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def sync_gradients(model: nn.Module, plan: ExpertParallelPlan | None = None, dense_synced: bool = False) -> None:
    """Makes every rank's gradients those of the mean of the ranks' losses.

    Call after ``backward`` and before clipping and the optimizer step, on every rank.

    - Dense (replicated) parameters: averaged over the whole world (all-reduce, ÷ world) — unless
      ``dense_synced``: DDP (``replicate``) averaged them during backward.
    - Expert parameters: each rank's expert gradient already sums the gradients of all the tokens
      its EP group routed to it, so it is not all-reduced over the EP group; it is summed over the
      replicas holding the same shard (world > ep_size) and divided by the world size. (Without
      expert parallelism they are replicated, so dense, and left alone with ``dense_synced``.)

    A missing gradient counts as zeros; a parameter without a gradient on every rank keeps
    ``grad=None`` (the optimizer skips it, as in one process). The selection biases of tag-routed
    layers (``moe_gen.routing.balance``) take their update here, from the loads of all ranks.

    Args:
        model: the model ``shard_experts`` sharded (parameter names must match the plan: not a wrapper).
        plan: its plan; ``None`` reads it from the model (an unsharded model: plain data
            parallelism).
        dense_synced: the replicated gradients were averaged already (the model trains under
            ``replicate``); only expert shards are synchronised here.
    """
    from moe_gen.fsdp import drop_unused_adapter_grads

    if _active():
        drop_unused_adapter_grads(model)  # FSDP-sharded adapters only (a no-op otherwise)
    if not _active() or dist.get_world_size() == 1:
        return
    plan = _check_plan(model, plan)
    world = dist.get_world_size()
    sync_bias_updates(model)  # same collective point on every rank: tag-balance loads summed over ranks
    dense, expert, _ = _split_params(model, plan)  # FSDP shards: reduce-scattered in backward already
    if not dense_synced:
        _all_reduce_grads(dense, None, 1.0 / world)
    elif plan.ep_size == 1:
        return  # replicated experts: DDP averaged them with the rest
    if plan.replica_group is not None:
        _all_reduce_grads(expert, plan.replica_group, 1.0 / world)
    else:  # no other rank holds these experts: only the mean-of-losses scaling
        for p in expert:
            if p.grad is not None:
                p.grad.mul_(1.0 / world)


def clip_grad_norm_(model: nn.Module, max_norm: float, plan: ExpertParallelPlan | None = None) -> torch.Tensor:
    """Clips gradients in place by the global L2 norm of the whole (unsharded) model's gradient.

    Call after ``sync_gradients`` (so dense gradients are identical on every rank). Dense
    gradients count once; expert shards are summed over the EP group. Every rank gets the same
    norm and scales by the same factor, ``min(1, max_norm / (norm + 1e-6))`` as
    ``torch.nn.utils.clip_grad_norm_``.

    Args:
        model: the model (the one ``shard_experts`` sharded, not a wrapper of it).
        max_norm: the largest allowed norm (``float("inf")`` only measures).
        plan: its plan (``None``: read from the model).

    Returns:
        The total norm before clipping, a float32 scalar tensor.
    """
    plan = _check_plan(model, plan)
    dense, expert, sharded = _split_params(model, plan)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")

    def squares(params: Iterable[nn.Parameter]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for p in params:
            if p.grad is not None:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                total = total + grad.detach().float().pow(2).sum()
        return total

    dense_sq, expert_sq, sharded_sq = squares(dense), squares(expert), squares(sharded)
    if _active() and plan.ep_size > 1:
        dist.all_reduce(expert_sq, group=plan.ep_group)
    if _active() and sharded:  # each process holds its shard group's share of every FSDP gradient
        from moe_gen.fsdp import shard_group

        dist.all_reduce(sharded_sq, group=shard_group(model))
    norm = (dense_sq + expert_sq + sharded_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in dense + expert:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    for p in sharded:
        if p.grad is not None:
            p.grad.to_local().mul_(coef.to(p.grad.dtype))
    return norm


# ---- checkpoints of expert shards -------------------------------------------------------------


def _as_plan(model_or_plan: Union[nn.Module, ExpertParallelPlan]) -> ExpertParallelPlan:
    if isinstance(model_or_plan, ExpertParallelPlan):
        return model_or_plan
    if isinstance(model_or_plan, nn.Module):
        return _check_plan(model_or_plan, None)
    raise ValueError(f"expected a model or an ExpertParallelPlan, got {type(model_or_plan).__name__}")


def _param_name(key: str) -> str:
    """``"enc.w_in::exp_avg"`` → ``"enc.w_in"``."""
    return key.split("::", 1)[0]


def _wrapped_expert_param(key: str, plan: ExpertParallelPlan) -> str | None:
    """The plan's expert parameter that ``key`` names behind a prefix, when ``key``'s own parameter
    is not one of the plan's (``"model.ffn.experts.w_in"``, a wrapper's name for ``"ffn.experts.w_in"``);
    None otherwise."""
    name = _param_name(key)
    if name in plan.expert_params:
        return None
    parts = name.split(".")
    return next((tail for tail in (".".join(parts[i:]) for i in range(1, len(parts))) if tail in plan.expert_params),
                None)


def _expert_file(prefix: str, offset: int, count: int) -> str:
    return f"{prefix}-experts-{offset:04d}-{count:04d}.safetensors"


def _dense_file(prefix: str) -> str:
    return f"{prefix}-dense.safetensors"


def _write_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes a safetensors file under a temporary name in the same directory, then renames it:
    a reader sees the old file or the complete new one, never a partial one."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        shareable(tmp)  # (mkstemp made it owner-only)
        fsync_file(tmp)  # on disk before the rename makes it the file (a crash left torn weights)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_shards(
    directory: str,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    model_or_plan: Union[nn.Module, ExpertParallelPlan],
) -> list[str]:
    """Writes name-keyed tensors (model weights or optimizer state) so that any layout can read them.

    Every rank calls it with the same keys. Dense tensors (and scalar state such as an expert's
    ``::step``) are written once, by global rank 0; each shard's expert tensors are written by the
    first replica holding it (ranks ``[0, ep_size)``), with the shard's global expert offset and
    the layer's E in the file metadata. There are no collectives here, so a failure on one rank
    cannot hang the others: synchronise (barrier) before reading the files.

    Args:
        directory: where to write (created if missing).
        prefix: file-name prefix, e.g. ``"model"`` or ``"optimizer"``.
        tensors: key → tensor; keys are parameter or buffer names (``state_dict`` names), or
            ``"<parameter name>::<suffix>"``. Tensors of expert parameters hold this rank's local
            experts on dim 0.
        model_or_plan: the model (sharded or not; not a wrapper) or its ``ExpertParallelPlan``.

    Returns:
        Paths of the files this rank wrote.

    Raises:
        ValueError: an expert tensor's dim 0 is not this rank's number of local experts, or a key is
            not one of the plan's expert parameters but ends with one (``"model.ffn.experts.w_in"``:
            a wrapper's ``state_dict``, whose expert slices would pass for the whole layers).
    """
    plan = _as_plan(model_or_plan)
    dense, by_shard = _split_by_shard(tensors, plan)
    os.makedirs(directory, exist_ok=True)
    written = []
    if plan.replica_rank == 0:
        for shard, group in by_shard.items():
            path = os.path.join(directory, _expert_file(prefix, shard.offset, shard.count))
            _write_atomic(path, group, {"format": FORMAT, "offset": str(shard.offset), "count": str(shard.count),
                                        "total": str(shard.total)})
            written.append(path)
    if plan.rank == 0:
        # The manifest: every expert file of this save (rank 0's groups stand for every rank's, as
        # all ranks hold the same keys), so that readers ignore stale files and name missing ones.
        manifest = [{"total": s.total, "count": s.count, "keys": sorted(group)}
                    for s, group in sorted(by_shard.items(), key=lambda item: (item[0].total, item[0].count))]
        path = os.path.join(directory, _dense_file(prefix))
        _write_atomic(path, dense, {"format": FORMAT, "ep_size": str(plan.ep_size), "experts": json.dumps(manifest)})
        written.append(path)
    return written


def _split_by_shard(tensors: dict[str, torch.Tensor], plan: ExpertParallelPlan
                    ) -> tuple[dict[str, torch.Tensor], dict[ExpertShard, dict[str, torch.Tensor]]]:
    """``save_shards``' tensors (on the CPU) parted into the dense ones and each expert shard's."""
    dense: dict[str, torch.Tensor] = {}
    by_shard: dict[ExpertShard, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"save_shards stores tensors only; {key!r} is a {type(tensor).__name__}")
        wrapped = _wrapped_expert_param(key, plan)
        if wrapped is not None:  # its expert slice would pass for a dense tensor: saved as the whole layer
            raise ValueError(f"save_shards got {key!r}, which is not a parameter of the sharded model but ends with "
                             f"its expert parameter {wrapped!r}: a wrapper's state_dict (what replicate or LossModule "
                             "hold)? pass the sharded model's own state_dict()")
        shard = plan.expert_params.get(_param_name(key))
        value = tensor.detach().to("cpu").contiguous()
        if shard is None or value.dim() == 0:
            dense[key] = value
        elif value.shape[0] != shard.count:
            raise ValueError(f"{key!r} belongs to an expert parameter of which this rank holds {shard.count} experts "
                             f"(of {shard.total}), but its dim 0 is {value.shape[0]} (shape {tuple(value.shape)})")
        else:
            by_shard.setdefault(shard, {})[key] = value
    return dense, by_shard


def load_shards(
    directory: str,
    prefix: str,
    model_or_plan: Union[nn.Module, ExpertParallelPlan],
) -> dict[str, torch.Tensor]:
    """Reads tensors written by ``save_shards`` for the *current* layout, whatever the layout of
    the writer: each expert tensor is assembled from the files holding this rank's experts.

    Args:
        directory: the checkpoint directory.
        prefix: the prefix given to ``save_shards``.
        model_or_plan: the model that will receive them (sharded or not; not a wrapper) or its plan. Expert
            parameters the model does not shard come back with all E experts.

    Returns:
        key → CPU tensor: dense tensors as saved, expert tensors with this rank's local experts on
        dim 0 (ready for ``model.load_state_dict`` when they are weights).

    Raises:
        FileNotFoundError: the dense file, or an expert file holding needed experts, is missing
            (the message names the expert range).
        ValueError: the files are not from ``save_shards``, a layer's E differs from the model's, or
            they hold a key that ends with one of the plan's expert parameters without being one
            (saved from a wrapper's ``state_dict``).
    """
    plan = _as_plan(model_or_plan)
    metadata, out = _read_dense(directory, prefix)
    groups = json.loads(metadata["experts"])
    for key in [*out, *(key for group in groups for key in group["keys"])]:
        wrapped = _wrapped_expert_param(key, plan)
        if wrapped is not None:  # saved from a wrapper's state_dict: some rank's experts stood for the layer
            raise ValueError(f"the {prefix!r} shards in {directory} hold {key!r}, which is not a parameter of the "
                             f"sharded model but ends with its expert parameter {wrapped!r}: they were saved from a "
                             "wrapper's state_dict; save them from the sharded model's own state_dict()")
    for group in groups:
        total, count, keys = int(group["total"]), int(group["count"]), list(group["keys"])
        for (lo, hi), span_keys in _needed_spans(keys, total, plan).items():
            out.update(_read_expert_span(directory, prefix, total, count, lo, hi, span_keys))
    return out


def _read_dense(directory: str, prefix: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata (format, manifest of expert files) and the tensors of the dense file."""
    from safetensors import safe_open

    dense_path = os.path.join(directory, _dense_file(prefix))
    if not os.path.exists(dense_path):
        raise FileNotFoundError(f"no {prefix!r} shards in {directory}: {os.path.basename(dense_path)} is missing")
    with safe_open(dense_path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{dense_path} was not written by save_shards (format {metadata.get('format')!r})")
        return metadata, {key: f.get_tensor(key) for key in f.keys()}


def _needed_spans(keys: list[str], total: int, plan: ExpertParallelPlan) -> dict[tuple[int, int], list[str]]:
    """Which experts ``[lo, hi)`` of a ``total``-expert layer this rank needs, per key: its shard of
    the layer, or all of them for a parameter the plan does not shard."""
    needed: dict[tuple[int, int], list[str]] = {}
    for key in keys:
        shard = plan.expert_params.get(_param_name(key))
        if shard is not None and shard.total != total:
            raise ValueError(f"{key!r}: the checkpoint's layer has {total} experts, this model's {shard.total}")
        span = (0, total) if shard is None else (shard.offset, shard.offset + shard.count)
        needed.setdefault(span, []).append(key)
    return needed


def _read_expert_span(directory: str, prefix: str, total: int, count: int, lo: int, hi: int,
                      keys: list[str]) -> dict[str, torch.Tensor]:
    """Experts ``[lo, hi)`` of each of ``keys``, assembled from the files of ``count`` experts each
    that overlap the span (``[hi - lo, ...]`` per key)."""
    pieces: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for offset in range(0, total, count):
        a, b = max(lo, offset), min(hi, offset + count)
        if a >= b:
            continue
        rows = slice(a - offset, b - offset)  # within the file
        for key, piece in _read_expert_file(directory, prefix, total, count, offset, rows, keys).items():
            pieces[key].append(piece)
    return {key: parts[0] if len(parts) == 1 else torch.cat(parts) for key, parts in pieces.items()}


def _read_expert_file(directory: str, prefix: str, total: int, count: int, offset: int, rows: slice,
                      keys: list[str]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of each of ``keys`` from the file holding experts ``[offset, offset + count)``
    of the ``total``-expert layers, after checking that the file is the one the manifest lists."""
    from safetensors import safe_open

    name = _expert_file(prefix, offset, count)
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{prefix!r} shards in {directory} lack {name}, which holds experts "
            f"{offset}..{offset + count - 1} of the {total}-expert layers (e.g. {keys[0]!r}); "
            "the checkpoint is incomplete"
        )
    with safe_open(path, framework="pt") as f:
        found = f.metadata() or {}
        expected = {"format": FORMAT, "offset": str(offset), "count": str(count), "total": str(total)}
        if any(found.get(k) != v for k, v in expected.items()):
            raise ValueError(f"{path} does not match the manifest of {_dense_file(prefix)} (expected "
                             f"{expected}, found {found}); it is from another save")
        present = set(f.keys())
        out = {}
        for key in keys:
            if key not in present:
                raise ValueError(f"{path} lacks {key!r}, which the manifest lists")
            out[key] = f.get_slice(key)[rows]
        return out
