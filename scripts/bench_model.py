"""Model benchmark: training-step throughput and inference latency, dense vs MoE.

Usage:
    python scripts/bench_model.py                    # debug and tiny flavours
    python scripts/bench_model.py --flavours debug --steps 10

For each flavour: the dense model of equal active size (FFN hidden = k · expert hidden), MoE with
token routing, and MoE with attribute routing, on the same mixed batch of built-in tasks (images,
speech, motion, boxes, tables). Training: tokens (valid encoder + decoder positions) per second of
forward + backward + AdamW step, median over --steps. Inference: forward latency (eval, no grad)
for dense, attribute-MoE unmerged (`torch` backend) and attribute-MoE merged (`merge_for_inference`),
at each batch size of --inference-per-task (the per-layer cost of routing bookkeeping is fixed,
so its share shrinks as batches grow), and greedy generation latency (--generation-rows rows of
table_to_text, each answer held to exactly --generation-tokens tokens so that every model decodes
the same number of steps: untrained models of different weights would otherwise stop at different
lengths, and the comparison would time unequal work) of dense, attribute-MoE unmerged
(`infer(merged=False)`), the attribute-MoE's own `infer` (its tag-routed layers merged in place
for the call, the default) and the merged copy.
Variants are timed round-robin (one call of each per round); ratios to dense are the median (and
quartiles) of the per-round ratios. Every call gets new tags objects (see `fresh`). Prints
tables and writes JSON (--out, default bench_results/model.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import torch

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.moe import merge_for_inference
from moe_gen.objectives import GenerativeObjective
from moe_gen.runtime import keep_freed_memory
from moe_gen.tasks import Tokenizer, collate, load_preset

TASKS = ["digit_classification", "speech_recognition", "motion_classification", "visual_grounding",
         "table_to_text", "doc_topic"]
GENERATION_TASK = "table_to_text"  # free text: every answer can be held to the same length


def interleaved(functions: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed round-robin (one call of each per round) so
    that this machine's speed drifts spread evenly over them."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratios(times: dict[str, list[float]], reference: str, invert: bool = False) -> dict[str, tuple]:
    """Per variant: (median seconds, median, first and third quartile of the per-round ratio to
    ``reference``). Ratios of calls from the same round cancel the slow drifts of this machine
    better than a ratio of medians. ``invert``: reference / variant (throughput) instead of
    variant / reference (latency)."""
    out = {}
    for name, t in times.items():
        ratios = [(r / v) if invert else (v / r) for v, r in zip(t, times[reference])]
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        out[name] = (statistics.median(t), q2, q1, q3)
    return out


def fresh(batch):
    """The batch with new ``TokenTags`` objects (same tensors), as a new batch from the data loader
    would bring. A forward derives what it needs from the tags (``TagBatch``) anew each call and
    keeps nothing keyed by the tags object, so this changes no timing today; it keeps the benchmark
    honest should a cache keyed by object ever come back (a repeated batch object would then time
    the cache, not the work)."""
    return dataclasses.replace(
        batch,
        encoder=dataclasses.replace(batch.encoder, tags=dataclasses.replace(batch.encoder.tags)),
        decoder=dataclasses.replace(batch.decoder, tags=dataclasses.replace(batch.decoder.tags)),
    )


def generated_tokens(infer, task, rows, tokens: int) -> int:
    """Tokens the greedy answers of ``infer`` (a model's ``infer``, its options bound) to ``rows``
    hold, each held to exactly ``tokens`` (``min_length`` = ``max_new_tokens``); raises if any
    answer has another length, since the benchmark would then time unequal work."""
    answers = infer(task, rows, max_new_tokens=tokens, min_length=tokens)
    lengths = [len(a.tokens) for a in answers]
    if any(n != tokens for n in lengths):
        raise RuntimeError(f"generation answers have {sorted(set(lengths))} tokens, not {tokens} each")
    return sum(lengths)


def _time_generation(flavour_name: str, variants: dict, task, args) -> list[dict]:
    """Greedy generation latency of each variant on ``args.generation_rows`` rows of ``task``, every
    answer exactly ``args.generation_tokens`` tokens long (the MoE layers run on one position per
    row and step). Returns the JSON rows."""
    rows_, n = task.data[:args.generation_rows], args.generation_tokens
    # the trained model's own infer merges its tag-routed layers in place for the call (the default);
    # "unmerged" runs them as they train
    infers = {"dense": variants["dense"].infer,
              "moe_attr_unmerged": functools.partial(variants["moe_attr_unmerged"].infer, merged=False),
              "moe_attr_infer": variants["moe_attr_unmerged"].infer,
              "moe_attr_merged": variants["moe_attr_merged"].infer}
    decoded = {label: generated_tokens(infer, task, rows_, n) for label, infer in infers.items()}
    print(f"{'generation':<18} {'latency ms':>11} {'× dense':>8}  ({len(rows_)} {GENERATION_TASK} rows, {n} tokens "
          f"each; median of {args.inference_rounds} paired rounds [quartiles])")
    times = interleaved({k: (lambda infer=infer: infer(task, rows_, max_new_tokens=n, min_length=n))
                         for k, infer in infers.items()}, args.inference_rounds)
    out = []
    for label, (seconds, ratio, q1, q3) in paired_ratios(times, "dense").items():
        out.append({"flavour": flavour_name, "model": label, "kind": "generation", "samples": len(rows_),
                    "tokens": decoded[label], "latency_s": seconds, "ratio_to_dense": ratio,
                    "ratio_quartiles": [q1, q3]})
        print(f"{label:<18} {seconds * 1e3:>11.1f} {ratio:>7.2f}x  [{q1:.2f}–{q3:.2f}]", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavours", nargs="+", default=["debug", "tiny"])
    parser.add_argument("--per-task", type=int, default=8, help="samples per task in the batch")
    parser.add_argument("--steps", type=int, default=15, help="training rounds")
    parser.add_argument("--inference-rounds", type=int, default=101,
                        help="paired rounds of each inference timing (31 gave quartiles of ±3%%; 101 steadier medians)")
    parser.add_argument("--inference-per-task", type=int, nargs="+", default=[8, 16],
                        help="batch sizes (samples per task) at which inference latency is measured")
    parser.add_argument("--generation-rows", type=int, default=16, help="rows of greedy generation (0: skip)")
    parser.add_argument("--generation-tokens", type=int, default=8, help="tokens each generated answer has")
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--out", default="bench_results/model.json")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    tok = Tokenizer.default()
    tasks = [load_preset(n, "train", limit=max(args.per_task, *args.inference_per_task)) for n in TASKS]
    per_task_samples = [list(t.samples(tok, training=False)) for t in tasks]
    samples = [s for task_samples in per_task_samples for s in task_samples[:args.per_task]]
    generation_task = None
    if args.generation_rows:
        generation_task = load_preset(GENERATION_TASK, "train", limit=args.generation_rows)
    rows = []
    for name in args.flavours:
        base = flavour(name)
        variants = {
            "dense": base.dense_twin(),
            "moe_token": base.with_moe(router=RouterConfig(strategy="token")),
            "moe_attribute": base.with_moe(router=RouterConfig(strategy="attribute")),
        }
        models = {}
        for label, config in variants.items():
            torch.manual_seed(0)
            models[label] = GeneralistModel.build(config, tasks, tok)
        batch = collate(samples, tok, models["dense"].task_ids)
        positions = int((~batch.encoder.padding_mask).sum() + (~batch.decoder.padding_mask).sum())
        print(f"\n{name}: batch of {len(samples)} samples, {positions} positions")
        print(f"{'model':<16} {'params':>9} {'active':>9} {'train tok/s':>12} {'× dense':>8}")
        steps = {}
        for label, model in models.items():
            model.train()
            objective = GenerativeObjective(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(optimizer=optimizer, objective=objective, batch=batch):
                optimizer.zero_grad(set_to_none=True)
                objective(fresh(batch))["loss"].backward()
                optimizer.step()

            steps[label] = step
        train = paired_ratios(interleaved(steps, args.steps), "dense", invert=True)
        for label, model in models.items():
            seconds, ratio, q1, q3 = train[label]
            rate = positions / seconds
            rows.append({"flavour": name, "model": label, "kind": "train", "tokens_per_s": rate,
                         "ratio_to_dense": ratio, "ratio_quartiles": [q1, q3], "params": model.num_parameters(),
                         "active_params": model.num_parameters(active=True)})
            print(f"{label:<16} {model.num_parameters():>9} {model.num_parameters(active=True):>9} "
                  f"{rate:>12.0f} {ratio:>7.2f}x  [{q1:.2f}–{q3:.2f}]", flush=True)
        merged = merge_for_inference(models["moe_attribute"])
        variants = {"dense": models["dense"], "moe_attr_unmerged": models["moe_attribute"], "moe_attr_merged": merged}
        for model in variants.values():
            model.eval()
        for per_task in args.inference_per_task:
            chosen = [s for task_samples in per_task_samples for s in task_samples[:per_task]]
            batch = collate(chosen, tok, models["dense"].task_ids)  # (a task of fewer rows gives what it has)
            print(f"{'inference':<18} {'latency ms':>11} {'× dense':>8}  ({len(chosen)} samples; median "
                  f"of {args.inference_rounds} paired rounds [quartiles])")
            with torch.no_grad():
                times = interleaved({k: (lambda m=m, b=batch: m(fresh(b))) for k, m in variants.items()},
                                    args.inference_rounds)
            for label, (seconds, ratio, q1, q3) in paired_ratios(times, "dense").items():
                rows.append({"flavour": name, "model": label, "kind": "inference", "samples": len(chosen),
                             "latency_s": seconds, "ratio_to_dense": ratio, "ratio_quartiles": [q1, q3]})
                print(f"{label:<18} {seconds * 1e3:>11.1f} {ratio:>7.2f}x  [{q1:.2f}–{q3:.2f}]", flush=True)
        if generation_task is not None:
            rows.extend(_time_generation(name, variants, generation_task, args))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "model", "tasks": TASKS, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
