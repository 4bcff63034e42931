"""Activation checkpointing: peak memory and time of one training step, with and without.

Usage:
    python scripts/bench_checkpointing.py                    # small flavour, 8 built-in tasks
    python scripts/bench_checkpointing.py --flavour tiny --per-task 4 --runs 3

One step = forward + backward of the generative objective on a fixed mixed batch (``--per-task``
rows of each task of ``bench_train.TASKS``), in one process. Peak memory is what the CPU
allocator holds above its level before the step (the profiler's memory events, as in
``bench_moe_layer.py``); "activations" is what the forward leaves allocated for backward (measured
after the forward with its graph held; until 2026-12-05, eighth session, the step's peak minus
every gradient's bytes, which undercounted the plain step: its peak comes early in backward, when
few gradients exist). Time is the median of ``--runs`` steps. The
loss and every gradient are compared between the two (checkpointing must not change them).
Prints a table and writes JSON (--out, default bench_results/checkpointing.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from bench_moe_layer import allocator_trace, peak_bytes
from bench_train import TASKS


def measure(model, batch, runs: int) -> dict:
    from moe_gen.objectives import GenerativeObjective

    objective = GenerativeObjective(model)

    def step():
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        objective(batch)["loss"].backward()

    step()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    loss = objective(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    peak = peak_bytes(step, model, torch.zeros(1))
    return {"seconds": statistics.median(times), "peak_mb": peak / 2**20,
            "activation_mb": _kept_for_backward(model, objective, batch) / 2**20, "loss": loss.item(), "grads": grads}


def _kept_for_backward(model, objective, batch) -> int:
    """Bytes a forward leaves allocated while its graph is held: the activations backward reads."""
    model.zero_grad(set_to_none=True)
    held = []

    def forward():
        torch.manual_seed(0)
        held.append(objective(batch)["loss"])

    memory, start = allocator_trace(forward)
    return memory[-1]["args"]["Total Allocated"] - start if memory else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavour", default="small")
    parser.add_argument("--router", default="attribute")
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results/checkpointing.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, collate, load_preset

    tok = Tokenizer.default()
    tasks = [load_preset(n, "train", limit=args.per_task) for n in TASKS]
    torch.manual_seed(0)
    config = flavour(args.flavour, moe={"router": RouterConfig(strategy=args.router)})
    model = GeneralistModel.build(config, tasks, tok).train()
    batch = collate([s for t in tasks for s in t.samples(tok)], tok, model.task_ids)
    positions = int((~batch.encoder.padding_mask).sum() + (~batch.decoder.padding_mask).sum())
    plain = measure(model, batch, args.runs)
    model.set_activation_checkpointing(True)
    recomputed = measure(model, batch, args.runs)
    worst = max(float((recomputed["grads"][n] - g).abs().max()) for n, g in plain["grads"].items())
    rows = []
    print(f"{args.flavour} flavour, {args.router} routing, batch of {len(batch.labels)} rows, {positions} positions")
    print(f"{'':<28}{'step ms':>10}{'peak MB':>10}{'activations MB':>16}")
    for label, r in (("without checkpointing", plain), ("activation checkpointing", recomputed)):
        rows.append({"label": label, **{k: v for k, v in r.items() if k != "grads"}})
        print(f"{label:<28}{r['seconds'] * 1e3:>10.0f}{r['peak_mb']:>10.1f}{r['activation_mb']:>16.1f}")
    saving = 1 - recomputed["activation_mb"] / plain["activation_mb"]
    print(f"activations {100 * saving:.0f}% lower, step {recomputed['seconds'] / plain['seconds']:.2f}x the time; "
          f"loss difference {abs(recomputed['loss'] - plain['loss']):.1e}, largest gradient difference {worst:.1e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "checkpointing", "flavour": args.flavour, "router": args.router,
                   "positions": positions, "rows": rows, "activation_saving": saving,
                   "max_grad_difference": worst}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
