"""Expert parallelism on gloo processes (127.0.0.1): one training step equals the single-process
step on the mean of the ranks' losses (EP 2 on 2 ranks; EP 2 × DP 2 on 4; plain DP on 2; DDP with
and without EP; FSDP2); uneven and empty token counts neither hang nor change the outputs; a failing
rank stops its peer with an error; expert-shard checkpoints load across layouts.

Each multi-process test spawns fresh processes that run one scenario function of this module and
write their results to a safetensors file; the test compares them with a single process holding
every expert. Every launch is bounded by ``LAUNCH_LIMIT_S`` (a hang fails the test, it does not
stall the suite).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
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
    world_info,
)
from moe_gen.experts.parallel import expert_plan, shard_experts

pytestmark = pytest.mark.distributed

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


def _debug_setup(mixed: bool = False):
    """The debug model (seed 0) and two batches of different sizes, one per rank. ``mixed``: a
    model of three tasks with an adapter each, rank 0 holding image rows only, rank 1 table rows
    only, and the motion adapter used by neither."""
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, collate, load_preset

    tok = Tokenizer.default()
    names = ("digit_classification", "table_species", "motion_classification") if mixed else ("digit_classification",)
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


def _scenario_ddp_step(rank: int, out_dir: str, ep_size: int = 2, mixed: bool = False, accumulate: bool = False):
    """The step with the replicated parameters under DDP (``replicate``), experts sharded over
    ``ep_size`` ranks. ``accumulate``: two backward passes, the first under ``no_sync`` on half of
    this rank's loss, the second (synchronised) on half of the other rank's, so that each rank's
    loss is the mean of both and parameters one rank uses only in the unsynchronised pass (mixed:
    its adapter) still have their gradients averaged."""
    from moe_gen.objectives import GenerativeObjective

    model, batches = _debug_setup(mixed)
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
    return full_tensors({name: p.detach() for name, p in model.named_parameters()}), {"error": None,
                                                                                      "loss": summary["loss"]}


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


SCENARIOS = {
    "unsharded_copy_rng": _scenario_unsharded_copy_rng,
    "step_record": _scenario_step_record,
    "trainer": _scenario_trainer,
    "train_step": _scenario_train_step,
    "fsdp_step": _scenario_fsdp_step,
    "ddp_step": _scenario_ddp_step,
    "fsdp_bf16": _scenario_fsdp_bf16,
    "replicas": _scenario_replicas,
    "uneven": _scenario_uneven,
    "failure": _scenario_failure,
    "checkpoint": _scenario_checkpoint,
}


# ---- tests ---------------------------------------------------------------------------------------


def _single_process_step(mixed: bool = False):
    """The reference: one process, every expert, one step on the mean of the two ranks' losses.
    Returns the updated model, the two losses, the norm before clipping and the clipped gradients."""
    from moe_gen.objectives import GenerativeObjective

    model, batches = _debug_setup(mixed)
    objective = GenerativeObjective(model)
    losses = [objective(batch)["loss"] for batch in batches]
    torch.stack(losses).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    _optimizer(model).step()
    return model, losses, norm, grads


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_training_step_with_expert_parallelism_equals_single_process_step(tmp_path, sharding):
    (r0, info0), (r1, info1) = Launch("train_step", tmp_path, sharding).results()

    model, losses, norm, grads = _single_process_step()

    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    shards = [info0["shards"], info1["shards"]]
    assert shards[0] and set(shards[0]) == set(shards[1])
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}  # same params have grads
    for name, p in model.named_parameters():
        if name in shards[0]:  # rank r holds experts [offset, offset + count): gather the full tensor
            assert [s[name] for s in shards] == [[0, 2], [2, 2]]
            weight, grad = torch.cat([r0[name], r1[name]]), torch.cat([r0[f"grad/{name}"], r1[f"grad/{name}"]])
        else:
            weight, grad = r0[name], r0.get(f"grad/{name}")
            assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        if grad is not None:  # synchronised and clipped gradients
            torch.testing.assert_close(grad, grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(weight, p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


@pytest.mark.parametrize("ep_size, mixed, accumulate", [(2, False, False), (1, True, True), (2, True, True)],
                         ids=["ep2", "ep1-ranks-with-other-modalities-accumulated", "ep2-mixed-accumulated"])
def test_training_step_with_ddp_equals_single_process_step(tmp_path, ep_size, mixed, accumulate):
    """DDP (``replicate``) averages the replicated gradients in backward, with or without expert
    parallelism, also across a ``no_sync`` pass whose parameters the synchronised pass of this rank
    does not use: the same step as one process."""
    (r0, info0), (r1, info1) = Launch("ddp_step", tmp_path, ep_size, mixed, accumulate).results()

    model, losses, norm, grads = _single_process_step(mixed)

    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}  # same params have grads
    if mixed:
        assert not any(n.startswith("grad/adapters.motion_mlp") for n in r0)  # used by no rank: no gradient
    sharded = set(info0["shards"]) if ep_size > 1 else set()
    for name, p in model.named_parameters():
        if name in sharded:  # rank r holds experts [offset, offset + count): gather the full tensor
            weight, grad = torch.cat([r0[name], r1[name]]), torch.cat([r0[f"grad/{name}"], r1[f"grad/{name}"]])
        else:
            weight, grad = r0[name], r0.get(f"grad/{name}")
            assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        if grad is not None:
            torch.testing.assert_close(grad, grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(weight, p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


@pytest.mark.parametrize("shard_size, unit, mixed", [(None, "block", False), (1, "block", False),
                                                   (None, "stack", False), (None, "block", True),
                                                   (1, "block", True)],
                         ids=["fsdp", "hsdp-replicated", "fsdp-per-stack", "fsdp-ranks-with-other-modalities",
                              "hsdp-ranks-with-other-modalities"])
def test_training_step_with_fsdp_equals_single_process_step(tmp_path, shard_size, unit, mixed):
    """Also with ranks whose batches use different adapters (image rows on one, table rows on the
    other) and an adapter no rank uses: sharded adapters, the same step as one process."""
    (r0, info0), (r1, info1) = Launch("fsdp_step", tmp_path, shard_size, unit, mixed).results()

    model, losses, norm, grads = _single_process_step(mixed)

    assert info0["sharded"] and info1["sharded"]
    assert info0["loss"] == pytest.approx(losses[0].item(), abs=1e-5)
    assert info1["loss"] == pytest.approx(losses[1].item(), abs=1e-5)
    assert info0["norm"] == pytest.approx(float(norm), rel=1e-5) and info1["norm"] == info0["norm"]
    assert float(norm) > MAX_NORM  # clipping was active
    full = sum(p.numel() for name, p in model.named_parameters() if name in info0["shard_sizes"])
    held = sum(info0["shard_sizes"].values())

    # scalars and the small parts only some objectives use (heads) stay whole on every process;
    # adapters are sharded
    replicated = ("frame_heads.", "stop_heads.", "contrastive_image.", "contrastive_text.")
    assert set(info0["shard_sizes"]) == {n for n, p in model.named_parameters()
                                         if p.dim() > 0 and not n.startswith(replicated)}
    if mixed:
        assert {n.split(".")[1] for n in info0["shard_sizes"] if n.startswith("adapters.")} == {
            "image_patch", "struct_cells", "motion_mlp"}
        assert not any(n.startswith("grad/adapters.motion_mlp") for n in r0)  # used by no rank: no gradient
    if shard_size == 1:  # replicated by FSDP2: each process holds every parameter whole
        assert held == full == sum(info1["shard_sizes"].values())
    else:
        assert held <= 0.55 * full and held + sum(info1["shard_sizes"].values()) == full
    assert {n for n in r0 if n.startswith("grad/")} == {f"grad/{n}" for n in grads}
    for name, p in model.named_parameters():
        assert torch.equal(r0[name], r1[name])
        if f"grad/{name}" in r0:
            torch.testing.assert_close(r0[f"grad/{name}"], grads[name], atol=1e-7, rtol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(r0[name], p.detach(), atol=1e-5, rtol=0, msg=f"updated {name}")


def test_fsdp_with_bf16_parameters_keeps_fp32_state_and_a_close_loss(tmp_path):
    (_, info0), (_, info1) = Launch("fsdp_bf16", tmp_path).results()
    _, losses, _, _ = _single_process_step()
    assert info0["dtypes"] == info1["dtypes"] == ["torch.float32"]  # parameters and gradients
    assert info0["moments"] == ["torch.float32"]
    for info, loss in zip((info0, info1), losses):
        assert info["loss"] == pytest.approx(loss.item(), rel=0.02)


@pytest.mark.parametrize("world, ep_size", [(4, 2), (2, 1)], ids=["ep2-x-dp2", "dp2"])
def test_replicas_of_a_shard_average_expert_gradients(tmp_path, world, ep_size):
    """World > ep_size: ranks holding the same experts sum their expert gradients (÷ world), so
    the step still equals one process on the mean of all ranks' losses."""
    results = Launch("replicas", tmp_path, ep_size, world=world).results()

    model = _replica_model()
    torch.stack([_replica_loss(model, rank) for rank in range(world)]).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), REPLICA_MAX_NORM)
    _optimizer(model).step()
    assert float(norm) > REPLICA_MAX_NORM
    count = 4 // ep_size
    for rank, (tensors, info) in enumerate(results):
        assert info["groups"] == [ep_size, world // ep_size, rank % ep_size, rank // ep_size]
        assert info["norm"] == pytest.approx(float(norm), rel=1e-5)
        for name, p in model.named_parameters():
            expected = p.detach()
            if name in info["shards"]:
                assert info["shards"][name] == [rank % ep_size * count, count]
                expected = _expert_slice(expected, *info["shards"][name])
            torch.testing.assert_close(tensors[name], expected, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")


def test_uneven_and_empty_token_counts_match_the_single_process_layer(tmp_path):
    launch = Launch("uneven", tmp_path)
    (r0, info0), (r1, info1) = launch.results()
    ranks = [r0, r1]
    assert "cannot run with expert parallelism" in info0["merged_error"]
    for kind in KINDS:
        assert [info0[kind], info1[kind]] == [0, 2]
        reference = _routed_layer(kind)
        for round_ in range(ROUNDS):
            expert_grads = {}
            for rank in range(WORLD):
                reference.zero_grad(set_to_none=True)
                y, x_grad = _run_round(reference, round_, rank)
                where = f"{kind}, round {round_}, rank {rank}"
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/y"], y, atol=1e-5, rtol=1e-5, msg=where)
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/x_grad"], x_grad, atol=1e-5, rtol=1e-5,
                                           msg=where)
                torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/router_grad"], reference.router.weight.grad,
                                           atol=1e-5, rtol=1e-5, msg=where)
                for name, p in reference.experts.named_parameters():
                    grad = torch.zeros_like(p) if p.grad is None else p.grad
                    expert_grads[name] = expert_grads.get(name, 0) + grad
            # An expert's gradient sums the gradients of every rank's tokens it computed.
            for rank in range(WORLD):
                for name, grad in expert_grads.items():
                    torch.testing.assert_close(ranks[rank][f"{kind}/{round_}/experts.{name}"],
                                               _expert_slice(grad, 2 * rank, 2), atol=1e-5, rtol=1e-5,
                                               msg=f"{kind}, round {round_}, rank {rank}, expert grad {name}")
        with torch.no_grad():
            for rank in range(WORLD):
                x, mask = _uneven_inputs(0, rank)
                torch.testing.assert_close(ranks[rank][f"{kind}/no_grad/y"], reference(x, padding_mask=mask).output)


@pytest.mark.parametrize("sharding", ["replicate", "ddp", "fsdp"], ids=["expert-parallel", "ddp", "fsdp"])
def test_a_failing_rank_stops_its_peer_with_an_error(tmp_path, sharding):
    launch = Launch("failure", tmp_path, sharding)
    assert not launch.hung, f"ranks {launch.hung} hung until killed after {LAUNCH_LIMIT_S}s"
    assert launch.exitcodes == [1, 1], launch.errors
    assert "rank 1 fails on purpose" in launch.errors[1]
    assert "fails on purpose" not in launch.errors[0] and "Error" in launch.errors[0], launch.errors[0]
    assert launch.seconds < LAUNCH_LIMIT_S


def test_expert_shards_load_across_layouts(tmp_path):
    full_model = _ckpt_model()
    full = _ckpt_tensors(full_model)
    written = save_shards(str(tmp_path / "single"), "model", full, full_model)
    assert sorted(os.path.basename(p) for p in written) == [
        "model-dense.safetensors", "model-experts-0000-0002.safetensors", "model-experts-0000-0004.safetensors"]

    (r0, info0), (r1, info1) = Launch("checkpoint", tmp_path).results()
    assert info0["round_trip_equal"] and info1["round_trip_equal"]
    # Rank 0 writes the dense file and its shards; rank 1 only its shards.
    assert info0["written"] == ["model-dense.safetensors", "model-experts-0000-0001.safetensors",
                                "model-experts-0000-0002.safetensors"]
    assert info1["written"] == ["model-experts-0001-0001.safetensors", "model-experts-0002-0002.safetensors"]
    assert not [f for f in os.listdir(tmp_path / "ep2") if f.startswith(".tmp")]

    # Written on 1 process, read with EP 2: each rank gets its slice.
    for rank, (tensors, info) in enumerate([(r0, info0), (r1, info1)]):
        assert sorted(tensors) == sorted(f"single/{k}" for k in full)
        for key, value in full.items():
            shard = info["shards"].get(key.split("::")[0])
            expected = value if shard is None or value.dim() == 0 else _expert_slice(value, *shard)
            assert torch.equal(tensors[f"single/{key}"], expected), (rank, key)

    # Written with EP 2, read on 1 process: the full tensors, bit for bit.
    back = load_shards(str(tmp_path / "ep2"), "model", full_model)
    assert sorted(back) == sorted(full)
    for key, value in full.items():
        assert torch.equal(back[key], value), key
    full_model.load_state_dict({k: v for k, v in back.items() if "::" not in k})

    # A missing shard file is named, with the experts it held.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ep2", broken)
    os.remove(broken / "model-experts-0002-0002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-experts-0002-0002.*experts 2\.\.3 of the 4-expert layers"):
        load_shards(str(broken), "model", full_model)
    with pytest.raises(FileNotFoundError, match="optimizer-dense.safetensors is missing"):
        load_shards(str(broken), "optimizer", full_model)


# ---- single-process checks (no launch) ------------------------------------------------------------


def test_single_process_defaults_and_clear_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None) and world_info() == info

    model = _ckpt_model()
    with pytest.raises(ValueError, match=r"'ffn' has E=4 experts, which is not divisible by ep_size P=3"):
        shard_experts(model, 3)
    with pytest.raises(ValueError, match="must divide the number of processes, which is 1"):
        shard_experts(model, 2)
    merged = nn.ModuleDict({"moe": MoE(MoEConfig(d_model=D, d_hidden=8, num_experts=4, router="modality",
                                                 backend="merged"))})
    with pytest.raises(ValueError, match="'moe' uses backend 'merged'.*cannot run with expert parallelism"):
        shard_experts(merged, 2)

    # ep_size 1 in one process: nothing changes, and the layout is the unsharded one.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = shard_experts(model, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plan.layers == expert_plan(_ckpt_model()).layers
    assert plan.expert_params["ffn.experts.w_in"].count == 4 and "head.weight" not in plan.expert_params
    # Clipping without processes equals torch's.
    x = torch.randn(5, D)
    model["head"](model["proj"](model["ffn"](x).output).output).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = clip_grad_norm_(model, 0.1, plan)
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g) for g in grads]))), rel=1e-5)
    sync_gradients(model, plan)  # a no-op in one process


@pytest.mark.parametrize("settings", [{"expert_parallel": 2}, {"sharding": "fsdp"}], ids=["ep", "fsdp"])
def test_tasks_of_several_objectives_are_refused_where_the_processes_collectives_must_pair(tmp_path, settings):
    """Each process runs the objectives its own batch holds: with a contrastive and a generative
    task, expert parallelism crashed (gloo: collective mismatch) and FSDP hung until the timeout."""
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification", "image_text_retrieval"),
                                    settings).results()
    for info in (info0, info1):
        assert "tasks of several objectives (contrastive, generative) cannot train" in info["error"]


def test_every_task_in_every_batch_trains_several_objectives_under_expert_parallelism(tmp_path):
    """With mixing="all" every process runs every objective each micro-batch: allowed."""
    (r0, info0), (r1, info1) = Launch("trainer", tmp_path, ("digit_classification", "image_text_retrieval"),
                                      {"expert_parallel": 2, "mixing": "all"}).results()
    assert info0["error"] is None and info1["error"] is None
    assert all(torch.equal(r0[name], r1[name]) for name in r0 if ".experts." not in name)


def test_the_logged_loss_is_the_processes_mean(tmp_path):
    """Each process logged its own batch's loss (rank 0's in train.jsonl), not the step's."""
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification", "table_species"),
                                    {"batch_tasks": "single"}).results()
    assert info0["loss"] == info1["loss"]


def test_an_unsharded_copy_draws_nothing_from_the_runs_random_numbers(tmp_path):
    """Its throwaway initialisation consumed the global RNG, so an FSDP run's later draws depended
    on whether an evaluation (which copies) ran before."""
    (_, info0), (_, info1) = Launch("unsharded_copy_rng", tmp_path).results()
    assert info0["rng_untouched"] and info1["rng_untouched"]


def test_every_logged_part_is_merged_over_the_processes(tmp_path):
    """Only the loss was the processes' mean: with one task per batch, each process logged its own
    task's loss and modality share, so train.jsonl (rank 0's) showed one task of the two."""
    (_, info0), (_, info1) = Launch("step_record", tmp_path, ("digit_classification", "table_species"),
                                    {"batch_tasks": "single", "seed": 0}).results()  # ranks draw different tasks
    assert info0 == info1
    assert set(info0["task_loss"]) == {"digit_classification", "table_species"}
    assert set(info0["modality_share"]) >= {"IMAGE", "STRUCT"}
    assert sum(info0["modality_share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_only_experts_training_under_expert_parallelism_needs_no_ddp(tmp_path):
    """trainable="experts" with expert_parallel=2 stopped at start with DDP's "not needed when a
    module doesn't have any parameter that requires a gradient"."""
    (r0, info0), (r1, info1) = Launch("trainer", tmp_path, ("digit_classification",),
                                      {"expert_parallel": 2, "trainable": "experts"}).results()
    assert info0["error"] is None and info1["error"] is None
    assert all(torch.equal(r0[name], r1[name]) for name in r0 if ".experts." not in name)


def test_resuming_with_more_processes_than_wrote_the_checkpoint_is_refused_on_every_process(tmp_path):
    """The new process refused and the old one went on into the step, then died on a closed
    connection (or waited for the timeout)."""
    model, tasks = _trainer_tasks(("digit_classification",))
    from moe_gen.trainer import TrainConfig, Trainer

    Trainer(model, tasks, TrainConfig(steps=2, batch_size=4, progress=False, tensorboard=False),
            output_dir=str(tmp_path / "run")).fit()
    (_, info0), (_, info1) = Launch("trainer", tmp_path, ("digit_classification",), {"steps": 4},
                                    True).results()
    assert "has no state for process 1" in info1["error"]
    assert "has no state for process 1" in info0["error"] or "another process refused" in info0["error"]
