"""Data pipeline benchmark: encode + collate throughput per modality, padding with and without packing.

Usage:
    python scripts/bench_data.py                  # every preset, 64 samples each
    python scripts/bench_data.py --samples 128 --batch 16 --tasks visual_grounding speech_recognition

For each preset: samples/s of ``Task.encode`` (preprocessing: decode, resize, fbank, tokenise, ...)
and of ``collate`` (padding into tensors with tags), and the share of padded positions in batches
of --batch samples, padded vs packed (rows of twice the longest sample). Prints a table and writes
JSON (--out, default bench_results/data.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from moe_gen import TASKS
from moe_gen.tasks import Tokenizer, collate, load_preset, preset_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--out", default="bench_results/data.json")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.default()
    names = args.tasks or TASKS.list()
    ids = {n: i for i, n in enumerate(TASKS.list())}
    rows = []
    print(f"{'task':<28} {'modalities':<22} {'encode/s':>9} {'collate/s':>10} {'pad %':>6} {'packed pad %':>12}")
    for name in names:
        task = load_preset(name, "train", limit=args.samples)
        task.plan(tokenizer)  # planning is a one-off; time the per-sample work
        task.encode(0, tokenizer)  # first-use costs (e.g. loading the pronouncing dictionary) too
        start = time.perf_counter()
        samples = [task.encode(i, tokenizer) for i in range(len(task))]
        encode_s = time.perf_counter() - start
        batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]
        start = time.perf_counter()
        padded = [collate(b, tokenizer, ids) for b in batches]
        collate_s = time.perf_counter() - start
        longest = max(max(s.lengths()) for s in samples)
        packed = [collate(b, tokenizer, ids, pack=True, max_length=2 * longest) for b in batches]
        template = task.instruction.templates[0]
        modalities = sorted({s.modality for s in template.encoder + template.decoder if not s.is_literal})
        row = {
            "task": name, "modalities": modalities, "samples": len(samples),
            "encode_per_s": len(samples) / encode_s, "collate_per_s": len(samples) / collate_s,
            "padding": statistics.mean(b.padding_fraction for b in padded),
            "packed_padding": statistics.mean(b.padding_fraction for b in packed),
            "rows_padded": sum(b.encoder.tokens.shape[0] for b in padded),
            "rows_packed": sum(b.encoder.tokens.shape[0] for b in packed),
            "source": preset_info(name).source, "licence": preset_info(name).licence,
        }
        rows.append(row)
        print(f"{name:<28} {','.join(modalities):<22} {row['encode_per_s']:>9.0f} {row['collate_per_s']:>10.0f} "
              f"{100 * row['padding']:>6.1f} {100 * row['packed_padding']:>12.1f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "data_encode_collate", "batch": args.batch, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
