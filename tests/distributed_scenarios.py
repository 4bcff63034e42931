"""The launch machinery of the multi-process tests (test_distributed.py, test_distributed_runs.py,
test_distributed_audit14.py): ``Launch`` spawns fresh gloo processes (127.0.0.1) that each run one
scenario function of this module (``SCENARIOS``) and write their results to a safetensors file;
the set-ups are built identically by the workers and by the tests' single-process references.
Every launch is bounded by ``LAUNCH_LIMIT_S`` (a hang fails the test, it does not stall the suite).

The workers import this module by name (``multiprocessing`` spawn), so it stays a top-level module
of tests/ next to the test files (pytest puts tests/ on ``sys.path``; the children inherit it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import traceback

import pytest
import torch
from torch import nn

from moe_gen import ExpertsConfig, MoE, MoEConfig
from moe_gen.distributed import (
    barrier,
    clip_grad_norm_,
    init_distributed,
    load_shards,
    no_sync,
    replicate,
    save_shards,
    sync_gradients,
)
from moe_gen.experts.parallel import expert_plan, shard_experts

WORLD = 2
LAUNCH_LIMIT_S = 60.0  # wall-clock bound of one 2-process launch
COLLECTIVE_TIMEOUT_S = 15.0  # init_distributed timeout inside the workers
MAX_NORM = 0.5  # small enough that clipping is active in the training step
REPLICA_MAX_NORM = 0.05


# ---- launching ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, scenario: str, out_dir: str, args: tuple) -> None:
    """Process body: join the group as torchrun would set it up, run a scenario, write results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the processes share two cores
    try:
        init_distributed(backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
        tensors, info = SCENARIOS[scenario](rank, out_dir, *args)
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in tensors.items()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"), metadata={"info": json.dumps(info)})
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test through a file
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)  # skip interpreter teardown, which could wait on a broken process group
    # The results are written: skip interpreter teardown here too, where a library's thread can
    # abort the process ("terminate called without an active exception": exit -6 after a run that
    # had succeeded, seen once in CI on 2026-12-05).
    os._exit(0)


class Launch:
    """Runs ``SCENARIOS[scenario](rank, out_dir, *args)`` on ``world`` processes; records exit codes,
    ranks that had to be killed, error tracebacks."""

    def __init__(self, scenario: str, out_dir, *args, world: int = WORLD) -> None:
        self.out_dir, self.world = str(out_dir), world
        os.makedirs(self.out_dir, exist_ok=True)
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(rank, world, port, scenario, self.out_dir, args))
                 for rank in range(world)]
        start = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, start + LAUNCH_LIMIT_S - time.monotonic()))
        self.seconds = time.monotonic() - start
        self.hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        self.exitcodes = [p.exitcode for p in procs]
        self.errors = {}
        for rank in range(world):
            path = os.path.join(self.out_dir, f"rank{rank}.error")
            if os.path.exists(path):
                with open(path) as f:
                    self.errors[rank] = f.read()

    def results(self) -> list[tuple[dict[str, torch.Tensor], dict]]:
        """Each rank's (tensors, info); fails the test with the workers' tracebacks otherwise."""
        if self.hung or self.errors or any(code != 0 for code in self.exitcodes):
            pytest.fail(f"workers failed: hung ranks {self.hung}, exit codes {self.exitcodes}\n"
                        + "\n".join(f"--- rank {r} ---\n{text}" for r, text in self.errors.items()))
        from safetensors import safe_open

        out = []
        for rank in range(self.world):
            with safe_open(os.path.join(self.out_dir, f"rank{rank}.safetensors"), framework="pt") as f:
                out.append(({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])))
        return out


# ---- shared set-ups (built identically by the workers and by the single-process reference) -------


def _debug_setup(mixed: bool | str = False):
    """The debug model (seed 0) and two batches of different sizes, one per rank. ``mixed``: a
    model of three tasks with an adapter each, rank 0 holding image rows only, rank 1 table rows
    only, and the motion adapter used by neither; ``"text"``: rank 1 holds text rows (no adapter)."""
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, collate, load_preset

    tok = Tokenizer.default()
    names = ("digit_classification", "table_species", "motion_classification") if mixed else ("digit_classification",)
    if mixed == "text":
        names = ("digit_classification", "doc_topic", "motion_classification")
    tasks = [load_preset(name, "train", limit=8) for name in names]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tasks, tok)
    if mixed:
        batches = [collate(list(tasks[i].samples(tok))[:n], tok, model.task_ids) for i, n in ((0, 3), (1, 5))]
    else:
        samples = list(tasks[0].samples(tok))
        batches = [collate(samples[:3], tok, model.task_ids), collate(samples[3:], tok, model.task_ids)]
    return model, batches


def _optimizer(model) -> torch.optim.Optimizer:
    # Some gradients are zero in exact arithmetic (attention key biases: softmax ignores a shift
    # shared by all keys) and come out as ±1e-9 rounding noise whose sign depends on summation
    # order. Adam's first step moves a weight by lr·g/(|g| + eps), so with the default eps=1e-8
    # that noise alone would move those weights by up to ±lr; eps=1e-6 keeps it below 1e-5.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)


KINDS = ("mlp", "glu", "linear")
D = 8


def _routed_layer(kind: str) -> MoE:
    """4 experts, top-2, router weight 4·I: expert e scores coordinate e, so inputs pick experts."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_hidden=16 if kind != "linear" else D, num_experts=4, top_k=2, experts=kind))
    with torch.no_grad():
        moe.router.weight.copy_(4.0 * torch.eye(4, D))
    return moe


def _uneven_inputs(round_: int, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per round and rank: tokens [T, D] and an optional padding mask. Rank 0 holds experts 0, 1.

    0: 3 tokens against 500;  1: every rank-0 token goes to experts 2, 3 (rank 1's);
    2: rank 0 is all padding; 3: rank 0 has no tokens and rank 1's go to experts 0, 1 only, so
    rank 1's experts receive nothing at all.
    """
    g = torch.Generator().manual_seed(100 * round_ + rank)
    sizes = {0: (3, 500), 1: (5, 40), 2: (4, 7), 3: (0, 2)}[round_]
    x = torch.randn(sizes[rank], D, generator=g)
    mask = None
    if round_ == 1 and rank == 0:
        x[:, 2:4] += 6.0
    if round_ == 2 and rank == 0:
        mask = torch.ones(sizes[rank], dtype=torch.bool)
    if round_ == 3 and rank == 1:
        x[:, 0:2] += 6.0
    return x, mask


ROUNDS = 4


def _probe(round_: int, rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7 + 100 * round_ + rank))


def _run_round(moe: MoE, round_: int, rank: int):
    """Forward + backward of a fixed random projection of the output plus the aux loss."""
    x, mask = _uneven_inputs(round_, rank)
    x.requires_grad_(True)
    out = moe(x, padding_mask=mask)
    ((out.output * _probe(round_, rank, out.output.shape)).sum() + out.aux_loss).backward()
    return out.output.detach(), x.grad


def _ckpt_model() -> nn.Module:
    """Two MoE layers with different E (4 MLP experts, 2 linear experts) and a dense head."""
    torch.manual_seed(0)
    return nn.ModuleDict({
        "ffn": MoE(MoEConfig(d_model=D, d_hidden=12, num_experts=4, top_k=2)),
        "proj": MoE(MoEConfig(d_model=D, d_hidden=D, num_experts=2, top_k=1, experts="linear")),
        "head": nn.Linear(D, 3),
    })


def _ckpt_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights plus optimizer-like state: per-parameter moments and a scalar step."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        tensors[f"{name}::exp_avg"] = p.detach() * 2 + 1
        tensors[f"{name}::step"] = torch.tensor(3.0)
    return tensors


def _replica_model() -> nn.Module:
    """An MoE layer (gated experts and a shared expert) and a dense head."""
    torch.manual_seed(0)
    experts = ExpertsConfig(kind="glu", activation="silu", shared_expert=True)
    return nn.ModuleDict({"moe": MoE(MoEConfig(d_model=D, d_hidden=16, num_experts=4, top_k=2, experts=experts)),
                          "head": nn.Linear(D, 3)})


def _replica_loss(model: nn.Module, rank: int) -> torch.Tensor:
    """Rank r's loss on its own 4 + 9r tokens."""
    x = torch.randn(4 + 9 * rank, D, generator=torch.Generator().manual_seed(rank))
    out = model["moe"](x)
    return model["head"](out.output).pow(2).mean() + out.aux_loss


def _expert_slice(tensor: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    return tensor[offset:offset + count]


# ---- scenarios (run in each worker process) -------------------------------------------------------


def _scenario_train_step(rank: int, out_dir: str, sharding: str = "replicate"):
    """EP 2; with ``sharding="fsdp"`` the dense parameters are FSDP2 shards as well (gathered whole
    for the comparison; expert slices are returned as they are)."""
    from moe_gen.fsdp import full_tensors, shard_dense
    from moe_gen.objectives import GenerativeObjective

    model, batches = _debug_setup()
    plan = shard_experts(model, 2)
    if sharding == "fsdp":
        shard_dense(model)
    optimizer = _optimizer(model)
    loss = GenerativeObjective(model)(batches[rank])["loss"]
    loss.backward()
    sync_gradients(model, plan)
    norm = clip_grad_norm_(model, MAX_NORM, plan)
    grads = full_tensors({f"grad/{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    optimizer.step()
    tensors = full_tensors({name: p.detach() for name, p in model.named_parameters()}) | grads
    info = {"loss": loss.item(), "norm": norm.item(),
            "shards": {name: [s.offset, s.count] for name, s in plan.expert_params.items()}}
    return tensors, info


def _scenario_ddp_step(rank: int, out_dir: str, ep_size: int = 2, mixed: bool | str = False, accumulate: bool = False,
                       trainable: str = "all"):
    """The step with the replicated parameters under DDP (``replicate``), experts sharded over
    ``ep_size`` ranks. ``accumulate``: two backward passes, the first under ``no_sync`` on half of
    this rank's loss, the second (synchronised) on half of the other rank's, so that each rank's
    loss is the mean of both and parameters one rank uses only in the unsynchronised pass (mixed:
    its adapter) still have their gradients averaged. ``trainable`` other than "all": the rest is
    frozen, and the model touches its adapters, as the Trainer on several processes has it."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.trainer.trainer import select_trainable

    model, batches = _debug_setup(mixed)
    if trainable != "all":
        select_trainable(model, trainable)
        model.touch_all_adapters = True
    plan = shard_experts(model, ep_size) if ep_size > 1 else None
    ddp = replicate(model, {"generative": GenerativeObjective(model)}, plan)
    optimizer = _optimizer(model)
    if accumulate:
        with no_sync(ddp):
            loss = ddp("generative", batches[rank])["loss"]
            (0.5 * loss).backward()
        (0.5 * ddp("generative", batches[1 - rank])["loss"]).backward()
    else:
        loss = ddp("generative", batches[rank])["loss"]
        loss.backward()
    sync_gradients(model, plan, dense_synced=True)
    norm = clip_grad_norm_(model, MAX_NORM, plan)
    grads = {f"grad/{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    layout = plan or expert_plan(model)
    info = {"loss": loss.item(), "norm": norm.item(),
            "shards": {name: [s.offset, s.count] for name, s in layout.expert_params.items()}}
    return {name: p.detach() for name, p in model.named_parameters()} | grads, info


def _scenario_fsdp_bf16(rank: int, out_dir: str):
    """FSDP2 gathering parameters in bf16 (reducing gradients in fp32): the loss stays near fp32's,
    parameters and AdamW moments stay fp32."""
    from moe_gen.fsdp import shard_dense
    from moe_gen.objectives import GenerativeObjective

    model, batches = _debug_setup()
    shard_dense(model, param_dtype=torch.bfloat16)
    optimizer = _optimizer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GenerativeObjective(model)(batches[rank])["loss"]
    loss.backward()
    sync_gradients(model)
    clip_grad_norm_(model, MAX_NORM)
    optimizer.step()
    dtypes = sorted({str(p.dtype) for p in model.parameters()} | {str(p.grad.dtype) for p in model.parameters()
                                                                    if p.grad is not None})
    moments = sorted({str(v.dtype) for state in optimizer.state.values() for k, v in state.items()
                      if k.startswith("exp_avg")})
    return {}, {"loss": loss.item(), "dtypes": dtypes, "moments": moments}


def _scenario_fsdp_bf16_struct_ids(rank: int, out_dir: str):
    """FSDP2 gathering parameters in bf16 with STRUCT cells whose text-value ids pass 256: the text
    ids the table adapter looks up, and those in the batch's rows."""
    from moe_gen.fsdp import shard_dense
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import Task, Tokenizer, collate

    tok = Tokenizer.default()
    task = Task("cities", "[STRUCT:t] which city? -> [TEXT:y]",
                [{"t": {"city": f"town{i:03d}"}, "y": "yes"} for i in range(600)] * 2)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    shard_dense(model, param_dtype=torch.bfloat16)
    seen = []
    model.adapters["struct_cells"].text.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
    plan = model.plan(task)
    samples = [plan.encode({"t": {"city": f"town{i}"}, "y": "yes"}, 0, training=False)
               for i in range(500 + 2 * rank, 502 + 2 * rank)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        GenerativeObjective(model)(collate(samples, tok, model.task_ids))["loss"].backward()
    return {}, {"rows": [int(s.encoder[0].rows[0, 3]) for s in samples], "looked_up": seen}


def _scenario_fsdp_step(rank: int, out_dir: str, shard_size: int | None = None, unit: str = "block",
                        mixed: bool = False):
    """The same step with the dense parameters sharded by FSDP2 (no expert parallelism): every
    tensor is gathered whole at the end for the comparison. ``shard_size=1``: replicated by FSDP2."""
    from moe_gen.fsdp import full_tensors, is_sharded, shard_dense
    from moe_gen.objectives import GenerativeObjective

    model, batches = _debug_setup(mixed)
    shard_dense(model, shard_size, unit)
    optimizer = _optimizer(model)  # over the shards
    loss = GenerativeObjective(model)(batches[rank])["loss"]
    loss.backward()
    sync_gradients(model)
    norm = clip_grad_norm_(model, MAX_NORM)
    grads = full_tensors({f"grad/{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    optimizer.step()
    weights = full_tensors({name: p.detach() for name, p in model.named_parameters()})
    shard_sizes = {name: p.to_local().numel() for name, p in model.named_parameters() if hasattr(p, "to_local")}
    info = {"loss": loss.item(), "norm": norm.item(), "sharded": is_sharded(model), "shard_sizes": shard_sizes}
    return weights | grads, info


def _scenario_replicas(rank: int, out_dir: str, ep_size: int):
    model = _replica_model()
    plan = shard_experts(model, ep_size) if ep_size > 1 else None  # pure data parallelism needs no plan
    _replica_loss(model, rank).backward()
    sync_gradients(model, plan)
    norm = clip_grad_norm_(model, REPLICA_MAX_NORM, plan)
    _optimizer(model).step()
    layout = plan or expert_plan(model)
    info = {"norm": norm.item(), "shards": {name: [s.offset, s.count] for name, s in layout.expert_params.items()},
            "groups": [layout.ep_size, layout.dp_size, layout.ep_rank, layout.replica_rank]}
    return {name: p.detach() for name, p in model.named_parameters()}, info


def _scenario_uneven(rank: int, out_dir: str):
    tensors, info = {}, {}
    for kind in KINDS:
        moe = _routed_layer(kind)
        plan = shard_experts(moe, 2)
        for round_ in range(ROUNDS):
            moe.zero_grad(set_to_none=True)
            y, x_grad = _run_round(moe, round_, rank)
            tensors[f"{kind}/{round_}/y"], tensors[f"{kind}/{round_}/x_grad"] = y, x_grad
            tensors[f"{kind}/{round_}/router_grad"] = moe.router.weight.grad
            for name, p in moe.experts.named_parameters():
                tensors[f"{kind}/{round_}/experts.{name}"] = torch.zeros_like(p) if p.grad is None else p.grad
        with torch.no_grad():  # inference takes the same path
            x, mask = _uneven_inputs(0, rank)
            tensors[f"{kind}/no_grad/y"] = moe(x, padding_mask=mask).output
        info[kind] = plan.layers[""].offset
    try:
        moe.set_backend("merged")
    except ValueError as exc:
        info["merged_error"] = str(exc)
    return tensors, info


def _scenario_release(rank: int, out_dir: str):
    """Shards three layers in turn, releasing each plan (twice), and counts this process's groups."""
    groups = torch.distributed.distributed_c10d._world.pg_map
    counts, outputs = [len(groups)], {}
    for turn in range(3):
        moe = _routed_layer("mlp")
        plan = shard_experts(moe, 2)
        counts.append(len(groups))
        outputs[f"y{turn}"], _ = _run_round(moe, 0, rank)
        plan.release()
        plan.release()
        counts.append(len(groups))
    try:
        _run_round(moe, 0, rank)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    barrier()  # the default group still works
    return outputs, {"counts": counts, "error": error, "groups": [plan.ep_group, plan.replica_group, plan.mesh]}


def _scenario_release_fsdp(rank: int, out_dir: str):
    """Shards the debug model's experts and dense parameters three times in turn, releasing each
    model's groups (twice), and counts this process's groups."""
    from moe_gen.distributed import release_groups
    from moe_gen.fsdp import shard_dense
    from moe_gen.objectives import GenerativeObjective

    groups = torch.distributed.distributed_c10d._world.pg_map
    counts, losses = [len(groups)], []
    for _ in range(3):
        model, batches = _debug_setup()
        shard_experts(model, 2)
        shard_dense(model)
        counts.append(len(groups))
        losses.append(GenerativeObjective(model)(batches[rank])["loss"].item())
        release_groups(model)
        release_groups(model)
        counts.append(len(groups))
    try:
        GenerativeObjective(model)(batches[rank])
        error = None
    except RuntimeError as exc:
        error = str(exc)
    unsharded, _ = _debug_setup()
    release_groups(unsharded)  # nothing to release: left as it was
    loss = GenerativeObjective(unsharded)(batches[rank])["loss"].item()
    barrier()  # the default group still works
    return {}, {"counts": counts, "losses": losses, "error": error, "unsharded_loss": loss}


def _scenario_failure(rank: int, out_dir: str, sharding: str = "replicate"):
    if sharding == "fsdp":  # the peer waits in FSDP's all-gather of the next forward
        from moe_gen.fsdp import shard_dense
        from moe_gen.objectives import GenerativeObjective

        model, batches = _debug_setup()
        shard_dense(model)
        run = lambda: GenerativeObjective(model)(batches[rank])["loss"].backward()  # noqa: E731
    elif sharding == "ddp":  # the peer waits in DDP's gradient all-reduce during backward
        from moe_gen.objectives import GenerativeObjective

        model, batches = _debug_setup()
        ddp = replicate(model, {"generative": GenerativeObjective(model)})
        run = lambda: ddp("generative", batches[rank])["loss"].backward()  # noqa: E731
    else:  # the peer waits on an all-to-all
        moe = _routed_layer("mlp")
        shard_experts(moe, 2)
        run = lambda: moe(torch.randn(6, D))  # noqa: E731
    run()  # one step that both ranks complete
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    run()
    return {}, {}


def _scenario_checkpoint(rank: int, out_dir: str):
    model = _ckpt_model()
    plan = shard_experts(model, 2)
    local = _ckpt_tensors(model)
    written = save_shards(os.path.join(out_dir, "ep2"), "model", local, plan)
    barrier()
    back = load_shards(os.path.join(out_dir, "ep2"), "model", plan)
    same = sorted(back) == sorted(local) and all(torch.equal(back[k], local[k]) for k in local)
    from_single = load_shards(os.path.join(out_dir, "single"), "model", model)  # model, not plan: same layout
    model.load_state_dict({k: v for k, v in from_single.items() if "::" not in k})  # strict: shapes fit
    tensors = {f"single/{k}": v for k, v in from_single.items()}
    info = {"round_trip_equal": same, "written": sorted(os.path.basename(p) for p in written),
            "shards": {name: [s.offset, s.count] for name, s in plan.expert_params.items()}}
    return tensors, info


def _scenario_wrapper_plan(rank: int, out_dir: str):
    """Each helper given a wrapper of the expert-sharded model and no plan: its error (None: accepted);
    then the same on the model itself: its norm."""
    model = _replica_model()
    shard_experts(model, 2)
    _replica_loss(model, rank).backward()
    wrapper = nn.ModuleDict({"inner": model})  # as LossModule and DDP hold it
    directory = os.path.join(out_dir, f"rank{rank}")
    calls = {"sync_gradients": lambda: sync_gradients(wrapper),
             "clip_grad_norm_": lambda: clip_grad_norm_(wrapper, 1.0),
             "save_shards": lambda: save_shards(directory, "model", wrapper.state_dict(), wrapper),
             "load_shards": lambda: load_shards(directory, "model", wrapper)}
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except (ValueError, FileNotFoundError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    sync_gradients(model)
    return {}, {"errors": errors, "norm": clip_grad_norm_(model, 1.0).item()}


def _scenario_save_pretrained_sharded(rank: int, out_dir: str):
    """save_pretrained of the debug model with its experts spread over the processes, and of one with
    FSDP-sharded parameters: each one's error (None: saved) and whether its folder exists."""
    from moe_gen.fsdp import shard_dense

    info = {}
    for how in ("experts", "fsdp"):
        model, _ = _debug_setup()
        shard_experts(model, 2) if how == "experts" else shard_dense(model)
        directory = os.path.join(out_dir, f"{how}-{rank}")
        try:
            model.save_pretrained(directory)
            info[how] = None
        except ValueError as exc:
            info[how] = str(exc)
        info[f"{how}_written"] = os.path.exists(directory)
    return {}, info


def _scenario_analyze_sharded(rank: int, out_dir: str):
    """The routing analysis of the debug model with its experts spread over the processes, and of one
    with FSDP-sharded parameters: each entry point's error (None: it ran); and the held-out loss of
    the unsharded copy the FSDP error points to, next to the loss of the model before sharding."""
    import copy

    from moe_gen.analysis import report, stats
    from moe_gen.fsdp import shard_dense, unsharded_copy
    from moe_gen.tasks import load_preset

    tasks = [load_preset("digit_classification", "test")]
    info = {}
    for how in ("experts", "fsdp"):
        model, _ = _debug_setup()
        whole = copy.deepcopy(model)
        shard_experts(model, 2) if how == "experts" else shard_dense(model)
        calls = {"analyze": lambda m: report.analyze(m, tasks, limit=4, interference_rows=2),
                 "expert_similarity": stats.expert_similarity,
                 "task_gradients": lambda m: report.task_interference(m, tasks, 2)}
        for name, call in calls.items():
            try:
                call(model)
                info[f"{how}/{name}"] = None
            except ValueError as exc:
                info[f"{how}/{name}"] = str(exc)
    loss = [report.analyze(m, tasks, limit=4, interference_rows=2).evaluation["digit_classification"]["loss"]
            for m in (whole, unsharded_copy(model))]
    return {}, {**info, "whole_loss": loss[0], "copy_loss": loss[1]}


def _scenario_without_local_rank(rank: int, out_dir: str):
    """A launcher that sets RANK but not LOCAL_RANK: the GPU index world_info reports."""
    from moe_gen.distributed import world_info

    os.environ.pop("LOCAL_RANK")
    return {}, {"local_rank": world_info().local_rank}


def _trainer_tasks(names):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    tok = Tokenizer.default()
    tasks = [load_preset(name, "train", limit=8) for name in names]
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug"), tasks, tok), tasks


def _scenario_trainer(rank: int, out_dir: str, names: tuple, settings: dict, resume: bool = False):
    """A ``Trainer`` on ``names`` with ``settings``: its error (``info["error"]``), or after training
    every parameter, gathered whole."""
    from moe_gen.fsdp import full_tensors
    from moe_gen.trainer import TrainConfig, Trainer

    model, tasks = _trainer_tasks(names)
    config = TrainConfig(**{"steps": 2, "batch_size": 4, "progress": False, "tensorboard": False, **settings})
    try:
        trainer = Trainer(model, tasks, config, output_dir=os.path.join(out_dir, "run"), resume=resume,
                          overwrite=not resume)
    except ValueError as exc:
        return {}, {"error": str(exc)}
    summary = trainer.fit()
    return full_tensors({name: p.detach() for name, p in model.named_parameters()}), {
        "error": None, "loss": summary["loss"], **{k: summary[k] for k in ("best_step", "best_model") if k in summary}}


def _scenario_sam_balance(rank: int, out_dir: str, settings: dict):
    """One ``Trainer.train_step`` of an attribute-routed model balanced by a bias, without and with
    sharpness-aware minimisation (``sam_rho``): the routers' biases after it, by ρ."""
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset
    from moe_gen.trainer import TrainConfig, Trainer

    tok = Tokenizer.default()
    tasks = [load_preset(name, "train", limit=8) for name in ("digit_classification", "table_species")]
    biases = {}
    for rho in (0.0, 0.5):
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute",
                                                                                   tag_balance="bias")}), tasks, tok)
        config = TrainConfig(steps=1, batch_size=4, progress=False, tensorboard=False, sam_rho=rho, **settings)
        with Trainer(model, tasks, config, output_dir=os.path.join(out_dir, f"run{rho}"), overwrite=True) as trainer:
            trainer.train_step(1)
        biases.update({f"{rho}/{name}": b.clone() for name, b in model.named_buffers()
                       if name.endswith("balance_bias")})
    return biases, {}


def _scenario_unsharded_copy_rng(rank: int, out_dir: str):
    """Whether ``unsharded_copy`` of an FSDP model draws from the global torch RNG."""
    from moe_gen.fsdp import shard_dense, unsharded_copy

    model, _ = _debug_setup()
    shard_dense(model)
    torch.manual_seed(123)
    expected = torch.rand(1).item()
    torch.manual_seed(123)
    unsharded_copy(model)
    return {}, {"rng_untouched": torch.rand(1).item() == expected}


def _scenario_step_record(rank: int, out_dir: str, names: tuple, settings: dict):
    """One ``Trainer.train_step`` on ``names``: its log record."""
    from moe_gen.trainer import TrainConfig, Trainer

    model, tasks = _trainer_tasks(names)
    config = TrainConfig(**{"steps": 2, "batch_size": 4, "progress": False, "tensorboard": False, **settings})
    with Trainer(model, tasks, config, output_dir=os.path.join(out_dir, "run"), overwrite=True) as trainer:
        record = trainer.train_step(1)
    return {}, {key: record[key] for key in ("loss", "task_loss", "modality_share")}


def _scenario_checkpoint_write_fails(rank: int, out_dir: str, settings: dict, where: str):
    """A ``Trainer`` of 2 steps checkpointing every step, one write of step 2's checkpoint failing on
    one process (``where``: rank 0's ``makedirs`` of its folder, rank 0's ``model-dense`` file, rank 1's
    first ``model-experts`` file): the fit summary (or error) and the checkpoint folder's entries."""
    from moe_gen import distributed
    from moe_gen.trainer import TrainConfig, Trainer

    failing = {"makedirs": (0, "step-0000002.partial"), "dense": (0, "model-dense.safetensors"),
               "experts": (1, ".safetensors")}[where]
    state = {"failed": False}

    def fail_once(path: str) -> None:
        if rank == failing[0] and "step-0000002" in path and path.endswith(failing[1]) and not state["failed"]:
            state["failed"] = True
            raise OSError(28, f"No space left on device (simulated, rank {rank})")

    real_write, real_makedirs = distributed._write_atomic, os.makedirs

    def write(path, tensors, metadata):
        fail_once(path)
        real_write(path, tensors, metadata)

    def makedirs(path, *args, **kwargs):
        fail_once(str(path))
        real_makedirs(path, *args, **kwargs)

    if where == "makedirs":
        os.makedirs = makedirs  # this spawned process's own os module
    else:
        distributed._write_atomic = write
    model, tasks = _trainer_tasks(("digit_classification",))
    config = TrainConfig(steps=2, batch_size=2, checkpoint_every=1, progress=False, tensorboard=False, **settings)
    run = os.path.join(out_dir, "run")
    try:
        summary = Trainer(model, tasks, config, output_dir=run, overwrite=True).fit()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {}, {"error": f"{type(exc).__name__}: {exc}"}
    return {}, {"error": None, "failed": state["failed"], "step": summary["step"],
                "checkpoint_step": summary["checkpoint_step"], "failed_checkpoints": summary["failed_checkpoints"],
                "entries": sorted(os.listdir(os.path.join(run, "checkpoints")))}


def _scenario_wrapper_keys_with_plan(rank: int, out_dir: str):
    """save_shards given the plan and a wrapper's tensors (keys ``model.ffn.experts.w_in``, as
    LossModule and DDP hold them), then load_shards of the files the helper wrote from them before
    the fourteenth audit (rank 0's expert slices as dense tensors): each one's error (None: accepted)."""
    from moe_gen.distributed import FORMAT

    model = _ckpt_model()
    plan = shard_experts(model, 2)
    wrapped = _ckpt_tensors(nn.ModuleDict({"model": model}))
    errors = {}
    try:
        save_shards(os.path.join(out_dir, "saved"), "model", wrapped, plan)
        errors["save_shards"] = None
    except ValueError as exc:
        errors["save_shards"] = str(exc)
    old = os.path.join(out_dir, "old")
    if rank == 0:
        from safetensors.torch import save_file

        os.makedirs(old)
        save_file({k: v.contiguous() for k, v in wrapped.items()}, os.path.join(old, "model-dense.safetensors"),
                  metadata={"format": FORMAT, "ep_size": "2", "experts": "[]"})
    barrier()
    try:
        load_shards(old, "model", plan)
        errors["load_shards"] = None
    except ValueError as exc:
        errors["load_shards"] = str(exc)
    return {}, {"errors": errors}


SCENARIOS = {
    "sam_balance": _scenario_sam_balance,
    "unsharded_copy_rng": _scenario_unsharded_copy_rng,
    "step_record": _scenario_step_record,
    "trainer": _scenario_trainer,
    "train_step": _scenario_train_step,
    "fsdp_step": _scenario_fsdp_step,
    "ddp_step": _scenario_ddp_step,
    "fsdp_bf16": _scenario_fsdp_bf16,
    "fsdp_bf16_struct_ids": _scenario_fsdp_bf16_struct_ids,
    "replicas": _scenario_replicas,
    "uneven": _scenario_uneven,
    "failure": _scenario_failure,
    "release": _scenario_release,
    "release_fsdp": _scenario_release_fsdp,
    "checkpoint": _scenario_checkpoint,
    "wrapper_plan": _scenario_wrapper_plan,
    "save_pretrained_sharded": _scenario_save_pretrained_sharded,
    "without_local_rank": _scenario_without_local_rank,
    "analyze_sharded": _scenario_analyze_sharded,
    "checkpoint_write_fails": _scenario_checkpoint_write_fails,
    "wrapper_keys_with_plan": _scenario_wrapper_keys_with_plan,
}
