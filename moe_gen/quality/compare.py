"""Two benchmark runs side by side, paired by seed (``scripts/bench_quality.py --compare``).

Whether a change helps (a regulariser, another router, more experts) is read on the same held-out
rows, seed against seed: per task, each run's mean ± spread, the difference on every seed, its mean
and a paired t-test; over the classification tasks, the mean score's paired difference and how many
tasks each run takes to 95% of the best classical score. The two runs may come from one report
(``quality.json:dense`` against ``quality.json:attribute``) or from two made with other settings,
which the comparison lists; reports scored on other held-out rows are refused.
"""

from __future__ import annotations

import json
import statistics
from typing import Optional, Sequence

from moe_gen.quality.report import (
    _classical_bar,
    _mean_std,
    _reaches_95,
    _relative,
    learned,
    paired_test,
    write_files,
)
from moe_gen.quality.runner import (
    EXTRA_SYSTEMS,
    GENERALISTS,
    _held_out_scores,
    _read_report,
    settings_changed,
)

__all__ = ["compare_reports", "compare_markdown"]

SYSTEMS = ("specialist", *GENERALISTS, *EXTRA_SYSTEMS)


def _side(spec: str) -> dict:
    """``path[:system]`` read: the report, its path and the system whose runs it compares. Without a
    system the report must hold exactly one generalist; ``ValueError`` naming the file otherwise."""
    path, system = spec, None
    head, _, tail = spec.rpartition(":")
    if head and tail in SYSTEMS:
        path, system = head, tail
    report = _read_report(path)
    held = [s for s in SYSTEMS if any(run["system"] == s for run in report["runs"])]
    if system is None:
        generalists = [s for s in held if s != "specialist"]
        if len(generalists) != 1:
            raise ValueError(f"{path!r} holds the runs of {', '.join(held) or 'no system'}: name the one to compare "
                             f"as {path}:SYSTEM")
        system = generalists[0]
    elif system not in held:
        raise ValueError(f"{path!r} has no {system} runs (it holds {', '.join(held) or 'none'})")
    return {"path": path, "system": system, "report": report, "runs": _runs_by_seed(report, system, path)}


def _runs_by_seed(report: dict, system: str, path: str) -> dict:
    """seed → ``{"tasks", "scores"}`` of ``system``'s runs: a generalist's one run per seed, or the
    specialists' runs of each seed (one per task) joined (before the twenty-sixth session's audit
    the last task's run stood for the seed, and a comparison of specialists covered one task)."""
    runs: dict = {}
    for run in report["runs"]:
        if run["system"] != system:
            continue
        joined = runs.setdefault(run["seed"], {"tasks": [], "scores": {}})
        for name in run["tasks"]:
            if name in joined["scores"] or name in joined["tasks"]:
                raise ValueError(f"{path!r} holds two {system} runs of seed {run['seed']} that score {name}")
            joined["tasks"].append(name)
        joined["scores"].update(run["scores"])
    return runs


def _check_same_rows(base: dict, other: dict, tasks: Sequence[str]) -> None:
    """Refuses reports scored on other held-out rows: another ``eval_limit``, or other classical
    scores on a task both scored (the rows the baselines read are the rows the models were scored on)."""
    limits = [side["report"]["config"].get("eval_limit") for side in (base, other)]
    if limits[0] != limits[1]:
        raise ValueError(f"{other['path']!r} scored {limits[1]} held-out rows per task, {base['path']!r} {limits[0]}: "
                         "the runs were not scored on the same rows")
    a, b = (_held_out_scores(side["report"]["classical"]) for side in (base, other))
    for name in tasks:
        if name in a and name in b and a[name] != b[name]:
            raise ValueError(f"{other['path']!r} has other classical baselines for {name} than {base['path']!r}: "
                             "its held-out rows differ")


def _task_info(base: dict) -> dict:
    """name → the report's description of the task (metric, direction, classification); the suite's
    own for a task the report does not describe."""
    from moe_gen.quality.suite import EXTRA, SUITE

    known = {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better,
                      "classification": t.classification} for t in SUITE + EXTRA}
    return {**known, **{t["name"]: t for t in base["report"].get("tasks", [])}}


def _task_row(name: str, info: dict, seeds: list, base: dict, other: dict) -> Optional[dict]:
    """One task's comparison over ``seeds`` (None where a run lacks its score on one of them)."""
    a = [base["runs"][s]["scores"].get(name) for s in seeds]
    b = [other["runs"][s]["scores"].get(name) for s in seeds]
    if None in a or None in b:
        return None
    higher = info.get("higher_is_better", True)
    test = paired_test(b, a)
    better = [d > 0 if higher else d < 0 for d in test["points"]]
    return {"metric": info.get("metric", "?"), "higher_is_better": higher,
            "classification": bool(info.get("classification")), "base": _mean_std(a), "other": _mean_std(b),
            "difference": test, "better_on_every_seed": all(better),
            "worse_on_every_seed": not any(better) and all(d != 0 for d in test["points"])}


def _reaching(rows: dict, classical: dict, side: str, every_seed: bool = False) -> list[str]:
    """The tasks (those with classical baselines: the classification tasks) whose mean score on
    ``side`` is ≥ 95% of the best classical one (``every_seed``: whose every seed's score is)."""
    out = []
    for name, row in rows.items():
        bar = _classical_bar(classical[name]) if name in classical else None
        values = row[side]["values"] if every_seed else [row[side]["mean"]]
        if bar is not None and all(_reaches_95(v, bar) for v in values):
            out.append(name)
    return out


def _relative_mean(base: dict, other: dict, rows: dict) -> dict:
    """The mean relative score (score / the specialist's seed mean, over the tasks the specialist
    learned and every seed of both runs has a ratio on) of both runs per seed, paired; the
    specialists are the base report's, else the other's (one reference for both: the difference
    reads the runs, not the references); empty when neither report has specialists."""
    source = next((side for side in (base, other) if side["report"].get("scores", {}).get("specialist")), None)
    if source is None:
        return {}
    reference = {n: entry["mean"] for n, entry in source["report"]["scores"]["specialist"].items()}
    ratios = {}
    for name, row in rows.items():
        if name in reference and learned(row["metric"], row["higher_is_better"], reference[name]):
            pair = [[_relative(v, reference[name], row["higher_is_better"]) for v in row[side]["values"]]
                    for side in ("base", "other")]
            if None not in pair[0] + pair[1]:
                ratios[name] = pair
    if not ratios:
        return {}
    per_seed = [[statistics.fmean(r[i][s] for r in ratios.values()) for s in range(len(pair[0]))] for i in (0, 1)]
    return {"specialists_from": source["path"], "tasks": list(ratios), "base": _mean_std(per_seed[0]),
            "other": _mean_std(per_seed[1]),
            "difference": paired_test([100 * v for v in per_seed[1]], [100 * v for v in per_seed[0]])}


def compare_reports(specs: Sequence[str], output_dir: Optional[str] = None) -> dict:
    """Compares two runs (``path[:system]`` each; the second against the first, the base), paired
    by the seeds both ran; writes ``compare.md`` and ``compare.json`` to ``output_dir`` when given.
    ``ValueError`` naming the file when a report cannot be read, lacks the system, shares no seed
    with the other or was scored on other held-out rows."""
    if len(specs) != 2:
        raise ValueError(f"--compare takes two runs (BASE OTHER), got {len(specs)}")
    base, other = (_side(spec) for spec in specs)
    seeds = sorted(base["runs"].keys() & other["runs"].keys())
    if not seeds:
        raise ValueError(f"{base['path']!r} ({base['system']}: seeds {sorted(base['runs'])}) and {other['path']!r} "
                         f"({other['system']}: seeds {sorted(other['runs'])}) share no seed to pair")
    info = _task_info(base)
    names = [n for n in base["runs"][seeds[0]]["tasks"] if n in other["runs"][seeds[0]]["tasks"]]
    _check_same_rows(base, other, names)
    rows = {n: row for n in names if (row := _task_row(n, info.get(n, {}), seeds, base, other)) is not None}
    classification = [n for n, row in rows.items() if row["classification"]]
    mean = {}
    if classification:
        per_seed = {side: [statistics.fmean(rows[n][side]["values"][i] for n in classification)
                           for i in range(len(seeds))] for side in ("base", "other")}
        mean = {"tasks": classification, "base": _mean_std(per_seed["base"]), "other": _mean_std(per_seed["other"]),
                "difference": paired_test([100 * v for v in per_seed["other"]], [100 * v for v in per_seed["base"]])}
    result = {
        "base": {"path": base["path"], "system": base["system"]},
        "other": {"path": other["path"], "system": other["system"]},
        "seeds": seeds, "settings_changed": settings_changed(base["report"]["config"], other["report"]["config"]),
        "tasks": rows,
        "classification_mean": mean, "relative_mean": _relative_mean(base, other, rows),
        "reach_95pct_of_classical": {side: _reaching(rows, base["report"]["classical"], side)
                                     for side in ("base", "other")},
        "reach_95pct_of_classical_on_every_seed": {side: _reaching(rows, base["report"]["classical"], side, True)
                                                   for side in ("base", "other")},
    }
    if output_dir is not None:
        write_files(result, output_dir, "compare", compare_markdown(result))
    return result


def _value(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if len(entry["values"]) > 1 else f"{entry['mean']:.3f}"


def _p(test: dict) -> str:
    return "–" if test["p_value"] is None else f"{test['p_value']:.2g}"


def compare_markdown(result: dict) -> str:
    """The comparison as Markdown: what differs, a table per task, the mean and the 95% counts."""
    base, other = (f"{result[k]['system']} ({result[k]['path']})" for k in ("base", "other"))
    changed = result["settings_changed"]
    lines = [f"# {other} against {base}", "",
             f"Paired by seed: {', '.join(str(s) for s in result['seeds'])}. Settings that differ: "
             + ("; ".join(f"{k} {json.dumps(a)} → {json.dumps(b)}" for k, (a, b) in changed.items()) or "none") + ".",
             "", "| task | metric | base | other | other − base, per seed | mean | p |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, row in result["tasks"].items():
        test = row["difference"]
        arrow = "" if row["higher_is_better"] else " ↓"
        lines.append(f"| {name} | {row['metric']}{arrow} | {_value(row['base'])} | {_value(row['other'])} | "
                     f"{', '.join(f'{d:+.3f}' for d in test['points'])} | {test['mean']:+.3f} | {_p(test)} |")
    mean, relative = result["classification_mean"], result["relative_mean"]
    for label, entry in ((f"mean of {len(mean.get('tasks', []))} classification tasks", mean),
                         (f"mean relative score, {len(relative.get('tasks', []))} learned tasks", relative)):
        if entry:
            test = entry["difference"]
            points = ", ".join(f"{d:+.1f}" for d in test["points"])
            lines.append(f"| {label} | | {_value(entry['base'])} | {_value(entry['other'])} | {points} points | "
                         f"{test['mean']:+.1f} | {_p(test)} |")
    up = [n for n, row in result["tasks"].items() if row["better_on_every_seed"]]
    down = [n for n, row in result["tasks"].items() if row["worse_on_every_seed"]]
    reach = result["reach_95pct_of_classical"]
    if relative:
        lines += ["", f"Relative scores are to the specialists of {relative['specialists_from']} (their seed mean), "
                      f"over the tasks they learned: {', '.join(relative['tasks'])}."]
    lines += ["", f"- Better on every seed: {', '.join(up) or 'none'}; worse on every seed: "
                  f"{', '.join(down) or 'none'}.",
              f"- At ≥ 95% of the best classical score: base {len(reach['base'])}, other {len(reach['other'])}"
              f" (only base: {', '.join(sorted(set(reach['base']) - set(reach['other']))) or 'none'}; only other: "
              f"{', '.join(sorted(set(reach['other']) - set(reach['base']))) or 'none'})."]
    every = result.get("reach_95pct_of_classical_on_every_seed")
    if every and len(result["seeds"]) > 1:
        lines.append(f"- … on every seed: base {len(every['base'])}, other {len(every['other'])}.")
    return "\n".join(lines) + "\n"
