"""``bench_quality.py --compare``: two runs of the learning-quality benchmark side by side, paired by
seed, on reports written the way ``run_benchmark`` writes them (no model trains here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import load_script
from scipy import stats

from moe_gen.quality.compare import compare_markdown, compare_reports
from moe_gen.quality.runner import BenchConfig

TASKS = [
    {"name": "table_wine", "modality": "STRUCT", "metric": "accuracy", "higher_is_better": True,
     "classification": True},
    {"name": "digit_counting", "modality": "IMAGE", "metric": "accuracy", "higher_is_better": True,
     "classification": True},
    {"name": "text_to_speech", "modality": "PHONE", "metric": "l1", "higher_is_better": False, "classification": False},
]
CLASSICAL = {"table_wine": {"majority": 0.4, "logreg": 1.0, "knn": 0.9},
             "digit_counting": {"majority": 0.37, "logreg": 0.85, "knn": 0.38}}


def _report(path, runs: dict, classical=None, drop=(), scores=None, **settings):
    """A quality.json with ``runs`` ({system: {seed: scores}}) made with BenchConfig(**settings);
    ``scores``: its per-system summary (the specialists' seed means)."""
    config = {k: v for k, v in dataclasses.asdict(BenchConfig(**settings)).items() if k not in drop}
    records = [{"system": system, "seed": seed, "tasks": [t["name"] for t in TASKS], "scores": scores}
               for system, by_seed in runs.items() for seed, scores in by_seed.items()]
    path.write_text(json.dumps({"config": config, "runs": records, "classical": classical or CLASSICAL,
                                "tasks": TASKS, "scores": scores or {}}))
    return str(path)


def _scores(wine, counting, tts):
    return {"table_wine": wine, "digit_counting": counting, "text_to_speech": tts}


BASE = {0: _scores(0.90, 0.80, 0.70), 1: _scores(0.95, 0.70, 0.75), 2: _scores(0.92, 0.84, 0.72)}
OTHER = {0: _scores(0.97, 0.79, 0.65), 1: _scores(1.00, 0.66, 0.71), 2: _scores(0.96, 0.80, 0.70), 3: _scores(1, 1, 0)}


def test_runs_are_paired_by_the_seeds_both_ran_task_by_task_and_over_the_classification_tasks(tmp_path):
    base = _report(tmp_path / "a.json", {"attribute": BASE})
    other = _report(tmp_path / "b.json", {"attribute": OTHER}, sam_rho=0.2, workers=1)
    result = compare_reports([base, other], str(tmp_path / "out"))
    assert result["seeds"] == [0, 1, 2]  # seed 3 ran in one report only
    # what differs: the setting that changes the runs, not how many processes ran them
    assert result["settings_changed"] == {"sam_rho": [0.0, 0.2]}
    wine = result["tasks"]["table_wine"]
    assert wine["difference"]["points"] == pytest.approx([0.07, 0.05, 0.04])
    assert wine["difference"]["p_value"] == pytest.approx(stats.ttest_rel([0.97, 1.0, 0.96], [0.90, 0.95, 0.92]).pvalue)
    assert wine["base"]["mean"] == pytest.approx(0.92333, abs=1e-5) and wine["better_on_every_seed"]
    counting = result["tasks"]["digit_counting"]
    assert counting["difference"]["points"] == pytest.approx([-0.01, -0.04, -0.04]) and counting["worse_on_every_seed"]
    # a lower-is-better metric: the L1 fell on every seed, which is better
    speech = result["tasks"]["text_to_speech"]
    assert speech["difference"]["points"] == pytest.approx([-0.05, -0.04, -0.02])
    assert speech["better_on_every_seed"] and not speech["worse_on_every_seed"]
    # the mean over the classification tasks (not text-to-speech), in points, paired by seed
    mean = result["classification_mean"]
    assert mean["tasks"] == ["table_wine", "digit_counting"]
    assert mean["difference"]["points"] == pytest.approx([3.0, 0.5, 0.0])
    assert mean["base"]["values"] == pytest.approx([0.85, 0.825, 0.88])
    # 95% of the best classical score: wine's bar 1.0 (0.923 short, 0.977 past), counting's 0.85 (0.8075)
    assert result["reach_95pct_of_classical"] == {"base": [], "other": ["table_wine"]}
    text = (tmp_path / "out" / "compare.md").read_text()
    assert text == compare_markdown(result)
    assert "sam_rho 0.0 → 0.2" in text and "| table_wine | accuracy | 0.923 ± 0.025 | 0.977 ± 0.021 |" in text
    assert "| text_to_speech | l1 ↓ |" in text and "| mean of 2 classification tasks |" in text
    assert "Better on every seed: table_wine, text_to_speech; worse on every seed: digit_counting." in text
    assert "base 0, other 1 (only base: none; only other: table_wine)" in text
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["seeds"] == [0, 1, 2]


def test_a_report_of_two_systems_compares_the_systems_named_after_a_colon(tmp_path):
    both = _report(tmp_path / "both.json", {"specialist": {0: _scores(1, 1, 1)}, "dense": BASE, "attribute": OTHER})
    result = compare_reports([f"{both}:dense", f"{both}:attribute"])
    assert (result["base"]["system"], result["other"]["system"]) == ("dense", "attribute")
    assert result["settings_changed"] == {} and result["seeds"] == [0, 1, 2]
    assert result["tasks"]["table_wine"]["difference"]["mean"] == pytest.approx(0.05333, abs=1e-5)
    # one generalist beside the specialists needs no name
    single = _report(tmp_path / "single.json", {"specialist": {0: _scores(1, 1, 1)}, "dense": BASE})
    assert compare_reports([single, f"{both}:attribute"])["base"]["system"] == "dense"
    with pytest.raises(ValueError, match=r"holds the runs of specialist, dense, attribute: name the one to compare"):
        compare_reports([both, single])
    with pytest.raises(ValueError, match=r"single.json' has no token runs \(it holds specialist, dense\)"):
        compare_reports([f"{single}:token", both + ":dense"])


def test_the_mean_relative_score_reads_both_runs_against_one_reports_specialists(tmp_path):
    """Relative to the specialists' seed mean (the base report's, else the other's), over the tasks
    they learned: a specialist below the floor (counting at 0.05) leaves its task out; L1 inverts."""
    base = _report(tmp_path / "a.json", {"dense": BASE})
    specialists = {"table_wine": {"mean": 0.8}, "digit_counting": {"mean": 0.05}, "text_to_speech": {"mean": 0.7}}
    other = _report(tmp_path / "b.json", {"attribute": OTHER}, scores={"specialist": specialists})
    relative = compare_reports([base, other])["relative_mean"]
    assert relative["specialists_from"] == other and relative["tasks"] == ["table_wine", "text_to_speech"]
    expect_base = [(0.90 / 0.8 + 0.7 / 0.70) / 2, (0.95 / 0.8 + 0.7 / 0.75) / 2, (0.92 / 0.8 + 0.7 / 0.72) / 2]
    expect_other = [(0.97 / 0.8 + 0.7 / 0.65) / 2, (1.00 / 0.8 + 0.7 / 0.71) / 2, (0.96 / 0.8 + 0.7 / 0.70) / 2]
    assert relative["base"]["values"] == pytest.approx(expect_base)
    assert relative["difference"]["points"] == pytest.approx([100 * (o - b) for o, b in zip(expect_other, expect_base)])
    assert "| mean relative score, 2 learned tasks |" in compare_markdown(compare_reports([base, other]))
    theirs = {**specialists, "table_wine": {"mean": 1.0}}
    own = _report(tmp_path / "c.json", {"dense": BASE}, scores={"specialist": theirs})
    assert compare_reports([own, other])["relative_mean"]["specialists_from"] == own  # the base's when it has them
    assert compare_reports([base, base])["relative_mean"] == {}  # no specialists anywhere


def test_a_setting_an_older_report_lacks_is_read_at_its_default(tmp_path):
    older = _report(tmp_path / "older.json", {"attribute": BASE}, drop=("sam_rho", "subword_sampling"))
    newer = _report(tmp_path / "newer.json", {"attribute": OTHER}, subword_sampling=0.3)
    assert compare_reports([older, newer])["settings_changed"] == {"subword_sampling": [0.0, 0.3]}


def test_a_report_without_task_descriptions_reads_them_from_the_suite(tmp_path):
    _report(tmp_path / "a.json", {"attribute": BASE})
    older = json.loads((tmp_path / "a.json").read_text())
    del older["tasks"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    result = compare_reports([str(tmp_path / "older.json"), _report(tmp_path / "b.json", {"attribute": OTHER})])
    assert result["classification_mean"]["tasks"] == ["table_wine", "digit_counting"]
    speech = result["tasks"]["text_to_speech"]
    assert (speech["metric"], speech["higher_is_better"], speech["better_on_every_seed"]) == ("l1", False, True)


def test_runs_that_cannot_be_paired_are_refused_naming_the_report(tmp_path):
    base = _report(tmp_path / "a.json", {"attribute": BASE})
    with pytest.raises(ValueError, match=r"share no seed to pair"):
        compare_reports([base, _report(tmp_path / "b.json", {"attribute": {5: _scores(1, 1, 1)}})])
    with pytest.raises(ValueError, match=r"c.json' scored 50 held-out rows per task, .*a.json' 100"):
        compare_reports([base, _report(tmp_path / "c.json", {"attribute": OTHER}, eval_limit=50)])
    other_rows = {**CLASSICAL, "digit_counting": {"majority": 0.3, "logreg": 0.85, "knn": 0.38}}
    with pytest.raises(ValueError, match=r"d.json' has other classical baselines for digit_counting"):
        compare_reports([base, _report(tmp_path / "d.json", {"attribute": OTHER}, classical=other_rows)])
    with pytest.raises(ValueError, match=r"takes two runs \(BASE OTHER\), got 1"):
        compare_reports([base])
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken.json'?: not a readable quality.json"):
        compare_reports([base, str(tmp_path / "broken.json")])


def test_the_command_line_compares_and_refuses_as_a_usage_error(monkeypatch, tmp_path, capsys):
    script = load_script("bench_quality", monkeypatch)
    base = _report(tmp_path / "a.json", {"attribute": BASE})
    other = _report(tmp_path / "b.json", {"attribute": OTHER}, sam_rho=0.2)
    assert script.main(["--compare", base, other, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "out" / "compare.md").read_text() + "\n"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--compare", base, f"{other}:dense"])
    assert exit_info.value.code == 2 and "has no dense runs" in capsys.readouterr().err


def test_the_95_percent_counts_are_also_read_on_every_seed(tmp_path):
    # wine's mean passes its bar (0.95) on both runs, but one seed of the base run does not
    base_runs = {0: _scores(0.99, 0.80, 0.7), 1: _scores(0.93, 0.70, 0.7), 2: _scores(1.00, 0.84, 0.7)}
    other_runs = {0: _scores(0.97, 0.90, 0.7), 1: _scores(0.96, 0.86, 0.7), 2: _scores(1.00, 0.82, 0.7)}
    base = _report(tmp_path / "a.json", {"attribute": base_runs})
    other = _report(tmp_path / "b.json", {"dense": other_runs})
    result = compare_reports([base, other], None)
    assert result["reach_95pct_of_classical"] == {"base": ["table_wine"], "other": ["table_wine", "digit_counting"]}
    assert result["reach_95pct_of_classical_on_every_seed"] == {"base": [], "other": ["table_wine", "digit_counting"]}
    assert "- … on every seed: base 0, other 2." in compare_markdown(result)


def test_specialists_compare_on_every_task_their_runs_of_a_seed_score(tmp_path):
    """A report holds one specialist run per task and seed: ``path:specialist`` joins a seed's runs
    (before the twenty-sixth session's audit the last task's run stood for the seed: one task compared)."""
    records = [{"system": "specialist", "seed": seed, "tasks": [name], "scores": {name: scores[name]}}
               for seed, scores in BASE.items() for name in scores]
    records += [{"system": "attribute", "seed": seed, "tasks": list(scores), "scores": scores}
                for seed, scores in OTHER.items()]
    config = dataclasses.asdict(BenchConfig())
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": config, "runs": records, "classical": CLASSICAL, "tasks": TASKS,
                                "scores": {}}))
    result = compare_reports([f"{path}:specialist", f"{path}:attribute"])
    assert sorted(result["tasks"]) == sorted(t["name"] for t in TASKS)
    assert result["tasks"]["table_wine"]["base"]["values"] == pytest.approx([0.90, 0.95, 0.92])
    assert result["classification_mean"]["tasks"] == ["table_wine", "digit_counting"]
    records.append(dict(records[0]))  # two specialist runs of seed 0 scoring wine
    path.write_text(json.dumps({"config": config, "runs": records, "classical": CLASSICAL, "tasks": TASKS,
                                "scores": {}}))
    with pytest.raises(ValueError, match=r"two specialist runs of seed 0 that score table_wine"):
        compare_reports([f"{path}:specialist", f"{path}:attribute"])
