"""The transfer benchmark (``moe_gen.quality.transfer``, ``scripts/bench_transfer.py``): what it
aggregates, on made-up runs, the settings it refuses, and the shape of a --quick report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import pytest

from moe_gen.quality.suite import SUITE
from moe_gen.quality.transfer import (
    TransferConfig,
    _counted,
    _retained,
    build_transfer_report,
    finetuning_mixture,
    merge_transfer_reports,
    transfer_markdown,
    write_transfer_report,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_retained_share_counts_learned_tasks_and_inverts_losses():
    before = {"a": 0.8, "unlearned": 0.05, "loss": 0.5}
    after = {"a": 0.4, "unlearned": 0.0, "loss": 1.0}
    suite = {name: types.SimpleNamespace(metric=metric, higher_is_better=metric != "l1")
             for name, metric in (("a", "accuracy"), ("unlearned", "accuracy"), ("loss", "l1"))}
    kept = _counted([{"before": before, "after": {"held": after}}], "held", suite)
    # a keeps half its accuracy; the loss doubled, so it keeps half too; the unlearned task is not counted
    assert kept == ["a", "loss"] and _retained(before, after, suite, kept) == pytest.approx(0.5)


def test_a_percent_metric_counts_as_learned_by_its_range():
    """ROUGE-L, BLEU and chrF run 0-100: a specialist at 0.5 (0.5%) had passed the 0.1 floor."""
    suite = {"summary": types.SimpleNamespace(metric="rouge_l", higher_is_better=True),
             "a": types.SimpleNamespace(metric="accuracy", higher_is_better=True)}
    before, after = {"summary": 0.5, "a": 0.8}, {"summary": 5.0, "a": 0.8}
    kept = _counted([{"before": before, "after": {"held": after}}], "held", suite)
    assert kept == ["a"] and _retained(before, after, suite, kept) == pytest.approx(1.0)


def test_every_system_and_seed_keeps_its_share_of_the_same_tasks():
    """Attribute had learned counting before fine-tuning and dense had not: attribute's share averaged
    a task it then forgot, dense's did not, and attribute came out 50 points worse at keeping what it
    knew under a line naming dense's one task."""
    cfg = TransferConfig(held=("table_wine",), systems=("dense", "attribute"), seeds=(0, 1), finetune_steps=(10,))
    after = {"table_wine": {"digit_classification": 0.9, "digit_counting": 0.0, "text_to_speech": 0.0}}
    results = [_run(system, seed, {"table_wine": {"10": 0.5}},
                    {"digit_classification": 0.9, "digit_counting": counting, "text_to_speech": 0.5}, after)
               for system, counting in (("dense", 0.05), ("attribute", 0.8)) for seed in (0, 1)]
    report = build_transfer_report(cfg, results, wall_seconds=1.0)
    retained = report["retained"]["table_wine"]
    # text_to_speech has no error after fine-tuning: no ratio, so no system counts it either
    assert retained["dense"]["tasks"] == retained["attribute"]["tasks"] == ["digit_classification"]
    assert retained["attribute"]["mean"] == retained["dense"]["mean"] == pytest.approx(1.0)
    assert retained["attribute_minus_dense"]["points"] == pytest.approx([0.0, 0.0])
    assert ("mean over the 1 tasks that every system and seed scored ≥ 0.1 of their metric's range on before "
            "fine-tuning: digit_classification): dense 1.000 ± 0.000, attribute 1.000 ± 0.000;") in transfer_markdown(
        report)
    unlearned = [{**r, "before": {**r["before"], "digit_classification": 0.05}} for r in results]
    report = build_transfer_report(cfg, unlearned, wall_seconds=1.0)
    assert report["retained"]["table_wine"]["dense"] is None and "| digit_counting |" in transfer_markdown(report)
    assert "no pretraining task scored ≥ 0.1 of its metric's range before on every system and seed" in (
        transfer_markdown(report))


def _run(system, seed, finetuned, before=None, after=None):
    run = {"system": system, "seed": seed, "finetuned": finetuned, "seconds": 1.0}
    if before is not None:
        run.update(before=before, after=after)
    return run


def test_report_pairs_each_generalist_with_the_specialist_by_seed():
    cfg = TransferConfig(held=("table_wine",), systems=("dense", "attribute"), seeds=(0, 1), finetune_steps=(10, 20))
    before = {"digit_classification": 0.9, "text_to_speech": 0.5}
    results = [
        _run("specialist", 0, {"table_wine": {"10": 0.25, "20": 0.5}}),
        _run("specialist", 1, {"table_wine": {"10": 0.5, "20": 0.75}}),
        _run("dense", 0, {"table_wine": {"10": 0.5, "20": 0.75}}, before,
             {"table_wine": {"digit_classification": 0.45, "text_to_speech": 0.5}}),
        _run("dense", 1, {"table_wine": {"10": 0.75, "20": 1.0}}, before,
             {"table_wine": {"digit_classification": 0.90, "text_to_speech": 1.0}}),
        _run("attribute", 0, {"table_wine": {"10": 0.75, "20": 0.875}}, before,
             {"table_wine": {"digit_classification": 0.90, "text_to_speech": 0.5}}),
        _run("attribute", 1, {"table_wine": {"10": 1.0, "20": 0.875}}, before,
             {"table_wine": {"digit_classification": 0.90, "text_to_speech": 0.5}}),
    ]
    report = build_transfer_report(cfg, results, wall_seconds=60.0)
    assert report["systems"] == ["specialist", "dense", "attribute"] and report["budgets"] == ["10", "20"]
    assert report["scores"]["table_wine"]["attribute"]["10"]["mean"] == pytest.approx(0.875)
    dense_10 = report["versus_scratch"]["table_wine"]["dense"]["10"]
    assert dense_10["points"] == pytest.approx([25.0, 25.0]) and dense_10["p_value"] is None  # no spread
    assert report["versus_scratch"]["table_wine"]["attribute"]["20"]["points"] == pytest.approx([37.5, 12.5])
    retained = report["retained"]["table_wine"]
    # dense: seed 0 keeps (0.5 + 1) / 2 = 0.75, seed 1 (1 + 0.5) / 2 = 0.75; attribute keeps all
    assert retained["dense"]["values"] == pytest.approx([0.75, 0.75]) and retained["attribute"]["mean"] == 1.0
    assert retained["dense"]["tasks"] == ["digit_classification", "text_to_speech"]
    assert retained["attribute_minus_dense"]["points"] == pytest.approx([25.0, 25.0])
    changes = report["changes"]["table_wine"]["dense"]
    assert changes["digit_classification"]["mean"] == pytest.approx(-0.225)
    markdown = transfer_markdown(report)
    assert "| 10 | 0.375 ± 0.177 | 0.625 ± 0.177 (+25.0) | 0.875 ± 0.177 (+50.0) |" in markdown  # sample std
    assert "attribute − dense +25.0 points paired by seed" in markdown


def test_replay_variant_is_paired_with_the_same_system_without_replay():
    cfg = TransferConfig(held=("table_wine",), systems=("dense",), seeds=(0, 1), finetune_steps=(10, 20),
                         replay=(0.0, 0.25))
    before = {"digit_classification": 0.8, "text_to_speech": 0.5}
    results = [
        _run("dense", 0, {"table_wine": {"10": 0.5, "20": 0.75}}, before,
             {"table_wine": {"digit_classification": 0.4, "text_to_speech": 0.5}}),
        _run("dense", 1, {"table_wine": {"10": 0.75, "20": 1.0}}, before,
             {"table_wine": {"digit_classification": 0.4, "text_to_speech": 0.5}}),
        _run("dense replay 0.25", 0, {"table_wine": {"10": 0.25, "20": 0.75}}, before,
             {"table_wine": {"digit_classification": 0.8, "text_to_speech": 0.5}}),
        _run("dense replay 0.25", 1, {"table_wine": {"10": 0.75, "20": 0.875}}, before,
             {"table_wine": {"digit_classification": 0.6, "text_to_speech": 0.5}}),
    ]
    report = build_transfer_report(cfg, results, wall_seconds=60.0)
    assert report["systems"] == ["dense", "dense replay 0.25"]
    effect = report["replay"]["table_wine"]["dense replay 0.25"]
    assert effect["scores"]["10"]["points"] == pytest.approx([-25.0, 0.0])
    assert effect["scores"]["20"]["points"] == pytest.approx([0.0, -12.5])
    # kept: without replay (0.5 + 1) / 2 = 0.75 on both seeds; with it 1.0 and (0.75 + 1) / 2
    assert effect["retained"]["points"] == pytest.approx([25.0, 12.5])
    assert "- dense replay 0.25 − without replay: held-out score 10 steps -12.5" in transfer_markdown(report)
    weights = finetuning_mixture("table_wine", ["digit_classification", "text_to_speech"], 0.25)
    assert weights == {"table_wine": 0.75, "digit_classification": 0.125, "text_to_speech": 0.125}
    assert finetuning_mixture("table_wine", ["digit_classification"], 0.0) is None


def test_reports_of_other_seeds_and_replay_shares_merge_into_one(tmp_path):
    before = {"digit_classification": 0.8}
    after = {"table_wine": {"digit_classification": 0.4}}
    paths = []
    for seeds, replay in (((0, 1), (0.0,)), ((2,), (0.0, 0.5))):
        cfg = TransferConfig(held=("table_wine",), systems=("dense",), seeds=seeds, finetune_steps=(10,),
                             replay=replay)
        runs = [_run(name, seed, {"table_wine": {"10": 0.5 + seed / 8}}, before, after)
                for seed in seeds for name in ("dense", "dense replay 0.5") if name == "dense" or 0.5 in replay]
        runs += [_run("specialist", seed, {"table_wine": {"10": 0.25}}) for seed in seeds]
        write_transfer_report(build_transfer_report(cfg, runs, wall_seconds=30.0), str(tmp_path / str(len(paths))))
        paths.append(str(tmp_path / str(len(paths)) / "transfer.json"))
    merged = merge_transfer_reports(paths, str(tmp_path / "merged"))
    assert list(merged["config"]["seeds"]) == [0, 1, 2] and list(merged["config"]["replay"]) == [0.0, 0.5]
    assert merged["systems"] == ["specialist", "dense", "dense replay 0.5"]
    assert merged["scores"]["table_wine"]["dense"]["10"]["values"] == pytest.approx([0.5, 0.625, 0.75])
    assert merged["wall_seconds"] == 60.0 and (tmp_path / "merged" / "transfer.md").exists()
    other = TransferConfig(held=("table_wine",), systems=("dense",), seeds=(5,), finetune_steps=(20,))
    runs = [_run("dense", 5, {"table_wine": {"20": 0.5}}, before, after)]
    write_transfer_report(build_transfer_report(other, runs, wall_seconds=1.0), str(tmp_path / "other"))
    with pytest.raises(ValueError, match="finetune_steps"):
        merge_transfer_reports([paths[0], str(tmp_path / "other" / "transfer.json")], str(tmp_path / "bad"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not a readable transfer.json"):
        merge_transfer_reports([paths[0], str(tmp_path / "broken.json")], str(tmp_path / "bad"))


def test_markdown_of_one_seed_names_the_largest_budget_replay_and_a_lower_is_better_task():
    cfg = TransferConfig(held=("text_to_speech",), systems=("dense",), seeds=(0,), finetune_steps=(10, 20),
                         replay=(0.0, 0.5))
    before, after = {"digit_classification": 0.8}, {"text_to_speech": {"digit_classification": 0.4}}
    results = [_run("specialist", 0, {"text_to_speech": {"10": 0.5, "20": 0.25}}),
               _run("dense", 0, {"text_to_speech": {"10": 0.25, "20": 0.125}}, before, after),
               _run("dense replay 0.5", 0, {"text_to_speech": {"10": 0.375, "20": 0.25}}, before, after)]
    report = build_transfer_report(cfg, results, wall_seconds=60.0)
    # the specialist is the baseline, not a system compared with itself; replay 0 is no replay variant
    assert set(report["versus_scratch"]["text_to_speech"]) == {"dense", "dense replay 0.5"}
    assert set(report["replay"]["text_to_speech"]) == {"dense replay 0.5"}
    markdown = transfer_markdown(report)
    assert "### text_to_speech ↓" in markdown  # lower is better
    rows = [line for line in markdown.splitlines() if line.startswith(("| 10 |", "| 20 |"))]
    assert rows[0].startswith("| 10 | 0.500 | 0.250 (") and "±" not in "".join(rows)  # one seed: no spread to show
    assert "(trainable: all; and again with 0.5 of each batch's samples replayed from the pretraining tasks)" in (
        markdown)
    assert "Pretraining tasks' scores kept after 20 steps on text_to_speech alone" in markdown


def test_merging_refuses_one_report_conflicting_runs_and_other_settings_naming_the_files(tmp_path):
    before, after = {"digit_classification": 0.8}, {"table_wine": {"digit_classification": 0.4}}

    def written(name, seeds, score=0.5, steps=4000):
        cfg = TransferConfig(held=("table_wine",), systems=("dense",), seeds=seeds, finetune_steps=(10,), steps=steps)
        runs = [_run("dense", seed, {"table_wine": {"10": score}}, before, after) for seed in seeds]
        runs += [_run("specialist", seed, {"table_wine": {"10": 0.25}}) for seed in seeds]
        write_transfer_report(build_transfer_report(cfg, runs, wall_seconds=1.0), str(tmp_path / name))
        return str(tmp_path / name / "transfer.json")

    late, early = written("late", (2,)), written("early", (0, 1))
    merged = merge_transfer_reports([late, early], str(tmp_path / "merged"))
    assert list(merged["config"]["seeds"]) == [0, 1, 2] and "over seeds 0, 1, 2;" in transfer_markdown(merged)
    with pytest.raises(ValueError, match="merging needs at least two reports, got 1"):
        merge_transfer_reports([late], str(tmp_path / "one"))
    other = written("other", (2,), score=0.75)
    with pytest.raises(ValueError, match=re.escape(f"{other!r} and {late!r} hold different dense runs of seed 2")):
        merge_transfer_reports([late, other], str(tmp_path / "conflict"))
    short = written("short", (3,), steps=10)
    with pytest.raises(ValueError, match=re.escape(f"{short!r} was made with other settings: steps 4000 in "
                                                   f"{late!r}, 10 here")):
        merge_transfer_reports([late, short], str(tmp_path / "steps"))


@pytest.mark.parametrize("fields, message", [
    ({"held": ("no_such_task",)}, "TransferConfig.held"),
    ({"held": tuple(t.name for t in SUITE)}, "at least one suite task must remain"),
    ({"systems": ("gpt",)}, "TransferConfig.systems"),
    ({"finetune_steps": (50, 10)}, "ascending"),
    ({"finetune_steps": (0, 10)}, ">= 1"),
    ({"finetune_steps": (10, 10)}, "ascending distinct step counts"),
    ({"trainable": "everything"}, "TransferConfig.trainable"),
    ({"trainable": "experts"}, "leaves the dense system nothing to train"),
    ({"trainable": "routers"}, "trainable='routers' leaves the dense system nothing to train"),
    ({"replay": (1.0,)}, "TransferConfig.replay"),
    ({"replay": (-0.25,)}, "TransferConfig.replay"),
    ({"steps": 0}, r"needs seeds and steps >= 1, got seeds \[0, 1, 2\], steps 0"),
    ({"replay": (0.25, 0.25)}, "TransferConfig.replay"),
    ({"replay": ()}, "TransferConfig.replay"),
    ({"eval_limit": 0}, "TransferConfig.eval_limit must be >= 1"),
    ({"seeds": (1, 1)}, "TransferConfig.seeds names 1 more than once"),
    ({"held": ("table_wine", "table_wine")}, "TransferConfig.held names table_wine more than once"),
    ({"systems": ("dense", "attribute", "dense")}, "TransferConfig.systems names dense more than once"),
])
def test_config_refuses_what_it_cannot_run(fields, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**fields)


def test_quick_transfer_report_shape(tmp_path):
    out = tmp_path / "transfer"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = os.path.join(ROOT, "scripts", "bench_transfer.py")
    run = subprocess.run([sys.executable, script, "--quick", "--workers", "1", "--replay", "0", "0.5",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "transfer.json").read_text())
    held = ["table_wine", "digit_counting"]
    pretraining = [t.name for t in SUITE if t.name not in held]
    assert report["config"]["held"] == held and report["budgets"] == ["2", "4"]
    generalists = ["dense", "dense replay 0.5", "attribute", "attribute replay 0.5"]
    assert report["systems"] == ["specialist", *generalists]
    for name in held:
        for system in report["systems"]:
            assert set(report["scores"][name][system]) == {"2", "4"}, (name, system)
        assert set(report["replay"][name]) == {"dense replay 0.5", "attribute replay 0.5"}
        for system in generalists:
            assert set(report["changes"][name][system]) == set(pretraining)
            assert report["retained"][name][system]["values"], (name, system)
    for r in report["runs"]:
        if r["system"] != "specialist":
            assert set(r["before"]) == set(pretraining) and set(r["after"]) == set(held)
    markdown = (out / "transfer.md").read_text()
    assert "### table_wine" in markdown and "### digit_counting" in markdown
    assert (out / "transfer.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, script, "--held", "nope", "--out", str(out)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "TransferConfig.held" in bad.stderr


def test_finetuning_the_experts_alone_leaves_every_other_weight_as_it_was():
    # what --trainable experts relies on: the benchmark's training step passes it to the trainer
    import torch

    from moe_gen.model import GeneralistModel
    from moe_gen.quality.runner import _fit, _model_config
    from moe_gen.quality.suite import suite_tasks
    from moe_gen.tasks import Tokenizer

    cfg = TransferConfig(held=("table_wine",), systems=("attribute",), steps=4, batch_size=4, warmup_steps=1)
    train = [suite_tasks(["table_species"])[0].build("train")]
    torch.manual_seed(0)
    model = GeneralistModel.build(_model_config(cfg.bench(4), "attribute"), train, Tokenizer.default())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tuned, _, _ = _fit(cfg.bench(4), model, train, 4, seed=0, trainable="experts")
    changed = {name for name, p in tuned.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".experts." in name for name in changed), sorted(changed)


def test_a_job_finetunes_copies_of_one_pretrained_model_and_scores_after_the_largest_budget(monkeypatch):
    """``transfer_job`` with model building, training and scoring replaced by a model that counts the
    steps it trained (its score on any task): every budget starts again from the pretrained model,
    the pretraining tasks are scored after the largest budget, fine-tuning trains what ``trainable``
    names, replay mixes in the pretraining tasks, and each specialist is built under its seed."""
    import torch

    import moe_gen.model
    import moe_gen.quality.runner as runner
    import moe_gen.tasks
    import moe_gen.trainer.evaluation
    from moe_gen.quality import transfer

    built, fits = [], []

    class Counting:
        def __init__(self, system):
            self.system, self.steps = system, 0

    def build(config, tasks, tokenizer):
        built.append((config, torch.initial_seed()))
        return Counting(config)

    def fit(bench, model, tasks, steps, seed, trainable="all", task_weights=None):
        model.steps += steps
        fits.append((model.system, steps, trainable, list(tasks), task_weights))
        return model, None, None

    names = ["table_wine", "digit_classification", "table_species"]
    suite = [t for t in SUITE if t.name in names]
    monkeypatch.setattr(transfer, "_suite_splits", lambda cfg: (suite, {n: n for n in names}, {n: n for n in names}))
    monkeypatch.setattr(moe_gen.model.GeneralistModel, "build", staticmethod(build))
    monkeypatch.setattr(moe_gen.tasks.Tokenizer, "default", staticmethod(lambda: None))
    monkeypatch.setattr(runner, "_model_config", lambda bench, system: system)
    monkeypatch.setattr(runner, "_fit", fit)
    monkeypatch.setattr(moe_gen.trainer.evaluation, "evaluate_task", lambda model, task: {"accuracy": model.steps})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cfg = TransferConfig(held=("table_wine",), systems=("attribute",), seeds=(3,), steps=100, finetune_steps=(2, 4),
                         trainable="experts", replay=(0.0, 0.5))
    config = dataclasses.asdict(cfg)

    plain, replayed = transfer.transfer_job({"config": config, "system": "attribute", "seed": 3})
    assert plain["before"] == {"digit_classification": 100, "table_species": 100}
    assert plain["finetuned"] == replayed["finetuned"] == {"table_wine": {"2": 102, "4": 104}}
    assert plain["after"] == {"table_wine": {"digit_classification": 104, "table_species": 104}}
    assert replayed["system"] == "attribute replay 0.5" and built == [("attribute", 3)]
    finetuning = fits[1:]
    assert all(trainable == "experts" for _, _, trainable, _, _ in finetuning)
    assert [tasks for _, _, _, tasks, _ in finetuning] == [["table_wine"]] * 2 + [names] * 2
    assert finetuning[-1][4] == {"table_wine": 0.5, "digit_classification": 0.25, "table_species": 0.25}

    built.clear()
    (specialist,) = transfer.transfer_job({"config": config, "system": "specialist", "seed": 3})
    assert specialist["finetuned"] == {"table_wine": {"2": 2, "4": 4}} and built == [("specialist", 3)] * 2
    jobs = [(job["system"], job["seed"]) for job in transfer._jobs(dataclasses.replace(cfg, seeds=(0, 1)))]
    assert jobs == [("attribute", 0), ("attribute", 1), ("specialist", 0), ("specialist", 1)]
