"""Cost of recording routing: evaluation time with and without a ``RoutingRecorder``.

Usage:
    python scripts/bench_analysis.py                         # tiny model, 5 tasks, 32 rows each
    python scripts/bench_analysis.py --flavour debug --rows 32 --repeats 9 --threads 1
    python scripts/bench_analysis.py --model runs/demo/model # a trained model instead of a fresh one

Two workloads, each timed with and without the recorder:
    forward    teacher-forced forward passes over the rows (batches of --batch-size), under no_grad
    generate   ``moe_gen.trainer.evaluation.evaluate`` (decoding with ``model.infer``: many small
               MoE calls, one per generated position, the recorder's worst case)

Runs are interleaved (with, without, without, with, ...) so drifts of this machine's speed hit
both alike; the median of --repeats runs is reported after one untimed warm-up of each (and the
overhead of the fastest runs, less sensitive to other processes on a shared machine). Results: a
table on stdout and JSON at --out (default bench_results/analysis.json). The target is an
overhead of at most 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from moe_gen.analysis import RoutingRecorder

DEFAULT_TASKS = ["digit_classification", "spoken_word_classification", "table_species", "motion_classification",
                 "table_to_text"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavour", default="tiny", help="model flavour of a fresh model (default tiny)")
    parser.add_argument("--model", help="a saved model directory instead of a fresh model")
    parser.add_argument("--tasks", nargs="+", help=f"preset tasks (default: {' '.join(DEFAULT_TASKS)}; with "
                        "--model, the model's own tasks that are presets)")
    parser.add_argument("--rows", type=int, default=32, help="test rows per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workloads", nargs="+", default=["forward", "generate"], choices=["forward", "generate"])
    parser.add_argument("--out", default="bench_results/analysis.json")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, collate, load_preset
    from moe_gen.trainer.evaluation import evaluate

    model = GeneralistModel.from_pretrained(args.model) if args.model else None
    if args.tasks is None:  # a saved model knows only its own tasks (the demo's are not the defaults)
        from moe_gen.registry import TASKS

        known = set(TASKS.list())
        args.tasks = [t for t in model.config.tasks if t in known] if model is not None else DEFAULT_TASKS
    from moe_gen.trainer.evaluation import spaced_indices

    splits = [load_preset(name, "test") for name in args.tasks]  # rows spread over each split: a prefix is
    tasks = [t.with_rows([t.data[i] for i in spaced_indices(len(t), min(args.rows, len(t)))])  # one class
             for t in splits]
    if model is None:
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour(args.flavour), tasks, Tokenizer.default())
    model.eval()
    tok = model.tokenizer
    batches = []
    for task in tasks:
        samples = list(task.samples(tok, training=False))
        batches += [collate(samples[i:i + args.batch_size], tok, model.task_ids)
                    for i in range(0, len(samples), args.batch_size)]

    def forward():
        with torch.no_grad():
            for batch in batches:
                model(batch)

    def generate():
        evaluate(model, tasks, batch_size=args.batch_size)

    workloads = {"forward": forward, "generate": generate}
    results = []
    for name in args.workloads:
        run = workloads[name]

        def timed(record: bool, run=run) -> float:
            start = time.perf_counter()
            if record:
                with RoutingRecorder(model):
                    run()
            else:
                run()
            return time.perf_counter() - start

        timed(False), timed(True)  # warm-up
        times = {False: [], True: []}
        for r in range(args.repeats):
            for record in ((True, False) if r % 2 else (False, True)):
                times[record].append(timed(record))
        with RoutingRecorder(model) as recorder:  # what one run records
            run()
        calls = sum(recorder.calls)
        base, rec = statistics.median(times[False]), statistics.median(times[True])
        best = min(times[True]) / min(times[False]) - 1.0
        results.append({"workload": name, "without_s": base, "with_s": rec, "overhead": rec / base - 1.0,
                        "overhead_of_fastest": best,
                        "moe_calls_per_run": calls, "per_call_us": (rec - base) / max(calls, 1) * 1e6,
                        "times_without": times[False], "times_with": times[True]})

    print(f"model: {args.model or args.flavour}, {len(model.config.tasks)} tasks, {args.rows} rows each, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'workload':<10} {'without (s)':>12} {'with (s)':>10} {'overhead':>9} {'(fastest)':>10} "
          f"{'MoE calls':>10} {'µs/call':>8}")
    for r in results:
        print(f"{r['workload']:<10} {r['without_s']:>12.4f} {r['with_s']:>10.4f} {r['overhead'] * 100:>8.1f}% "
              f"{r['overhead_of_fastest'] * 100:>9.1f}% {r['moe_calls_per_run']:>10} {r['per_call_us']:>8.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model or args.flavour, "tasks": args.tasks, "rows": args.rows,
                   "batch_size": args.batch_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                   "target_overhead": 0.10, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
