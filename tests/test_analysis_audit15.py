"""Defects a fifteenth audit found in the routing analysis (``moe-gen analyze``): the
masked settings a masked task is collated with, interference over the parameters ``requires_grad``
happened to mark, undefined interference cosines counted as zeros, per-task batches under routing
that depends on the batch, modality load pooled over layers, and ``--compare`` refusing late."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moe_gen.analysis import RoutingRecorder, report
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, load_preset

MASKED = "digit_masked_modeling"
# the image_generation recipe's settings (moe_gen.trainer.recipes)
RECIPE = {"masked_input_budget": 12, "masked_target_budget": 8, "masked_alpha": {"IMAGE": 1.0, "TEXT": 0.1}}


@pytest.fixture(scope="module")
def masked_model():
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug", moe={"router": "attribute", "top_k": 1}),
                                 [load_preset(MASKED, "test")], Tokenizer.default()).eval()  # every label known


def test_a_masked_task_is_analysed_with_the_masked_settings_it_trained_with(masked_model):
    """analyze collated a masked task with MaskedObjective's defaults (budgets 128 + 128, α 0.5): a
    model trained with the image_generation recipe's 12 + 8 was recorded on 136 encoder tokens
    instead of 96, and its loss was another task's."""
    from moe_gen.objectives import GenerativeObjective, MaskedObjective
    from moe_gen.trainer.config import TrainConfig

    test = load_preset(MASKED, "test")
    analysis = report.analyze(masked_model, [test], limit=8, interference_rows=2, **RECIPE)
    objective = MaskedObjective.from_train_config(masked_model, TrainConfig(**RECIPE))
    batch = objective.prepare(report._samples(masked_model, test, 8), random.Random(0))
    with RoutingRecorder(masked_model) as recorder, torch.no_grad():
        loss = GenerativeObjective(masked_model, label_smoothing=0.0)(batch)["token_loss"]
    torch.testing.assert_close(analysis.tables.counts_LETMR, recorder.tables().counts_LETMR)
    assert analysis.evaluation[MASKED]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert analysis.masking == {"tasks": [MASKED], "settings": {**RECIPE, "masked_target_alpha": None},
                                "defaults": []}
    default = r"default masked_input_budget=128, masked_target_budget=128, masked_alpha=0.5"
    with pytest.warns(UserWarning, match=r"masked tasks \['digit_masked_modeling'\] are analysed with TrainConfig's "
                      + default):
        defaults = report.analyze(masked_model, [test], limit=8, interference_rows=0)
    assert defaults.masking["defaults"] == ["masked_input_budget", "masked_target_budget", "masked_alpha"]
    with pytest.raises(ValueError, match=r"masked_alpha names unknown modalities \['IMAGES'\]"):
        report.analyze(masked_model, [test], limit=8, masked_alpha={"IMAGES": 1.0})


def test_the_command_reads_the_masked_settings_of_the_run_that_wrote_the_model(tmp_path, capsys):
    """``moe-gen analyze RUN/model`` takes the masked settings from the run's saved TrainConfig (its
    latest checkpoint's trainer.json); a flag overrides one; a model saved outside a run directory
    gets TrainConfig's defaults, which its report says."""
    import shutil

    from moe_gen.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--config", "debug", "--tasks", MASKED, "--output", str(run), "--train.steps", "1",
                 "--train.eval_limit", "2", "--train.tensorboard", "false", "--train.masked_input_budget", "12",
                 "--train.masked_target_budget", "8", "--train.masked_alpha", "{IMAGE: 1.0, TEXT: 0.1}"]) == 0

    def masking(model_dir, *flags):
        out = tmp_path / "out"
        assert main(["analyze", str(model_dir), "--tasks", MASKED, "--out", str(out), "--limit", "4",
                     "--interference-rows", "0", *flags]) == 0
        return json.loads((out / "routing.json").read_text())["masking"], (out / "report.md").read_text()

    saved, text = masking(run / "model")
    assert saved["settings"] == {**RECIPE, "masked_target_alpha": None} and saved["defaults"] == []
    assert "masked with masked_input_budget=12, masked_target_budget=8" in text and "Warning" not in text
    trainer_json = run / "checkpoints" / "step-0000001" / "trainer.json"
    assert f"masked settings read from {trainer_json}" in capsys.readouterr().out
    flagged, _ = masking(run / "model", "--masked-target-budget", "4", "--masked-target-alpha", "{IMAGE: 2.0}")
    assert flagged["settings"] == {**RECIPE, "masked_target_budget": 4, "masked_target_alpha": {"IMAGE": 2.0}}
    shutil.copytree(run / "model", tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="analysed with TrainConfig's default"):
        alone, text = masking(tmp_path / "elsewhere")
    assert alone["defaults"] == ["masked_input_budget", "masked_target_budget", "masked_alpha"]
    assert "**Warning:** masked_input_budget, masked_target_budget, masked_alpha were not given" in text


@pytest.fixture(scope="module")
def two_tasks():
    tests = [load_preset(name, "test") for name in ("digit_classification", "table_species")]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", moe={"router": "attribute"}), tests, Tokenizer.default())
    return model, tests


def test_interference_takes_the_shared_parameters_whatever_requires_grad_says(two_tasks, monkeypatch):
    """Interference took gradients of the parameters marked requires_grad only: after fine-tuning
    with trainable="experts" the same weights gave another matrix (-0.026 against -0.0004), and
    after trainable="adapters", or on a merge_for_inference copy, analyze failed with "no trainable
    parameters" once every row was recorded."""
    import copy

    from moe_gen.moe import merge_for_inference
    from moe_gen.trainer.trainer import select_trainable

    model, tests = two_tasks
    full = report.task_interference(model, tests, 4)
    for trainable in ("experts", "adapters"):
        tuned = copy.deepcopy(model)
        select_trainable(tuned, trainable)
        flags = [p.requires_grad for p in tuned.parameters()]
        part = report.task_interference(tuned, tests, 4)
        torch.testing.assert_close(part["matrix"], full["matrix"], msg=trainable)
        torch.testing.assert_close(part["norms"], full["norms"], msg=trainable)
        assert [p.requires_grad for p in tuned.parameters()] == flags  # put back
    merged = merge_for_inference(model)
    assert report.analyze(merged, tests, limit=2, interference_rows=0).interference is None
    monkeypatch.setattr(report, "_samples", lambda *a: pytest.fail("recorded rows before refusing"))
    with pytest.raises(ValueError, match=r"analyze: MoE layers encoder.blocks.0.ffn, .* are frozen for inference "
                                         r"\(merge_for_inference\).*\(interference_rows=0, --interference-rows 0\)"):
        report.analyze(merged, tests, limit=2)


def test_an_undefined_interference_cosine_is_neither_a_zero_nor_counted(tmp_path):
    """A task whose loss has a zero gradient (every row the one label the model knows) has no cosine
    with any task: the matrix showed 0 there and the key numbers averaged those zeros in (0.042 for
    the one measured pair's 0.127; with two tasks 0 and 0 instead of a dash)."""
    import warnings

    torch.manual_seed(0)
    names = ("digit_classification", "motion_classification", "table_species")
    train = [load_preset(name, "test") for name in names[:2]] + [load_preset("table_species", "train", limit=10)]
    model = GeneralistModel.build(flavour("debug"), train, Tokenizer.default())  # one species only
    tests = [load_preset(name, "test") for name in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the rows of the species it never saw are left out)
        three = report.analyze(model, tests, limit=8, interference_rows=8)
        two = report.analyze(model, tests[1:], limit=8, interference_rows=8)
    matrix = three.interference["matrix"]
    assert three.interference["norms"][2] == 0 and matrix[2].isnan().all() and matrix[:, 2].isnan().all()
    measured = float(matrix[0, 1])
    assert not matrix[:2, :2].isnan().any() and measured != 0
    keys = report.key_numbers(three)
    assert keys["mean interference (off-diagonal)"] == pytest.approx(measured)
    assert keys["most negative interference"] == pytest.approx(measured)
    keys = report.key_numbers(two)
    assert keys["mean interference (off-diagonal)"] == "–" and keys["most negative interference"] == "–"
    report.write_report(three, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "| table_species | – | – | – |" in text and "its cosines are undefined (–)" in text
    saved = json.loads((tmp_path / "routing.json").read_text())["interference"]["matrix"]
    assert saved[2] == [None, None, None] and saved[0][1] == pytest.approx(measured)
    assert (tmp_path / "interference.png").is_file()


def test_rows_of_the_tasks_share_batches_where_routing_depends_on_the_batch():
    """Forward mode batched each task's rows alone: under the expert-choice gate every expert took
    its share of every task, so MI(expert; task) was exactly 0 whatever the model learned, and with a
    capacity factor drops and loss changed with the batch size. Where routing depends on the batch,
    the tasks' rows now share batches (as training mixes them) and are counted by task."""
    from moe_gen.tasks import collate

    tests = [load_preset(name, "test") for name in ("digit_classification", "table_species")]
    built = {}
    for name, moe in (("expert_choice", {"router": {"strategy": "token", "gate": "expert_choice"}}),
                      ("capacity", {"capacity_factor": 1.0}), ("dropless", {})):
        torch.manual_seed(0)
        built[name] = GeneralistModel.build(flavour("debug", moe=moe), tests, Tokenizer.default()).eval()
    model = built["expert_choice"]
    analysis = report.analyze(model, tests, limit=16, batch_size=32, interference_rows=0)
    first, second = (report._samples(model, task, 16) for task in tests)
    with RoutingRecorder(model) as recorder, torch.no_grad():  # one batch, the tasks' rows alternating
        model(collate([s for pair in zip(first, second) for s in pair], model.tokenizer, model.task_ids,
                      modality_ids=model.modality_ids))
    torch.testing.assert_close(analysis.tables.counts_LETMR, recorder.tables().counts_LETMR)
    assert min(analysis.summary["mi_task_bits"]) > 0  # was 0.0 in every layer
    assert analysis.batch_dependent == [f"{name}: gate expert_choice" for name in analysis.tables.layer_names]
    capacity = report.analyze(built["capacity"], tests, limit=4, interference_rows=0)
    assert capacity.batch_dependent[0] == "encoder.blocks.0.ffn: capacity_factor 1.0"
    assert "Routing depends on the batch in 4 MoE layers (capacity_factor 1.0)" in "\n".join(report._header(capacity))
    dropless = report.analyze(built["dropless"], tests, limit=4, interference_rows=0)
    assert dropless.batch_dependent == [] and "Routing is per token" in "\n".join(report._header(dropless))


def test_a_batch_of_several_tasks_gives_each_task_its_own_loss():
    """The held-out loss of a task is the same from batches of its own rows and from batches shared
    with another task's rows (token and frame targets), where routing is per token."""
    tests = [load_preset(name, "test") for name in ("text_to_motion", "digit_classification")]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tests, Tokenizer.default()).eval()
    samples = {task.name: report._samples(model, task, 6) for task in tests}
    with torch.no_grad():
        mixed = report._held_out_losses(model, tests, samples, 4)
        alone = {task.name: report._held_out_losses(model, [task], samples, 4)[task.name] for task in tests}
    for task in tests:
        assert mixed[task.name]["loss"] == pytest.approx(alone[task.name]["loss"], rel=1e-5), task.name


def test_the_modality_plot_shows_each_layer_on_its_own(tmp_path, monkeypatch):
    """modality_load.png split each modality's bar by expert id summed over every MoE layer, though
    expert ids of different layers are unrelated: under modality routing (top-1), which sends a
    modality to one expert per layer, TEXT was drawn spread over three experts."""
    from moe_gen.analysis import plots, stats

    names = ("digit_classification", "table_species", "motion_classification")
    tests = [load_preset(name, "test") for name in names]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", moe={"router": "modality", "top_k": 1}), tests, Tokenizer.default())
    analysis = report.analyze(model, tests, limit=8, interference_rows=0)
    drawn = {}
    original = plots.plot_expert_heatmaps

    def spy(share_LGE, layer_names, group_names, path, **kwargs):
        drawn[kwargs.get("title", "tasks")] = (share_LGE, list(group_names))
        return original(share_LGE, layer_names, group_names, path, **kwargs)

    monkeypatch.setattr(plots, "plot_expert_heatmaps", spy)
    files = report.write_report(analysis, str(tmp_path))
    share_LME, modalities = drawn["share of each modality's assignments per expert"]
    t = analysis.tables
    columns = [t.modality_names.index(name) for name in modalities]
    assert {"TEXT", "IMAGE", "MOTION", "STRUCT"} <= set(modalities)
    expected = stats.group_load(t.counts_LETMR, "modality")[:, columns].numpy()
    assert share_LME.shape == (len(t.layer_names), len(modalities), 4) and (share_LME == expected).all()
    for layer in range(len(t.layer_names)):
        for m, column in enumerate(columns):
            if t.tokens_LTMR[layer, :, column].sum() > 0:  # every layer sends a modality to one expert
                assert sorted(share_LME[layer, m].tolist())[-1] == 1.0, (t.layer_names[layer], modalities[m])
    assert files["modality_load"].endswith("modality_load.png") and "## Experts by modality" in (
        tmp_path / "report.md").read_text()


def test_compare_checks_both_models_before_recording_and_names_the_one_it_refuses(tmp_path, monkeypatch, capsys):
    """With --compare, a task the second model was not built for was refused only after the first
    model's whole analysis, by "the model was not built for tasks [...]", which did not say which."""
    names = ("digit_classification", "table_species")
    torch.manual_seed(0)
    GeneralistModel.build(flavour("debug"), [load_preset(n, "test") for n in names],
                          Tokenizer.default()).save_pretrained(str(tmp_path / "both"))
    GeneralistModel.build(flavour("debug"), [load_preset("table_species", "test")],
                          Tokenizer.default()).save_pretrained(str(tmp_path / "species"))
    monkeypatch.setattr(report, "_record", lambda *a, **k: pytest.fail("a model was recorded before the refusal"))
    for first, second in (("both", "species"), ("species", "both")):
        code = report.main([str(tmp_path / first), "--tasks", *names, "--out", str(tmp_path / "out"), "--limit", "4",
                            "--compare", str(tmp_path / second)])
        err = capsys.readouterr().err
        assert code == 2 and not (tmp_path / "out").exists()
        role = " (--compare)" if second == "species" else ""
        assert f"{tmp_path / 'species'}{role}: the model was not built for tasks ['digit_classification']" in err
