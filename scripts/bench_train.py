"""Training benchmark: tokens/s, memory per process and where a step's time goes, for the tiny
generalist on 1 process and on 2 processes: replicated data parallelism, FSDP2 (dense parameters
sharded), activation checkpointing, expert parallelism over 2 processes, and FSDP2 with it.

Usage:
    python scripts/bench_train.py                       # tiny flavour, token routing, 10 timed steps
    python scripts/bench_train.py --steps 5 --flavour debug --router attribute

Each configuration trains the same task mixture (8 built-in tasks, ``--batch-size`` samples per
process per step) with the ``Trainer``. Time shares come from timers around the library's own
functions (exclusive of nested timed calls): data (sampling, encoding, collation), routing (router
and auxiliary losses), dispatch (ordering tokens by expert and combining; with expert parallelism
also the two all-to-all exchanges), experts (the expert FFNs), attention, other forward work
(embeddings, norms, heads, losses), backward (all of it: autograd does not attribute it to
modules), and sync + clip + optimizer. Forward parts are forward only. With DDP (``replicate`` on
2 processes) the gradient all-reduce and with FSDP2 the reduce-scatter run inside backward
(overlapped with it); FSDP2's parameter all-gathers run inside the forward parts. Memory per process: the bytes
of parameters, gradients and AdamW state it holds
(exact; FSDP shards count their local part) and its peak resident set size (every configuration
runs in fresh processes; RSS includes the Python and torch runtime). Prints tables and writes JSON
(--out, default bench_results/train.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

TASKS = ["digit_classification", "spoken_word_classification", "motion_classification", "table_species",
         "video_classification", "visual_grounding", "doc_topic", "text_to_speech"]
PARTS = ["data", "routing", "dispatch", "experts", "attention", "other forward", "backward", "sync+clip+optim"]


class Timers:
    """Exclusive wall time per category: a timed call nested in another is not counted twice, and
    whatever runs inside backward (the forward that activation checkpointing recomputes there)
    counts as backward, so the forward parts are forward only."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self._stack: list[float] = []
        self._in_backward = 0

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            if self._in_backward and category != "backward":
                return fn(*args, **kwargs)
            self._in_backward += category == "backward"
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self._in_backward -= category == "backward"
                nested = self._stack.pop()
                self.total[category] += elapsed - nested
                if self._stack:
                    self._stack[-1] += elapsed
        return timed


def instrument(timers: Timers) -> None:
    """Wraps the functions whose time is reported (in this process only)."""
    from moe_gen import objectives
    from moe_gen.experts import dispatch, experts
    from moe_gen.experts.parallel import ExpertParallel
    from moe_gen.model.transformer import Attention
    from moe_gen.routing.router import Router
    from moe_gen.trainer import sampling, trainer

    patches = [
        (sampling.TaskSampler, "next_batch", "data"),
        (Router, "forward", "routing"),
        (dispatch.TorchDispatch, "dispatch", "dispatch"),
        (dispatch.TorchDispatch, "combine", "dispatch"),
        (ExpertParallel, "dispatch", "dispatch"),
        (ExpertParallel, "combine", "dispatch"),
        (experts.StackedExperts, "forward_sorted", "experts"),
        (experts.LinearExperts, "forward_sorted", "experts"),
        (Attention, "forward", "attention"),
        (torch.Tensor, "backward", "backward"),
        (trainer.Trainer, "_clip", "sync+clip+optim"),
        (torch.optim.AdamW, "step", "sync+clip+optim"),
    ]
    for owner, name, category in patches:
        setattr(owner, name, timers.wrap(category, getattr(owner, name)))
    for owner in (objectives.Objective, objectives.MaskedObjective):  # collating (and masking) a batch
        owner.prepare = timers.wrap("data", owner.prepare)
    Router.losses = timers.wrap("routing", Router.losses)


def _state_bytes(trainer) -> int:
    """Bytes this process holds of parameters, gradients and AdamW state (FSDP shards: the local
    part). A trainable parameter's gradient counts as its size: the step ends with
    ``zero_grad(set_to_none=True)``, so reading ``p.grad`` after it counted none (until
    2026-12-05, eighth session, when the column was parameters + AdamW only)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in trainer.model.parameters():
        total += local(p).numel() * p.element_size() * (2 if p.requires_grad else 1)
    for state in trainer.optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args, rank: int = 0, world: int = 1, expert_parallel: int = 1, sharding: str = "replicate",
        checkpointing: bool = False) -> dict:
    """Builds the model and trainer, times ``args.steps`` steps after warm-up; returns the numbers."""
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset
    from moe_gen.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    tasks = [load_preset(n, "train") for n in TASKS]
    model = GeneralistModel.build(flavour(args.flavour, moe={"router": RouterConfig(strategy=args.router)}), tasks,
                                  Tokenizer.default())
    timers = Timers()
    instrument(timers)
    config = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, progress=False,
                         tensorboard=False, expert_parallel=expert_parallel, warmup_steps=1, sharding=sharding,
                         fsdp_unit=args.fsdp_unit,
                         activation_checkpointing=checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, tasks, config, output_dir=tmp)
        for step in range(1, args.warmup + 1):
            trainer.train_step(step)
        timers.total.clear()
        times, positions = [], 0
        for step in range(args.warmup + 1, args.warmup + args.steps + 1):
            start = time.perf_counter()
            record = trainer.train_step(step)
            times.append(time.perf_counter() - start)
            positions += record["tokens_per_s"] * record["step_time"]  # all processes' positions
        state = _state_bytes(trainer)
    total = sum(times)
    shares = {part: timers.total.get(part, 0.0) / total for part in PARTS if part != "other forward"}
    shares["other forward"] = max(0.0, 1.0 - sum(shares.values()))
    return {"processes": world, "expert_parallel": expert_parallel, "sharding": sharding,
            "activation_checkpointing": checkpointing, "threads": torch.get_num_threads(),
            "tokens_per_s": positions / total, "step_s_median": statistics.median(times),
            "state_mb": state / 2**20, "peak_rss_mb": _peak_rss_bytes() / 2**20,
            "shares": {p: shares[p] for p in PARTS}}


def _worker(rank: int, world: int, port: int, args, setting: tuple, out: str) -> None:
    expert_parallel, sharding, checkpointing = setting
    torch.set_num_threads(args.threads_per_process if world > 1 else args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        from moe_gen import distributed

        distributed.init_distributed(backend="gloo", timeout_s=300)
    result = run(args, rank, world, expert_parallel, sharding, checkpointing)
    with open(f"{out}.{rank}", "w") as f:  # every process reports its own memory
        json.dump(result, f)
    if world > 1:
        torch.distributed.destroy_process_group()


def run_processes(args, world: int, expert_parallel: int, sharding: str, checkpointing: bool) -> dict:
    """One configuration in fresh processes (so peak memory is this configuration's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        torch.multiprocessing.spawn(_worker, args=(world, port, args, (expert_parallel, sharding, checkpointing),
                                                   out), nprocs=world)
        results = []
        for rank in range(world):
            with open(f"{out}.{rank}") as f:
                results.append(json.load(f))
    result = results[0]
    result["state_mb_per_process"] = [r["state_mb"] for r in results]
    result["peak_rss_mb_per_process"] = [r["peak_rss_mb"] for r in results]
    return result


# label → (processes, expert parallel size, sharding, activation checkpointing)
CONFIGS = {
    "1": ("1 process", 1, 1, "replicate", False),
    "1+ac": ("1 process, activation checkpointing", 1, 1, "replicate", True),
    "dp": ("2 processes, data parallel (replicate)", 2, 1, "replicate", False),
    "hsdp": ("2 processes, FSDP2 replicated (shard 1)", 2, 1, "hsdp", False),
    "fsdp": ("2 processes, FSDP2", 2, 1, "fsdp", False),
    "fsdp+ac": ("2 processes, FSDP2 + activation ckpt", 2, 1, "fsdp", True),
    "ep2": ("2 processes, expert parallel 2", 2, 2, "replicate", False),
    "fsdp+ep2": ("2 processes, FSDP2 + expert parallel 2", 2, 2, "fsdp", False),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavour", default="tiny")
    parser.add_argument("--router", default="token")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per process per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process runs")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--fsdp-unit", default="block", choices=["block", "stack"],
                        help="TrainConfig.fsdp_unit of the FSDP2 runs")
    parser.add_argument("--out", default="bench_results/train.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    print(f"{args.flavour} flavour, {args.router} routing, {args.batch_size} samples per process per step, "
          f"{args.steps} timed steps, FSDP2 units: {args.fsdp_unit}")
    for key in args.configs:
        label, world, ep, sharding, checkpointing = CONFIGS[key]
        result = run_processes(args, world, ep, sharding, checkpointing)
        result["label"], result["config"] = label, key
        rows.append(result)
        print(f"  {label:<40} {result['tokens_per_s']:>8.0f} tok/s  median step {result['step_s_median'] * 1e3:.0f} ms "
              f"({result['threads']} thread(s) per process); params+grads+AdamW per process "
              f"{max(result['state_mb_per_process']):.1f} MB, peak RSS {max(result['peak_rss_mb_per_process']):.0f} MB",
              flush=True)
    print("\nshare of step time")
    print(f"{'':<40}" + "".join(f"{p:>17}" for p in PARTS))
    for r in rows:
        print(f"{r['label']:<40}" + "".join(f"{100 * r['shares'][p]:>16.1f}%" for p in PARTS))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "train", "flavour": args.flavour, "router": args.router, "tasks": TASKS,
                   "fsdp_unit": args.fsdp_unit,
                   "batch_size_per_process": args.batch_size, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
