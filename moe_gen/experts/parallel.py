"""Expert parallelism: each rank of an expert-parallel (EP) group holds a slice of every MoE layer's
experts, and tokens travel to the rank that holds their expert and back.

Shape legend: T tokens on this rank, D model width, D' expert output width, E experts of a layer,
K assignment slots per token, P ranks in the EP group, L = E/P experts held per rank,
N assignments this rank sends (sorted by expert), M rows this rank receives.

Layout. The world of W processes is ``dp_size × ep_size``: EP groups are consecutive ranks
(``[0, P)``, ``[P, 2P)``, ...), and rank ``r`` holds experts ``[(r mod P)·L, (r mod P + 1)·L)``.
Ranks with the same ``r mod P`` hold the same shard: they form a *replica group*, across which
expert gradients are averaged (``moe_gen.distributed.sync_gradients``). Both are the dimensions of
one ``DeviceMesh`` of shape ``(dp_size, ep_size)`` (``ExpertParallelPlan.mesh``). Routing is not sharded:
router weights are replicated and every rank routes its own tokens over all E experts.

The forward of one MoE layer on one rank (``ExpertParallel``, the layer's dispatch backend):

    sort computed assignments by expert       the former backend's sort_assignments (triton: kernels)
    all-to-all the counts [E]                 how many rows each rank sends me, per local expert
    all-to-all the rows  [N, D] → [M, D]      uneven splits, possibly empty
    regroup by local expert, forward_sorted   the same grouped kernel as the ``torch`` backend
    all-to-all the outputs back [M, D'] → [N, D']
    weight by the gate and index_add into [T, D']

The all-to-alls are differentiable (their backward is the reverse all-to-all), so gradients reach
the local expert weights, the inputs and the gate weights. They are collective: every rank of an
EP group must call every MoE layer the same number of times, in the same order, and run backward
through each call it made (the loss must depend on every MoE output, as it does through the
residual stream). Ranks with no tokens still take part; they send and receive empty blocks.

    plan = shard_experts(model, ep_size=2)   # after init_distributed(), before building the optimizer
    loss = objective(batch)["loss"]; loss.backward()
    moe_gen.distributed.sync_gradients(model, plan)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moe_gen.experts.dispatch import DispatchBackend, Dispatched, assignment_weights
from moe_gen.moe import MoE
from moe_gen.routing.output import RouterOutput

__all__ = ["ExpertShard", "ExpertParallelPlan", "ExpertParallel", "shard_experts", "expert_plan"]


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """The experts of one layer that this rank holds: global ids ``[offset, offset + count)`` of
    ``total``."""

    offset: int
    count: int
    total: int


@dataclasses.dataclass
class ExpertParallelPlan:
    """How the experts of a model are laid out over the processes.

    Attributes:
        ep_size: P, ranks in an expert-parallel group (1: every rank holds every expert).
        dp_size: data-parallel replicas of the EP group (world = dp_size · ep_size).
        rank: this process's global rank.
        world_size: number of processes.
        ep_group: process group of this rank's EP group (None when ``ep_size == 1``).
        replica_group: process group of the ranks holding the same shard as this rank (None when
            ``dp_size == 1``: no other rank holds it).
        layers: MoE module name → this rank's ``ExpertShard`` of it.
        expert_params: parameter name → ``ExpertShard``, for every expert parameter (dim 0 = the
            layer's local experts). Names are those of ``model.named_parameters()``.
        mesh: the ``(dp, ep)`` ``DeviceMesh`` the groups come from (None in a single process).
        released: ``release()`` has destroyed the groups; the sharded layers refuse to run.
    """

    ep_size: int
    dp_size: int
    rank: int
    world_size: int
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    layers: dict[str, ExpertShard]
    expert_params: dict[str, ExpertShard]
    mesh: DeviceMesh | None = None
    released: bool = False

    @property
    def ep_rank(self) -> int:
        """Position of this rank in its EP group (which shard it holds)."""
        return self.rank % self.ep_size

    @property
    def replica_rank(self) -> int:
        """Which data-parallel replica of the EP group this rank belongs to (0 writes checkpoints)."""
        return self.rank // self.ep_size

    def release(self) -> None:
        """Destroys the process groups ``shard_experts`` created for this plan (the default group,
        which a mesh dimension spanning the world reuses, is left to ``shutdown()``). Every process
        calls it, once it is done with the sharded model: each ``shard_experts`` call creates new
        groups, and a process that shards many models would otherwise keep all of them (threads and
        sockets with gloo, communicators with NCCL) until it ends. Afterwards the model's sharded
        layers raise instead of running; save or gather what you need first. Calling it again does
        nothing."""
        if self.released:
            return
        if self.mesh is not None:
            destroy_mesh_groups(self.mesh)
        self.ep_group = self.replica_group = self.mesh = None
        self.released = True

    def __deepcopy__(self, memo) -> "ExpertParallelPlan":
        # Process groups cannot be copied, and a copied model still lives on the same processes.
        return self


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on rows with uneven splits; the backward sends gradients back the
    way the rows came (the same exchange with the splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


@dataclasses.dataclass
class _Exchange:
    """What ``ExpertParallel.dispatch`` hands to ``run`` and ``combine``."""

    token_N: torch.Tensor  # long, source token of each sent row (sorted by expert)
    weight_N: torch.Tensor  # gate weight of each sent row
    send_splits: list[int]  # rows sent to each rank of the EP group
    recv_splits: list[int]  # rows received from each
    recv_E: torch.Tensor  # rows received per (source rank, local expert), flattened [P·L]
    num_tokens: int


class ExpertParallel(DispatchBackend):
    """The all-to-all dispatcher: the computed assignments run on the ranks holding their experts.

    ``shard_experts`` makes it the backend of every MoE layer it shards (the layer's former backend
    becomes its ``sorter``); ``MoE.forward`` calls dispatch → run → combine as for any backend.
    It holds no weights (the layer's ``experts`` hold the local slice).

    Args:
        plan: the model's ``ExpertParallelPlan`` (groups, sizes).
        shard: this layer's local experts.
        sorter: the backend whose ``sort_assignments`` orders the assignments by expert (the
            ``triton`` backend with its permutation kernels); gathering, the exchanges and the
            combine are torch ops whatever it is. None: a torch sort.
    """

    shards_experts = True

    def __init__(self, plan: ExpertParallelPlan, shard: ExpertShard, sorter: DispatchBackend | None = None) -> None:
        self.plan, self.shard = plan, shard
        self.sorter = sorter if sorter is not None else DispatchBackend()

    def __repr__(self) -> str:
        s = self.shard
        return f"ExpertParallel(ep_size={self.plan.ep_size}, experts [{s.offset}, {s.offset + s.count}) of {s.total})"

    def with_sorter(self, sorter: DispatchBackend) -> "ExpertParallel":
        """The same exchange, sorting with ``sorter``."""
        return ExpertParallel(self.plan, self.shard, sorter)

    def sort_assignments(self, routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sorter.sort_assignments(routing)

    def dispatch(self, x_TD: torch.Tensor, routing: RouterOutput) -> Dispatched:
        """Sends each computed assignment's row to the rank holding its expert; the rows this rank
        receives (ordered by source rank, then local expert) are the ``inputs``."""
        if self.plan.released:
            raise RuntimeError(
                "this MoE layer's expert-parallel process groups were destroyed by ExpertParallelPlan.release(); "
                "it cannot run any more (load the saved shards into a model sharded again with shard_experts)"
            )
        P, L, E = self.plan.ep_size, self.shard.count, self.shard.total
        group = self.plan.ep_group
        assert routing.num_experts == E, (routing.num_experts, E)
        # Sort computed assignments by expert: rank q's experts [qL, (q+1)L) become one block.
        flat_N, send_E = self.sort_assignments(routing)
        token_N, weight_N = flat_N // routing.top_k, assignment_weights(routing, flat_N)
        # Counts: send_E[e] rows I send to expert e; recv_E[q·L + l] rows rank q sends to my local
        # expert l. Split sizes must be host integers (one device sync, as dropless dispatch needs).
        recv_E = torch.empty_like(send_E)
        dist.all_to_all_single(recv_E, send_E, group=group)
        send_splits = send_E.view(P, L).sum(1).tolist()
        recv_splits = recv_E.view(P, L).sum(1).tolist()
        x_recv_MD = _AllToAll.apply(x_TD.index_select(0, token_N), recv_splits, send_splits, group)
        return Dispatched(x_recv_MD, _Exchange(token_N, weight_N, send_splits, recv_splits, recv_E, x_TD.shape[0]))

    def run(self, experts: nn.Module, dispatched: Dispatched) -> torch.Tensor:
        """The local experts on the received rows (regrouped by local expert for the grouped
        kernel), returned in arrival order."""
        P, L = self.plan.ep_size, self.shard.count
        x_recv_MD, exchange = dispatched.inputs, dispatched.plan
        local_M = torch.arange(L, device=x_recv_MD.device).repeat(P).repeat_interleave(exchange.recv_E)
        by_expert_M = torch.sort(local_M, stable=True).indices
        y_local_MD = experts.forward_sorted(x_recv_MD.index_select(0, by_expert_M),
                                            exchange.recv_E.view(P, L).sum(0).tolist())
        arrival_M = torch.empty_like(by_expert_M)
        arrival_M[by_expert_M] = torch.arange(by_expert_M.numel(), device=x_recv_MD.device)
        y_recv_MD = y_local_MD.index_select(0, arrival_M)
        if torch.is_grad_enabled() and x_recv_MD.shape[0] == 0:
            y_recv_MD = _tie_to_graph(y_recv_MD, x_recv_MD, experts)
        return y_recv_MD

    def combine(self, y_recv_MD: torch.Tensor, dispatched: Dispatched, x_TD: torch.Tensor) -> torch.Tensor:
        """Outputs back to the ranks that sent the rows, then a gate-weighted scatter-add into the
        tokens (as ``TorchDispatch.combine``): Σ_k weight[t, k] · expert_{ids[t, k]}(x[t]), zero rows
        for padding and fully dropped tokens."""
        exchange = dispatched.plan
        y_ND = _AllToAll.apply(y_recv_MD, exchange.send_splits, exchange.recv_splits, self.plan.ep_group)
        weighted_ND = y_ND * exchange.weight_N.unsqueeze(1).to(y_ND.dtype)
        y_TD = weighted_ND.new_zeros(exchange.num_tokens, weighted_ND.shape[1])
        return y_TD.index_add_(0, exchange.token_N, weighted_ND)  # in place on fresh zeros (no copy)


def _tie_to_graph(y_MD: torch.Tensor, x_MD: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """An empty expert output that depends, in the autograd graph, on the received rows and the
    local weights.

    A rank that receives no rows may get a constant from its experts (``LinearExperts`` returns
    fresh zeros). Its backward would then skip the two all-to-alls that the other ranks run, and
    the ranks' collectives would no longer match (a hang, or a garbled exchange). Adding a scalar
    built from the inputs keeps both exchanges in this rank's graph; the output is empty, so no
    value changes.
    """
    anchor = x_MD.sum()
    for p in experts.parameters():
        if p.requires_grad:
            anchor = anchor + p.sum() * 0.0
    return y_MD + anchor.to(y_MD.dtype)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def _expert_param_names(name: str, moe: MoE) -> list[str]:
    prefix = f"{name}.experts." if name else "experts."
    return [prefix + pname for pname, _ in moe.experts.named_parameters()]


def _process_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_experts(model: nn.Module, ep_size: int) -> ExpertParallelPlan:
    """Shards the experts of every MoE layer of ``model`` over expert-parallel groups of ``ep_size``.

    Every process must call it, with the same model structure, after
    ``moe_gen.distributed.init_distributed()`` and before building the optimizer (the expert
    parameters are replaced). Rank r keeps experts ``[(r mod P)·E/P, (r mod P + 1)·E/P)`` of each
    layer as new parameters sliced from the full stacked weights, so processes that built the model
    from the same seed together hold exactly the single-process model.

    Args:
        model: any module containing ``MoE`` layers (a ``GeneralistModel``, a bare ``MoE``).
        ep_size: P; must divide the world size and every layer's number of experts. 1 keeps every
            expert on every rank (pure data parallelism) and only returns the plan.

    Returns:
        The ``ExpertParallelPlan`` (pass it to ``sync_gradients``, ``clip_grad_norm_``,
        ``save_shards``, ``load_shards``).

    Raises:
        ValueError: ep_size is not a positive divisor of the world size or of a layer's E, a
            layer uses the ``merged`` backend, or the model is already sharded.
    """
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    layers = _moe_layers(model)
    # Checks are identical on every rank, so every rank raises before any group is created.
    for name, moe in layers:
        _check_shardable(name or "<root>", moe, ep_size)
    rank, world = _process_info()
    _check_world_size(world, ep_size)
    dp_size = world // ep_size
    device = next(iter(model.parameters()), torch.empty(0)).device
    mesh, ep_group, replica_group = _new_groups(device.type, ep_size, dp_size)
    plan = ExpertParallelPlan(ep_size=ep_size, dp_size=dp_size, rank=rank, world_size=world,
                              ep_group=ep_group, replica_group=replica_group, layers={}, expert_params={},
                              mesh=mesh)
    for name, moe in layers:
        E = moe.config.num_experts
        shard = ExpertShard(offset=plan.ep_rank * (E // ep_size), count=E // ep_size, total=E)
        _record_shard(plan, name, moe, shard)
        if ep_size > 1:
            keep_local_experts(moe, plan, shard)
    return plan


def _check_shardable(label: str, moe: MoE, ep_size: int) -> None:
    """Raises unless ``shard_experts`` can slice the experts of layer ``label`` into ``ep_size`` shards."""
    if moe.expert_parallel is not None:
        raise ValueError(f"MoE layer {label!r} is already sharded ({moe.expert_parallel!r})")
    if moe.backend.needs_shared_routes:
        raise ValueError(
            f"MoE layer {label!r} uses backend {moe.config.backend!r}, which merges experts per route "
            "for inference and cannot run with expert parallelism; use backend='torch'"
        )
    E = moe.config.num_experts
    if E % ep_size:
        raise ValueError(f"MoE layer {label!r} has E={E} experts, which is not divisible by ep_size P={ep_size}")
    for pname, param in moe.experts.named_parameters():
        if "." in pname:
            raise ValueError(f"MoE layer {label!r}: expert parameter {pname!r} sits in a submodule; expert "
                             "parallelism slices the stacked parameters held by the experts module itself")
        if param.dim() == 0 or param.shape[0] != E:
            raise ValueError(f"MoE layer {label!r}: expert parameter {pname!r} has shape {tuple(param.shape)}; "
                             f"expert parallelism needs a leading dimension of E={E}")


def _check_world_size(world: int, ep_size: int) -> None:
    if world % ep_size:
        initialised = dist.is_available() and dist.is_initialized()
        raise ValueError(
            f"ep_size={ep_size} must divide the number of processes, which is {world}"
            + ("" if initialised else " (torch.distributed is not initialised; call init_distributed() "
                                      "under torchrun first)")
        )


def _new_groups(device_type: str, ep_size: int, dp_size: int):
    """The (dp, ep) device mesh of the world and this rank's (EP group, replica group) in it; None
    where a group would be this rank alone (and no mesh in a single process).

    ``init_device_mesh`` lays ranks out row-major over ``(dp, ep)``: rank ``d·P + e``, so an EP
    group is P consecutive ranks and a replica group the ranks with the same ``e``. Creating the
    mesh is collective over the world: every rank calls it.
    """
    if ep_size * dp_size == 1:
        return None, None, None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dp_size, ep_size), mesh_dim_names=("dp", "ep"))
    ep_group = mesh.get_group("ep") if ep_size > 1 else None
    replica_group = mesh.get_group("dp") if dp_size > 1 else None
    return mesh, ep_group, replica_group


def destroy_mesh_groups(mesh: DeviceMesh) -> None:
    """Destroys the process groups of ``mesh``'s dimensions on this process, except the default
    group (a dimension spanning the whole world uses it; ``moe_gen.distributed.shutdown`` ends it).
    Nothing to do once the default group is gone: destroying it destroyed every group."""
    if not dist.is_initialized():
        return
    for group in mesh.get_all_groups():
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


def _record_shard(plan: ExpertParallelPlan, name: str, moe: MoE, shard: ExpertShard) -> None:
    """Enters layer ``name`` and each of its expert parameters in ``plan`` as holding ``shard``."""
    plan.layers[name] = shard
    for full_name in _expert_param_names(name, moe):
        plan.expert_params[full_name] = shard


def keep_local_experts(moe: MoE, plan: ExpertParallelPlan, shard: ExpertShard) -> None:
    """Replaces the layer's stacked expert parameters ``[E, ...]`` by new ones holding this rank's
    slice ``[L, ...]``, and routes the layer's forward through ``ExpertParallel``."""
    experts = moe.experts
    for pname, param in list(experts.named_parameters(recurse=False)):
        local = param.detach()[shard.offset:shard.offset + shard.count].clone()
        setattr(experts, pname, nn.Parameter(local, requires_grad=param.requires_grad))
    experts.num_experts = shard.count
    moe.backend = ExpertParallel(plan, shard, sorter=moe.backend)


def expert_plan(model: nn.Module) -> ExpertParallelPlan:
    """The plan of ``model``: the one ``shard_experts`` attached, or, for an unsharded model, the
    layout in which this process holds every expert (replicated over all processes)."""
    layers = _moe_layers(model)
    for _, moe in layers:
        if moe.expert_parallel is not None:
            return moe.expert_parallel.plan
    rank, world = _process_info()
    plan = ExpertParallelPlan(ep_size=1, dp_size=world, rank=rank, world_size=world, ep_group=None,
                              replica_group=dist.group.WORLD if world > 1 else None, layers={}, expert_params={})
    for name, moe in layers:
        E = moe.config.num_experts
        _record_shard(plan, name, moe, ExpertShard(offset=0, count=E, total=E))
    return plan
