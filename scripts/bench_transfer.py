"""Transfer benchmark: generalists pretrained on the quality suite without some tasks, fine-tuned on
each of those alone, against specialists trained on it from scratch; and what the fine-tuning cost
the tasks the generalist knew (``moe_gen.quality.transfer``).

Usage:
    python scripts/bench_transfer.py               # wine and counting held out, dense and attribute, 3 seeds
    python scripts/bench_transfer.py --quick       # one seed, a few steps: the report's shape only
    python scripts/bench_transfer.py --held table_breast_cancer --systems dense attribute instruction
    python scripts/bench_transfer.py --systems attribute --trainable experts   # the experts alone (dense has none)
    python scripts/bench_transfer.py --replay 0 0.25          # and again replaying a quarter of each batch
    python scripts/bench_transfer.py --merge a/transfer.json b/transfer.json --out c   # both runs in one report
    make bench-transfer

Writes transfer.json, transfer.md and transfer.png to --out (default bench_results/transfer) and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_gen.quality.runner import EXTRA_SYSTEMS, GENERALISTS  # noqa: E402
from moe_gen.quality.transfer import (  # noqa: E402
    TransferConfig,
    merge_transfer_reports,
    run_transfer,
    transfer_markdown,
)

QUICK = dict(seeds=(0,), steps=20, finetune_steps=(2, 4), eval_limit=4, batch_size=8, warmup_steps=2)


def make_parser() -> argparse.ArgumentParser:
    from moe_gen.trainer.config import TRAINABLE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps (smoke run)")
    parser.add_argument("--held", nargs="+", help="suite tasks left out of pretraining (default: table_wine "
                                                  "digit_counting)")
    parser.add_argument("--systems", nargs="+", help=f"generalists (default: dense attribute; any of "
                                                     f"{' '.join(GENERALISTS + EXTRA_SYSTEMS)})")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, help="pretraining steps (default 4000)")
    parser.add_argument("--finetune-steps", nargs="+", type=int, help="fine-tuning budgets (default 10 25 50 100)")
    parser.add_argument("--trainable", choices=TRAINABLE, help="what fine-tuning trains (default all)")
    parser.add_argument("--replay", nargs="+", type=float,
                        help="shares of each fine-tuning batch drawn from the pretraining tasks, one fine-tuning "
                             "per share (default 0: none)")
    parser.add_argument("--flavour")
    parser.add_argument("--workers", type=int, help="processes (default 2)")
    parser.add_argument("--merge", nargs="+", metavar="TRANSFER_JSON",
                        help="train nothing: merge reports of the same settings on other seeds, systems or replay "
                             "shares into one (written to --out)")
    parser.add_argument("--out", help="output directory (default bench_results/transfer, --quick: "
                                      "bench_results/transfer_quick)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.merge:
        out = args.out or "bench_results/transfer"
        try:
            report = merge_transfer_reports(args.merge, out)
        except ValueError as exc:
            print(f"bench_transfer: {exc}", file=sys.stderr)
            return 2
        print(transfer_markdown(report))
        print(f"wrote {out}/transfer.json, transfer.md, transfer.png")
        return 0
    fields = dict(QUICK) if args.quick else {}
    for name in ("held", "systems", "seeds", "steps", "finetune_steps", "trainable", "replay", "flavour", "workers"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = tuple(value) if isinstance(value, list) else value
    fields["output_dir"] = args.out or ("bench_results/transfer_quick" if args.quick else "bench_results/transfer")
    try:
        cfg = TransferConfig(**fields)
    except ValueError as exc:
        print(f"bench_transfer: {exc}", file=sys.stderr)
        return 2
    report = run_transfer(cfg, say=lambda text: print(text, flush=True))
    print(transfer_markdown(report))
    print(f"wrote {cfg.output_dir}/transfer.json, transfer.md, transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
