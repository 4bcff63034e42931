"""Learning-quality benchmark: classical baselines, specialists, and dense and MoE generalists
(by routing strategy) on held-out rows of the suite in ``moe_gen.quality.suite``.

Usage:
    python scripts/bench_quality.py                       # 3 seeds, 6 generalists, 4,000 steps (~60 min on 2 cores)
    python scripts/bench_quality.py --quick               # 1 seed, a few steps: the report's shape only
    python scripts/bench_quality.py --seeds 0 --systems dense attribute --steps 800
    python scripts/bench_quality.py --systems dense attribute --pretrained-inputs   # frozen MiniLM / Whisper inputs
    python scripts/bench_quality.py --merge a/quality.json b/quality.json --out c   # both runs in one report
    python scripts/bench_quality.py --compare a/quality.json:dense b/quality.json:attribute   # b against a, by seed
    python scripts/bench_quality.py --tasks digit_classification digit_successor --systems task instruction --steps 200
    make bench-quality

Writes quality.json, quality.md and quality.png to --out (default bench_results/quality) and
prints the Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_gen.quality.compare import compare_markdown, compare_reports  # noqa: E402
from moe_gen.quality.report import markdown  # noqa: E402
from moe_gen.quality.runner import (  # noqa: E402
    EXTRA_SYSTEMS,
    GENERALISTS,
    BenchConfig,
    SpecialistsFromError,
    default_output,
    merge_reports,
    run_benchmark,
)

QUICK = dict(seeds=(0,), steps=26, eval_limit=4, fit_rows=4, warmup_steps=2, batch_size=8)


def make_parser() -> argparse.ArgumentParser:
    from moe_gen.objectives import LOSS_AVERAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps (smoke run)")
    parser.add_argument("--tasks", nargs="*", default=[], help="suite task names (default: all)")
    parser.add_argument("--systems", nargs="*", default=list(GENERALISTS),
                        help=f"generalists to train (default: {' '.join(GENERALISTS)}; "
                             f"also: {' '.join(EXTRA_SYSTEMS)})")
    parser.add_argument("--no-specialists", action="store_true")
    parser.add_argument("--seeds", nargs="*", type=int)
    parser.add_argument("--steps", type=int, help="generalist steps (specialists: their task's share)")
    parser.add_argument("--mixing", choices=("temperature", "uniform"), help="task mixing (default temperature)")
    parser.add_argument("--temperature", type=float, help="tau of temperature mixing (default 2)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-scale", action="append", default=[], metavar="PREFIX=SCALE",
                        help="the generalists' learning rate times SCALE for parameters named PREFIX... "
                             "(TrainConfig.lr_scales; repeatable), e.g. adapters.bag_of_words=3")
    parser.add_argument("--flavour")
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--expert-hidden", type=int,
                        help="each expert's hidden width (default: the flavour's); dense systems get k times it")
    parser.add_argument("--moe-attention", action="store_true",
                        help="the MoE systems' attention output projections are routed mixtures of linear experts too")
    parser.add_argument("--shared-expert", action="store_true",
                        help="the MoE systems give half their active FFN width to a shared expert every token uses "
                             "(routed experts half as wide; active size unchanged)")
    parser.add_argument("--upcycle-at", type=float,
                        help="two stages: every generalist trains dense for this share of the steps, then the MoE "
                             "systems are upcycled (experts = copies of the dense FFN) and all train the rest")
    parser.add_argument("--upcycle-top-k", type=int, help="experts per token after upcycling (default 1: the "
                        "dense model's active size)")
    parser.add_argument("--loss-average", choices=LOSS_AVERAGES,
                        help="how token losses are averaged over a batch (TrainConfig.loss_average; default token)")
    parser.add_argument("--batch-tasks", choices=("mixed", "single"),
                        help="the generalists' batches: each row's task drawn (mixed, default) or one task per "
                             "batch (single; TrainConfig.batch_tasks)")
    parser.add_argument("--tag-balance", choices=("loss", "bias", "loss+bias", "none"),
                        help="load balancing of the MoE systems' tag-routed layers (RouterConfig.tag_balance; "
                             "default loss)")
    parser.add_argument("--tag-balance-window", type=int,
                        help="the tag-balance loss reads a running load over about this many forwards "
                             "(RouterConfig.tag_balance_window; default 0: each forward's own)")
    parser.add_argument("--label-smoothing", type=float,
                        help="the token cross-entropy's label smoothing, every system (ModelConfig.label_smoothing)")
    parser.add_argument("--sam-rho", type=float,
                        help="sharpness-aware minimisation's rho, every system (TrainConfig.sam_rho; two passes "
                             "a step)")
    parser.add_argument("--distill", type=float, metavar="ALPHA",
                        help="the generalists also learn each task from its specialist of the same seed, with this "
                             "weight (TrainConfig.distill_weight; the specialists train first)")
    parser.add_argument("--distill-temperature", type=float, metavar="TAU",
                        help="temperature of that distillation (TrainConfig.distill_temperature; default 1)")
    parser.add_argument("--distill-anneal", action="store_true",
                        help="the specialists' weight falls linearly to 0 over the run (TrainConfig.distill_anneal)")
    parser.add_argument("--distill-only-correct", action="store_true",
                        help="a specialist teaches only the tokens it answers right (TrainConfig.distill_only_correct)")
    parser.add_argument("--ema-decay", type=float, help="score the runs' weight averages (TrainConfig.ema_decay)")
    parser.add_argument("--pretrained-inputs", action="store_true",
                        help="doc_topic and spoken words read their input through frozen MiniLM / Whisper encoders")
    parser.add_argument("--bag-of-words", action="store_true",
                        help="doc_topic reads its text as TF-IDF weights of a vocabulary fitted on its training rows")
    parser.add_argument("--subword-sampling", type=float, metavar="ALPHA",
                        help="doc_topic's text input draws segmentations into pieces in training (subword "
                             "regularisation; the TEXT slot's subword_sampling), every system")
    parser.add_argument("--pose-summary", action="store_true",
                        help="motion classification reads each pose window as one row of per-feature statistics")
    parser.add_argument("--pose-noise", type=float,
                        help="with --pose-summary: std of Gaussian noise added to each standardised statistic in "
                             "training (the slot's feature_noise)")
    parser.add_argument("--pose-min-length", type=int,
                        help="with --pose-summary: each training read summarises a random stretch of at least this "
                             "many frames of the window (the slot's min_length)")
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--eval-every", type=int, help="also score the held-out rows every N steps (each run's "
                        "curve in quality.json, means in quality.md; the training is the same)")
    parser.add_argument("--fit-rows", type=int, help="training rows scored per classification task (default 50; 0: "
                        "none): tells under-fitting from over-fitting")
    parser.add_argument("--specialists-from", metavar="QUALITY_JSON",
                        help="reuse the specialists of an earlier report made with the same settings")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--merge", nargs="+", metavar="QUALITY_JSON",
                        help="train nothing: merge reports of the same settings on other seeds or systems into "
                             "one report written to --out (every other option is ignored)")
    parser.add_argument("--compare", nargs="+", metavar="QUALITY_JSON[:SYSTEM]",
                        help="train nothing: compare two runs (BASE OTHER; a report's system after a colon) "
                             "seed by seed, per task, written to --out as compare.{md,json} (every other option is "
                             "ignored)")
    parser.add_argument("--out")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.merge:
        out = args.out or default_output(False)
        try:
            report = merge_reports(args.merge, out)
        except ValueError as exc:
            parser.error(str(exc))
        print(markdown(report))
        print(f"written to {out}/quality.{{json,md,png}}")
        return 0

    if args.compare:
        try:
            result = compare_reports(args.compare, args.out or os.path.join("bench_results", "quality_compare"))
        except ValueError as exc:
            parser.error(str(exc))
        print(compare_markdown(result))
        return 0

    config = config_from_args(parser, args)
    try:
        report = run_benchmark(config, say=lambda line: print(line, flush=True))
    except SpecialistsFromError as exc:  # refused before any model trains, as --merge refuses its reports
        parser.error(str(exc))
    print()
    print(markdown(report))
    print(f"written to {config.output_dir}/quality.{{json,md,png}}")
    return 0


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the parsed options ask for (``parser.error`` on a malformed one)."""
    fields = dict(QUICK) if args.quick else {}
    for name in ("steps", "mixing", "temperature", "batch_size", "lr", "flavour", "num_experts", "expert_hidden",
                 "upcycle_at", "upcycle_top_k", "pose_noise", "pose_min_length", "subword_sampling", "eval_every",
                 "eval_limit", "fit_rows", "ema_decay", "label_smoothing", "sam_rho", "distill", "distill_temperature",
                 "loss_average", "batch_tasks",
                 "tag_balance", "tag_balance_window", "workers", "threads"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.seeds:
        fields["seeds"] = tuple(args.seeds)
    fields["pretrained_inputs"] = args.pretrained_inputs
    fields["bag_of_words"] = args.bag_of_words
    fields["pose_summary"] = args.pose_summary
    fields["distill_anneal"] = args.distill_anneal
    fields["distill_only_correct"] = args.distill_only_correct
    if args.lr_scale:
        fields["lr_scales"] = _lr_scales(parser, args.lr_scale)
    fields["moe_attention"] = args.moe_attention
    fields["shared_expert"] = args.shared_expert
    if args.specialists_from:
        fields["specialists_from"] = args.specialists_from
    try:
        return BenchConfig(tasks=tuple(args.tasks), systems=tuple(args.systems), specialists=not args.no_specialists,
                           output_dir=args.out or default_output(args.quick), **fields)
    except ValueError as exc:  # a combination BenchConfig refuses, e.g. --pose-noise without --pose-summary
        parser.error(str(exc))


def _lr_scales(parser, items: list[str]) -> dict[str, float]:
    scales = {}
    for item in items:
        prefix, _, scale = item.rpartition("=")
        try:
            scales[prefix] = float(scale)
        except ValueError:
            prefix = ""
        if not prefix:
            parser.error(f"--lr-scale takes PREFIX=SCALE (e.g. adapters.bag_of_words=3), got {item!r}")
    return scales


if __name__ == "__main__":
    sys.exit(main())
