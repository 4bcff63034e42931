"""Transfer to held-out tasks: does a generalist learn a new task faster than a model from scratch,
and what does fine-tuning on it cost the tasks it knew?

Protocol (one job per generalist system × seed, one per seed for the specialists):

1. *Pretrain*: a generalist trains on the quality suite minus the ``held`` tasks (the benchmark's
   model, mixing and learning rate; ``steps`` steps) and is scored on the held-out rows of the
   tasks it trained on (*before*).
2. *Fine-tune*: for every held task and every budget in ``finetune_steps``, a copy of the
   pretrained model trains on that task alone for that many steps (the trainer adds the new task
   to its vocabulary and any adapter its inputs need; ``trainable`` picks what trains) and is
   scored on the held task. After the largest budget the copy is scored on the pretraining tasks
   again (*after*): what fine-tuning on one task cost the others. With ``replay`` shares above 0
   the same pretrained model is also fine-tuned with that share of every batch's samples drawn
   from the pretraining tasks (*replay*: the held task keeps the rest), reported as the variant
   ``"<system> replay <share>"``.
3. *From scratch*: a specialist (the dense model of the same active size) trains on each held task
   alone for each budget, with the same batches per step and learning rate.

The report gives, per held task and budget, each system's held-out score (mean ± std over seeds)
with its paired difference to the specialist from scratch, and per held task how much of the
pretraining tasks' scores each generalist kept (*retained*: the mean over those tasks of after /
before, lower-is-better metrics inverted, over the tasks every system and seed scored as learned
before, ``report.learned``: one task set for all, so systems are compared on the same tasks),
with attribute − dense paired by seed; and, per replay variant, its difference to fine-tuning
without replay (held-out score per budget, and the share kept), paired by seed.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import multiprocessing
import statistics
import time
from typing import Optional

from moe_gen.durable import atomic_open
from moe_gen.quality.report import SPECIALIST_FLOOR, _mean_std, _paired_difference, _relative, learned, write_files

__all__ = ["TransferConfig", "run_transfer", "transfer_job", "build_transfer_report", "write_transfer_report",
           "transfer_markdown", "merge_transfer_reports"]

# settings in which reports may differ and still be merged into one (the runs' seeds, systems and
# replay shares are united; where they ran does not matter)
MERGE_FREE = ("seeds", "systems", "replay", "workers", "threads", "output_dir")


@dataclasses.dataclass(kw_only=True)
class TransferConfig:
    """What the transfer benchmark runs.

    Attributes:
        held: suite tasks left out of pretraining and fine-tuned on one at a time (at least one,
            and at least one suite task must remain to pretrain on).
        systems: generalist systems (``moe_gen.quality.runner.GENERALISTS`` and ``EXTRA_SYSTEMS``).
        seeds: one pretraining per system and seed (and one set of specialists per seed).
        steps: pretraining steps of the generalists.
        finetune_steps: fine-tuning budgets, ascending; the specialists train for the same.
        trainable: ``TrainConfig.trainable`` of the fine-tuning (``all``, ``experts``, ...).
        replay: shares in [0, 1) of the fine-tuning samples drawn from the pretraining tasks (split
            evenly between them); each pretrained model is fine-tuned once per share.
        flavour, num_experts, batch_size, lr, warmup_steps, mixing, temperature: as
            ``BenchConfig`` (fine-tuning warms up for at most a tenth of its steps).
        eval_limit: held-out rows scored per task.
        workers, threads: processes running jobs, torch threads per process.
        output_dir: where ``transfer.json``, ``transfer.md`` and ``transfer.png`` go.
    """

    held: tuple[str, ...] = ("table_wine", "digit_counting")
    systems: tuple[str, ...] = ("dense", "attribute")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 4000
    finetune_steps: tuple[int, ...] = (10, 25, 50, 100)
    trainable: str = "all"
    replay: tuple[float, ...] = (0.0,)
    flavour: str = "debug"
    num_experts: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    mixing: str = "temperature"
    temperature: float = 2.0
    eval_limit: int = 100
    workers: int = 2
    threads: int = 1
    output_dir: str = "bench_results/transfer"

    def __post_init__(self) -> None:
        from moe_gen.quality.runner import EXTRA_SYSTEMS, GENERALISTS, repeated
        from moe_gen.quality.suite import SUITE
        from moe_gen.trainer.config import TRAINABLE

        self.held, self.systems = tuple(self.held), tuple(self.systems)
        self.seeds, self.finetune_steps = tuple(self.seeds), tuple(int(s) for s in self.finetune_steps)
        for name in ("held", "systems", "seeds"):  # a repeat would run its jobs twice, counted as other runs
            if twice := repeated(getattr(self, name)):
                raise ValueError(f"TransferConfig.{name} names {', '.join(map(str, twice))} more than once; name "
                                 "each once")
        suite = [t.name for t in SUITE]
        unknown = [n for n in self.held if n not in suite]
        if not self.held or unknown:
            raise ValueError(f"TransferConfig.held: name one or more suite tasks ({', '.join(suite)}); "
                             f"got {list(self.held)}")
        if len(set(self.held)) == len(suite):
            raise ValueError("TransferConfig.held: at least one suite task must remain to pretrain on")
        bad = [s for s in self.systems if s not in GENERALISTS + EXTRA_SYSTEMS]
        if not self.systems or bad:
            raise ValueError(f"TransferConfig.systems: name one or more of {', '.join(GENERALISTS + EXTRA_SYSTEMS)}; "
                             f"got {list(self.systems)}")
        if self.eval_limit < 1:
            raise ValueError(f"TransferConfig.eval_limit must be >= 1 (held-out rows scored per task), "
                             f"got {self.eval_limit}")
        budgets = self.finetune_steps
        if not budgets or min(budgets) < 1 or list(budgets) != sorted(set(budgets)):
            raise ValueError(f"TransferConfig.finetune_steps must be ascending distinct step counts >= 1, "
                             f"got {list(budgets)}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TransferConfig.trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.trainable in ("experts", "routers") and "dense" in self.systems:
            raise ValueError(f"TransferConfig.trainable={self.trainable!r} leaves the dense system nothing to train; "
                             "drop dense from systems or fine-tune 'all'")
        self.replay = tuple(float(r) for r in self.replay)
        if not self.replay or not all(0.0 <= r < 1.0 for r in self.replay) or len(set(self.replay)) < len(self.replay):
            raise ValueError(f"TransferConfig.replay must be distinct shares in [0, 1), got {list(self.replay)}")
        if not self.seeds or self.steps < 1:
            raise ValueError(f"TransferConfig needs seeds and steps >= 1, got seeds {list(self.seeds)}, "
                             f"steps {self.steps}")

    def bench(self, steps: int):
        """The ``BenchConfig`` whose model and training settings a run of ``steps`` uses."""
        from moe_gen.quality.runner import BenchConfig

        return BenchConfig(steps=steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           mixing=self.mixing, temperature=self.temperature, flavour=self.flavour,
                           num_experts=self.num_experts, eval_limit=self.eval_limit, threads=self.threads)


def variant_name(system: str, replay: float) -> str:
    """The report's name of ``system`` fine-tuned with ``replay`` (the system itself without replay)."""
    return system if replay == 0 else f"{system} replay {replay:g}"


def variants(cfg: TransferConfig) -> list[str]:
    """Every fine-tuned variant of the generalists, system by system."""
    return [variant_name(s, r) for s in cfg.systems for r in cfg.replay]


def finetuning_mixture(held: str, pretraining: list[str], replay: float) -> Optional[dict[str, float]]:
    """Sampling weights of a fine-tuning with ``replay``: the held task 1 − replay, the pretraining
    tasks replay split evenly; None without replay (the held task alone)."""
    if replay == 0:
        return None
    return {held: 1.0 - replay, **{n: replay / len(pretraining) for n in pretraining}}


def _suite_splits(cfg: TransferConfig):
    from moe_gen.quality.runner import held_out
    from moe_gen.quality.suite import suite_tasks

    suite = suite_tasks(None)
    train = {t.name: t.build("train") for t in suite}
    test = {t.name: held_out(t.build("test"), cfg.eval_limit) for t in suite}
    return suite, train, test


def transfer_job(job: dict) -> list[dict]:
    """One job: ``{"config": TransferConfig fields, "system": name or "specialist", "seed": s}``.

    Returns one result per replay share (one for the specialist): ``{"system" (the variant's
    name), "seed", "finetuned": {held task: {steps: score}}, "seconds"}`` and, for a generalist,
    ``"before"`` (pretraining tasks' scores) and ``"after"`` (held task → those scores after its
    largest fine-tuning budget)."""
    import torch

    from moe_gen.model import GeneralistModel
    from moe_gen.quality.runner import _fit, _model_config
    from moe_gen.tasks import Tokenizer
    from moe_gen.trainer.evaluation import evaluate_task

    cfg = TransferConfig(**job["config"])
    torch.set_num_threads(cfg.threads)
    suite, train, test = _suite_splits(cfg)
    metric = {t.name: t.metric for t in suite}
    pretraining = [t.name for t in suite if t.name not in cfg.held]
    system, seed = job["system"], job["seed"]
    start = time.perf_counter()

    def score(model, names):
        return {n: evaluate_task(model, test[n])[metric[n]] for n in names}

    if system == "specialist":
        out = {"system": system, "seed": seed, "finetuned": {h: {} for h in cfg.held}}
        for held in cfg.held:
            for steps in cfg.finetune_steps:
                torch.manual_seed(seed)  # the dense model of the same active size, on this task alone
                model = GeneralistModel.build(_model_config(cfg.bench(steps), "specialist"), [train[held]],
                                              Tokenizer.default())
                model, _, _ = _fit(cfg.bench(steps), model, [train[held]], steps, seed)
                out["finetuned"][held][str(steps)] = score(model, [held])[held]
        return [{**out, "seconds": time.perf_counter() - start}]
    torch.manual_seed(seed)
    pretrained = GeneralistModel.build(_model_config(cfg.bench(cfg.steps), system),
                                       [train[n] for n in pretraining], Tokenizer.default())
    pretrained, _, _ = _fit(cfg.bench(cfg.steps), pretrained, [train[n] for n in pretraining], cfg.steps, seed)
    before, pretrain_seconds = score(pretrained, pretraining), time.perf_counter() - start
    results = []
    for replay in cfg.replay:
        out = {"system": variant_name(system, replay), "seed": seed, "replay": replay, "before": before,
               "after": {}, "pretrain_seconds": pretrain_seconds, "finetuned": {h: {} for h in cfg.held}}
        for held in cfg.held:
            mixture = finetuning_mixture(held, pretraining, replay)
            tasks = [train[held]] + ([train[n] for n in pretraining] if mixture else [])
            for steps in cfg.finetune_steps:
                torch.manual_seed(seed)
                model, _, _ = _fit(cfg.bench(steps), copy.deepcopy(pretrained), tasks, steps, seed,
                                   trainable=cfg.trainable, task_weights=mixture)
                out["finetuned"][held][str(steps)] = score(model, [held])[held]
                if steps == cfg.finetune_steps[-1]:
                    out["after"][held] = score(model, pretraining)
        results.append({**out, "seconds": time.perf_counter() - start})
    return results


def _jobs(cfg: TransferConfig) -> list[dict]:
    base = dataclasses.asdict(cfg)
    jobs = [{"config": base, "system": s, "seed": seed} for seed in cfg.seeds for s in cfg.systems]
    return jobs + [{"config": base, "system": "specialist", "seed": seed} for seed in cfg.seeds]


def run_transfer(cfg: TransferConfig, *, say=print) -> dict:
    """Runs every job (``cfg.workers`` processes) and returns the report (also written to
    ``cfg.output_dir``)."""
    start = time.perf_counter()
    jobs, results = _jobs(cfg), []
    if cfg.workers <= 1:
        for done, job in enumerate(jobs, 1):
            results.extend(transfer_job(job))
            say(f"[{done}/{len(jobs)}] {job['system']} seed {job['seed']}: {results[-1]['seconds']:.0f} s")
    else:
        context = multiprocessing.get_context("spawn")  # workers start clean (no forked torch thread pools)
        with concurrent.futures.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context) as pool:
            futures = {pool.submit(transfer_job, job): job for job in jobs}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                job = futures[future]
                results.extend(future.result())
                say(f"[{done}/{len(jobs)}] {job['system']} seed {job['seed']}: "
                    f"{results[-1]['seconds']:.0f} s")
    report = build_transfer_report(cfg, results, wall_seconds=time.perf_counter() - start)
    write_transfer_report(report, cfg.output_dir)
    return report


def _counted(runs: list[dict], held: str, suite: dict) -> list[str]:
    """The pretraining tasks whose share kept after fine-tuning on ``held`` counts, one set for every
    system and seed of ``runs``: those every run scored as learned before (``report.learned``: every
    lower-is-better task) and that have a ratio after / before in every run (a lower-is-better task
    without error after has none). ``suite`` maps task names to their ``SuiteTask``."""
    def counts(run, n):
        task = suite[n]
        return (learned(task.metric, task.higher_is_better, run["before"][n])
                and _relative(run["after"][held][n], run["before"][n], task.higher_is_better) is not None)

    return [n for n in (runs[0]["before"] if runs else ()) if all(counts(r, n) for r in runs)]


def _retained(before: dict, after: dict, suite: dict, tasks: list[str]) -> float:
    """Mean over ``tasks`` (``_counted``) of after / before (before / after when lower is better)."""
    return statistics.fmean(_relative(after[n], before[n], suite[n].higher_is_better) for n in tasks)


def _by_seed(values: dict) -> dict:
    """``{seed: value}`` in the layout ``_paired_difference`` reads."""
    seeds = sorted(values)
    return {"seeds": seeds, "values": [values[s] for s in seeds]}


def _forgetting(cfg: TransferConfig, results: list[dict], held: str, suite: dict) -> tuple[dict, dict]:
    """For ``held``: per system the retained share (mean ± std over seeds) over the tasks counted for
    every system and seed alike (``_counted``; under ``"tasks"``), and attribute − dense on it paired
    by seed; and per system and pretraining task the change of score (after − before)."""
    retained: dict = {}
    changes: dict = {}
    by_seed: dict = {}
    runs_of = {s: [r for r in results if r["system"] == s] for s in variants(cfg)}
    counted = _counted([r for runs in runs_of.values() for r in runs], held, suite)
    for s, runs in runs_of.items():
        if not runs:
            continue
        by_seed[s] = {r["seed"]: _retained(r["before"], r["after"][held], suite, counted) for r in runs if counted}
        retained[s] = {**_mean_std(list(by_seed[s].values())), "tasks": counted} if by_seed[s] else None
        changes[s] = {n: _mean_std([r["after"][held][n] - r["before"][n] for r in runs]) for n in runs[0]["before"]}
    pair = ("attribute", "dense")
    retained["attribute_minus_dense"] = (
        _paired_difference({s: _by_seed(by_seed[s]) for s in pair}, *pair)
        if all(by_seed.get(s) for s in pair) else None)
    return retained, changes, by_seed


def _replay_effect(cfg: TransferConfig, raw: dict, kept_by_seed: dict) -> dict:
    """Per replay variant of one held task: its held-out score minus the same system's without
    replay at each budget, and the same for the share kept, paired by seed (points)."""
    def pair(name, system, a, b):
        return _paired_difference({name: _by_seed(a), system: _by_seed(b)}, name, system)

    effect = {}
    for system in cfg.systems:
        for replay in cfg.replay:
            name = variant_name(system, replay)
            if replay == 0 or name not in raw or system not in raw:
                continue
            kept = (kept_by_seed.get(name), kept_by_seed.get(system))
            effect[name] = {"scores": {b: pair(name, system, raw[name][b], raw[system][b])
                                       for b in raw[name] if raw[name][b]},
                            "retained": pair(name, system, *kept) if all(kept) else None}
    return effect


def build_transfer_report(cfg: TransferConfig, results: list[dict], *, wall_seconds: float) -> dict:
    """Aggregates the job results into the report dictionary (plain JSON types)."""
    from moe_gen.quality.suite import SUITE

    by_name = {t.name: t for t in SUITE}
    systems = [s for s in ("specialist", *variants(cfg)) if any(r["system"] == s for r in results)]
    budgets = [str(s) for s in cfg.finetune_steps]
    scores, versus_scratch, retained, changes, replay = {}, {}, {}, {}, {}
    for held in cfg.held:
        raw = {s: {b: {r["seed"]: r["finetuned"][held][b] for r in results if r["system"] == s} for b in budgets}
               for s in systems}
        scores[held] = {s: {b: _mean_std(list(v.values())) for b, v in raw[s].items() if v} for s in systems}
        if "specialist" in systems:
            versus_scratch[held] = {
                s: {b: _paired_difference({s: _by_seed(raw[s][b]), "scratch": _by_seed(raw["specialist"][b])},
                                          s, "scratch") for b in budgets}
                for s in systems if s != "specialist"}
        retained[held], changes[held], kept_by_seed = _forgetting(cfg, results, held, by_name)
        replay[held] = _replay_effect(cfg, raw, kept_by_seed)
    return {"config": dataclasses.asdict(cfg), "systems": systems, "budgets": budgets,
            "higher_is_better": {h: by_name[h].higher_is_better for h in cfg.held}, "scores": scores,
            "versus_scratch": versus_scratch, "retained": retained, "changes": changes, "replay": replay,
            "wall_seconds": wall_seconds, "runs": results}


def _cell(entry: Optional[dict]) -> str:
    if not entry:
        return "—"
    return f"{entry['mean']:.3f}" if len(entry["values"]) <= 1 else f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def _difference(paired: Optional[dict]) -> str:
    if not paired:
        return ""
    p = paired.get("p_value")
    return f" ({paired['mean']:+.1f}{'' if p is None else f', p = {p:.2g}'})"


def _versus_dense(retained: dict) -> str:
    paired = retained.get("attribute_minus_dense")
    if not paired:
        return ""
    p = paired.get("p_value")
    return f"; attribute − dense {paired['mean']:+.1f} points paired by seed" + ("" if p is None else f" (p = {p:.2g})")


def _held_lines(report: dict, held: str) -> list[str]:
    """The fine-tuning table of one held task, then what fine-tuning on it cost the other tasks."""
    systems, budgets = report["systems"], report["budgets"]
    scores, versus = report["scores"][held], report["versus_scratch"].get(held, {})
    arrow = "" if report["higher_is_better"][held] else " ↓"
    lines = [f"### {held}{arrow}", "",
             "| fine-tuning steps | " + " | ".join(
                 "from scratch (specialist)" if s == "specialist" else f"{s} (pretrained)" for s in systems) + " |",
             "|---:|" + "---:|" * len(systems)]
    for b in budgets:
        cells = [_cell(scores[s].get(b)) + ("" if s == "specialist" else _difference(versus.get(s, {}).get(b)))
                 for s in systems]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    changes = report["changes"][held]
    generalists = [s for s in systems if s != "specialist" and s in changes]
    if generalists:
        lines += ["", _kept_line(report, held, generalists), ""]
        lines += ["| task | " + " | ".join(f"{s} before → change" for s in generalists) + " |",
                  "|---|" + "---:|" * len(generalists)]
        for name in changes[generalists[0]]:
            row = []
            for s in generalists:
                before = statistics.fmean(r["before"][name] for r in report["runs"] if r["system"] == s)
                row.append(f"{before:.3f} → {changes[s][name]['mean']:+.3f}")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines + [""] + _replay_lines(report, held)


def _kept_line(report: dict, held: str, generalists: list[str]) -> str:
    """How much of the pretraining tasks' scores each generalist kept, over the tasks counted for
    every system and seed (named)."""
    retained = report["retained"][held]
    counted = next((retained[s]["tasks"] for s in generalists if retained.get(s)), [])
    line = f"Pretraining tasks' scores kept after {report['budgets'][-1]} steps on {held} alone (after / before"
    if not counted:
        return line + (f"): no pretraining task scored ≥ {SPECIALIST_FLOOR} of its metric's range before on every "
                       "system and seed.")
    return (line + f", mean over the {len(counted)} tasks that every system and seed scored ≥ {SPECIALIST_FLOOR} of "
            f"their metric's range on before fine-tuning: {', '.join(counted)}): "
            + ", ".join(f"{s} {_cell(retained.get(s))}" for s in generalists) + _versus_dense(retained) + ".")


def _replay_lines(report: dict, held: str) -> list[str]:
    """What replay changed for ``held``: per variant, held-out score and kept share against the
    same system without replay (points, paired by seed)."""
    effect = report.get("replay", {}).get(held) or {}
    lines = []
    for name, entry in effect.items():
        steps = ", ".join(f"{b} steps {_difference(d).strip(' ()')}" for b, d in entry["scores"].items() if d)
        kept = _difference(entry["retained"]).strip(" ()") or "—"
        lines.append(f"- {name} − without replay: held-out score {steps}; share kept {kept}.")
    return lines + [""] if lines else []


def transfer_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# Transfer to held-out tasks", "",
             f"Generalists ({', '.join(cfg['systems'])}; flavour {cfg['flavour']}) pretrained for {cfg['steps']} steps "
             f"on the quality suite without {', '.join(cfg['held'])}, then fine-tuned on each of those alone "
             f"(trainable: {cfg['trainable']}{_replay_words(cfg)}); specialists trained from scratch on it for "
             "the same steps. "
             f"Held-out scores, mean ± std over seeds {', '.join(str(s) for s in cfg['seeds'])}; in brackets the "
             "difference to the specialist in points, paired by seed, with its p-value (paired t-test). "
             f"Wall time {report['wall_seconds'] / 60:.1f} min.", ""]
    for held in cfg["held"]:
        lines += _held_lines(report, held)
    return "\n".join(lines)


def _replay_words(cfg: dict) -> str:
    shares = [r for r in cfg.get("replay", (0.0,)) if r]
    if not shares:
        return ""
    return ("; and again with " + " / ".join(f"{r:g}" for r in shares) + " of each batch's samples replayed "
            "from the pretraining tasks")


def plot_transfer(report: dict, path: str) -> None:
    """Held-out score against fine-tuning steps, one panel per held task, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    held = report["config"]["held"]
    fig = Figure(figsize=(4.5 * len(held), 3.8))
    axes = fig.subplots(1, len(held), squeeze=False)[0]
    steps = [int(b) for b in report["budgets"]]
    for ax, name in zip(axes, held):
        for s in report["systems"]:
            entries = [report["scores"][name][s].get(str(b)) for b in steps]
            if all(entries):
                ax.errorbar(steps, [e["mean"] for e in entries], yerr=[e["std"] for e in entries], capsize=3,
                            marker="o", label="from scratch" if s == "specialist" else s)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("held-out score")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def merge_transfer_reports(paths: list[str], output_dir: str) -> dict:
    """One report from several ``transfer.json`` of the same settings on other seeds, systems or
    replay shares (e.g. ``--seeds 0 1 2`` and ``--seeds 3 4 5``): their runs pooled (a run present
    in two reports, such as a seed's specialist, is taken once when both agree), seeds, systems
    and shares united, wall times added; written to ``output_dir``. Raises ``ValueError`` naming
    the file and what differs when a setting outside ``MERGE_FREE`` differs, or when two reports
    hold different results for one run."""
    from moe_gen.quality.runner import _read_report

    if len(paths) < 2:
        raise ValueError(f"merging needs at least two reports, got {len(paths)}")
    reports = [_read_report(p, "transfer.json", ("config", "runs")) for p in paths]
    first = reports[0]["config"]
    for path, report in zip(paths[1:], reports[1:]):
        differ = [f"{k} {first.get(k)!r} in {paths[0]!r}, {v!r} here" for k, v in report["config"].items()
                  if k not in MERGE_FREE and v != first.get(k)]
        if differ:
            raise ValueError(f"{path!r} was made with other settings: {'; '.join(differ)}")
    runs: dict = {}
    for path, report in zip(paths, reports):
        for run in report["runs"]:
            key = (run["system"], run["seed"])
            if key in runs and runs[key][0]["finetuned"] != run["finetuned"]:
                raise ValueError(f"{path!r} and {runs[key][1]!r} hold different {run['system']} runs of seed "
                                 f"{run['seed']}")
            runs.setdefault(key, (run, path))
    union = lambda name: list(dict.fromkeys(x for r in reports for x in r["config"][name]))  # noqa: E731
    cfg = TransferConfig(**{**first, "seeds": tuple(sorted(union("seeds"))), "systems": tuple(union("systems")),
                            "replay": tuple(sorted(union("replay"))), "output_dir": output_dir})
    report = build_transfer_report(cfg, [run for run, _ in runs.values()],
                                   wall_seconds=sum(float(r.get("wall_seconds", 0.0)) for r in reports))
    write_transfer_report(report, output_dir)
    return report


def write_transfer_report(report: dict, directory: str) -> dict[str, str]:
    """Writes ``transfer.json``, ``transfer.md`` and ``transfer.png``; returns their paths."""
    return write_files(report, directory, "transfer", transfer_markdown(report), plot_transfer)
