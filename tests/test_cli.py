"""The ``moe-gen`` command: configuration and overrides, a killed run resumed exactly, eval and infer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_gen.cli import apply_overrides, load_run_config, main
from moe_gen.model import flavour
from moe_gen.trainer import TrainConfig
from moe_gen.trainer.logs import read_jsonl_log

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_dotted_overrides_are_typed_and_nested():
    config = apply_overrides({"train": {"lr": 1.0}}, [
        "--train.lr", "3e-4", "--train.steps", "7", "--train.progress", "false", "--model.moe.router.strategy", "token",
        "--train.modality_budget", "{AUDIO: 600}", "--tasks", "a,b", "--train.betas=[0.9, 0.95]"])
    assert config == {"train": {"lr": 3e-4, "steps": 7, "progress": False, "modality_budget": {"AUDIO": 600},
                                "betas": [0.9, 0.95]},
                      "model": {"moe": {"router": {"strategy": "token"}}}, "tasks": ["a", "b"]}
    with pytest.raises(ValueError, match="needs a value"):
        apply_overrides({}, ["--train.lr"])
    # --tasks takes a b as well as a,b (as eval, finetune and analyze do), and both mixed
    spaced = apply_overrides({}, ["--tasks", "a", "b,c", "--train.steps", "2", "--eval_tasks", "d", "e"])
    assert spaced == {"tasks": ["a", "b", "c"], "train": {"steps": 2}, "eval_tasks": ["d", "e"]}
    assert apply_overrides({}, ["--tasks=a,b", "--eval-tasks=c"]) == {"tasks": ["a", "b"], "eval_tasks": ["c"]}
    from moe_gen.tasks.presets import preset_names  # what finetune, eval and analyze read --tasks with

    assert preset_names(["a,b", " c ", "", "d,,e"]) == ["a", "b", "c", "d", "e"]


def test_recipes_and_yaml_files_load_and_unknown_keys_fail(tmp_path):
    demo = load_run_config("demo")
    assert len(demo.tasks) >= 8 and demo.model["flavour"] == "tiny" and isinstance(demo.train, TrainConfig)
    path = tmp_path / "run.yaml"
    path.write_text("recipe: debug\ntrain:\n  steps: 3\ntasks: [table_species]\n")
    config = load_run_config(str(path), ["--train.lr", "0.01"])
    assert config.train.steps == 3 and config.train.lr == 0.01 and config.tasks == ("table_species",)
    assert config.train.batch_size == 8  # the rest comes from the recipe
    with pytest.raises(ValueError, match="unknown recipe"):
        load_run_config("nope")
    with pytest.raises(ValueError, match="unknown run configuration keys"):
        load_run_config("debug", ["--trian.lr", "1"])


def test_a_misspelt_model_key_is_refused_when_the_run_configuration_loads(tmp_path, monkeypatch):
    """``model: {flavor: tiny}`` in a YAML file, a recipe or a ``--model.flavor`` flag loaded without a
    word: the key was refused only when the run started."""
    from moe_gen.trainer import RunConfig
    from moe_gen.trainer.recipes import RECIPES

    path = tmp_path / "run.yaml"
    path.write_text("recipe: debug\nmodel:\n  flavor: tiny\n")
    misspelt = r"unknown model keys \['flavor'\] \(did you mean 'flavour'\?\); known: .*flavour.*init.*upcycle"
    with pytest.raises(ValueError, match=misspelt):
        load_run_config(str(path))
    with pytest.raises(ValueError, match=misspelt):
        load_run_config("debug", ["--model.flavor", "tiny"])
    monkeypatch.setitem(RECIPES._entries, "misspelt", lambda: RunConfig(model={"flavor": "tiny"}))
    with pytest.raises(ValueError, match=misspelt):
        load_run_config("misspelt")
    with pytest.raises(ValueError, match=r"unknown model keys \['d_modle'\] \(did you mean 'd_model'\?\)"):
        load_run_config("demo-pretrained", ["--model.d_modle", "32"])  # a model.init section too
    # the keys beside ModelConfig's fields (flavour, init, upcycle) and an emptied section still load
    assert load_run_config("debug", ["--model.flavour", "tiny", "--model.d_model", "96"]).model["d_model"] == 96
    assert load_run_config("demo-pretrained", ["--model.upcycle", "{num_experts: 4}"]).model["init"] == "hf:minilm"
    assert load_run_config("debug", ["--model", "null"]).model == {}


def test_yaml_files_and_flags_merge_by_one_rule(tmp_path):
    """A nested key set in YAML keeps its siblings from the recipe, as the same key given as a
    dotted flag does."""
    from moe_gen.cli import _model_config

    recipe = load_run_config("demo")
    router = recipe.model["moe"]["router"]
    assert len(router) > 1  # the demo recipe sets more router keys than the strategy
    path = tmp_path / "run.yaml"
    path.write_text("recipe: demo\nmodel:\n  moe:\n    router:\n      strategy: token\n")
    from_yaml = load_run_config(str(path))
    from_flag = load_run_config("demo", ["--model.moe.router.strategy", "token"])
    assert from_yaml == from_flag
    # a mapping given as a flag merges too (it replaced the section: demo's other router keys and
    # its VIDEO budget were dropped without a word)
    as_mapping = load_run_config("demo", ["--model.moe.router", "{strategy: token}",
                                          "--train.modality_budget", "{AUDIO: 300}"])
    assert as_mapping.model == from_flag.model
    assert as_mapping.train.modality_budget == {**recipe.train.modality_budget, "AUDIO": 300}
    assert len(recipe.train.modality_budget) > 1
    emptied = load_run_config("debug", ["--model", "null", "--model.flavour", "tiny"])
    assert emptied.model == {"flavour": "tiny"}
    assert from_yaml.model["moe"]["router"] == {**router, "strategy": "token"}
    assert from_yaml.model["moe"]["decoder_router"] == recipe.model["moe"]["decoder_router"]
    config = _model_config({"flavour": "debug", "moe": {"router": {"strategy": "task"}, "experts": {"kind": "glu"}}})
    assert config.moe.router.strategy == "task" and config.moe.experts.kind == "glu"
    assert config.moe.router.gate == _model_config({"flavour": "debug"}).moe.router.gate  # siblings kept
    assert config.moe.num_experts == flavour("debug").moe.num_experts


def test_model_configs_saved_with_flat_moe_fields_still_load():
    """Configurations written before the MoE fields moved into ``ModelConfig.moe`` (saved models,
    YAML files) are read into ``moe``; unknown keys are still refused."""
    from moe_gen.model import ModelConfig

    old = {k: v for k, v in flavour("tiny").to_dict().items() if k != "moe"}
    old.update(num_experts=8, top_k=1, expert_hidden=32, moe_every=2, moe_layers=[], moe_attention=False,
               router={"strategy": "attribute"}, decoder_router={"strategy": "hybrid"},
               experts={"kind": "glu"}, capacity_factor=None, backend="merged")
    config = ModelConfig.from_dict(old)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.expert_hidden, config.moe.every) == (8, 1, 32, 2)
    assert config.moe.router.strategy == "attribute" and config.moe.decoder_router == {"strategy": "hybrid"}
    assert config.moe.experts.kind == "glu" and config.moe.backend == "merged"
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MoELayers keys"):
        ModelConfig.from_dict({**config.to_dict(), "moe": {"num_expert": 3}})
    with pytest.raises(ValueError, match="unknown MoELayers keys"):
        flavour("debug", moe={"num_expert": 3})


def test_bad_train_key_is_reported_by_the_command(tmp_path, capsys):
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path), "--train.lrr", "1"])
    assert code == 2 and "unknown TrainConfig keys ['lrr'] (did you mean 'lr'?)" in capsys.readouterr().err
    for args, guess in ((["--config", "dmeo"], "unknown recipe 'dmeo' (did you mean 'demo'?)"),
                        (["--config", "debug", "--model.flavour", "tinyy"], "(did you mean 'tiny'?)"),
                        (["--config", "debug", "--tasks", "digit_clasification"],
                         "(did you mean 'digit_classification'?)"),
                        (["--config", "debug", "--train.xyzzy", "1"], "unknown TrainConfig keys ['xyzzy']; known:")):
        assert main(["pretrain", "--output", str(tmp_path / "x"), *args]) == 2
        assert guess in capsys.readouterr().err


def test_a_folder_named_like_a_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """A run's output folder named after its recipe (``--output debug``) was read as the
    configuration file, so --resume in that directory failed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug").mkdir()
    (tmp_path / "demo-pretrained").mkdir()  # the dashed spelling get_recipe accepts too
    assert load_run_config("demo-pretrained").model["init"] == "hf:minilm"
    from moe_gen.trainer.recipes import get_recipe

    assert load_run_config("debug") == get_recipe("debug")


def test_eval_tasks_the_run_does_not_train_are_refused_before_it_starts(tmp_path, capsys):
    """They were accepted, the whole run trained, then evaluation failed and no model was saved."""
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path / "run"), "--train.steps", "2",
                 "--eval_tasks", "table_species", "table_qa"])
    assert code == 2 and "eval_tasks ['table_qa'] are not trained in this run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("keep_best", "true"), ("patience", "2")])
def test_choosing_a_step_is_refused_since_the_cli_evaluates_on_test_splits(flag, value, tmp_path, capsys):
    """Choosing the step on the rows eval.json reports would report optimistic scores."""
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path / "run"), "--train.steps", "2",
                 "--train.eval_every", "1", f"--train.{flag}", value])
    assert code == 2 and f"train.{flag} chooses a step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_every_logs_the_eval_tasks_while_training(tmp_path, monkeypatch):
    from moe_gen.trainer.trainer import Trainer

    evaluated_at, evaluate = [], Trainer.evaluate

    def counted(self, *args, **kwargs):
        evaluated_at.append(self.step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counted)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "debug", "--output", str(run), "--train.steps", "4", "--train.eval_every",
                 "2", "--train.eval_limit", "2", "--tasks", "table_species", "--train.progress", "false"])
    assert code == 0
    records = [json.loads(line) for line in (run / "logs" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and list(records[0]["eval"]) == ["table_species"]
    assert records[-1]["eval"] == json.loads((run / "eval.json").read_text())["trained"]
    # steps 2 and 4; eval.json reuses step 4's evaluation (it ran twice before)
    assert evaluated_at == [2, 4]


def _pretrain(output, *extra):
    return [sys.executable, "-m", "moe_gen.cli", "pretrain", "--config", "debug", "--output", str(output),
            "--train.steps", "12", "--train.checkpoint_every", "3", "--train.log_every", "1",
            "--train.eval_limit", "4", *extra]


def test_a_killed_run_resumes_with_the_same_losses(tmp_path):
    """Stop a run with SIGKILL after a checkpoint, resume it, and compare the loss trace with a run
    that never stopped."""
    subprocess.run(_pretrain(tmp_path / "full"), check=True, env=ENV, capture_output=True, timeout=300)
    full = read_jsonl_log(str(tmp_path / "full" / "logs" / "train.jsonl"))
    assert [r["step"] for r in full] == list(range(1, 13))

    killed = tmp_path / "killed"
    process = subprocess.Popen(_pretrain(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = int(latest.read_text().split("-")[1])
    assert stopped_at < 12

    subprocess.run(_pretrain(killed, "--resume"), check=True, env=ENV, capture_output=True, timeout=300)
    resumed = read_jsonl_log(str(killed / "logs" / "train.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]
    results = json.load(open(killed / "eval.json"))
    assert results["trained"] == json.load(open(tmp_path / "full" / "eval.json"))["trained"]

    # the saved model answers from the command line
    model_dir = str(killed / "model")
    assert subprocess.run([sys.executable, "-m", "moe_gen.cli", "eval", model_dir, "--tasks", "table_species",
                           "--limit", "5"], env=ENV, capture_output=True, text=True, check=True).stdout.count("|") > 4
    out = subprocess.run([sys.executable, "-m", "moe_gen.cli", "infer", model_dir, "--task", "table_species",
                          "--rows", "2"], env=ENV, capture_output=True, text=True, check=True).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == 2 and all(a["text"] in ("setosa", "versicolor", "virginica") for a in answers)


def test_finetune_command_adds_a_task_to_a_saved_model(tmp_path):
    import torch

    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    torch.manual_seed(0)
    tables = load_preset("table_species", "train", limit=10)
    GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), [tables],
                          Tokenizer.default()).save_pretrained(str(tmp_path / "pre"))
    code = main(["finetune", "--from", str(tmp_path / "pre"), "--tasks", "digit_classification", "--output",
                 str(tmp_path / "ft"), "--train.steps", "3", "--train.eval_limit", "3", "--train.progress", "false",
                 "--train.trainable", "new_adapters", "--train.tensorboard", "false"])
    assert code == 0
    tuned = GeneralistModel.from_pretrained(str(tmp_path / "ft" / "model"))
    assert list(tuned.task_ids) == ["table_species", "digit_classification"]
    results = json.load(open(tmp_path / "ft" / "eval.json"))
    assert set(results["trained"]) == set(results["before_training"]) == {"digit_classification"}


def test_analyze_command_writes_a_report(tmp_path):
    import torch

    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    torch.manual_seed(0)
    tasks = [load_preset(n, "train", limit=10) for n in ("table_species", "digit_classification")]
    GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), tasks,
                          Tokenizer.default()).save_pretrained(str(tmp_path / "m"))
    code = main(["analyze", str(tmp_path / "m"), "--tasks", "table_species", "digit_classification",
                 "--out", str(tmp_path / "report"), "--limit", "4"])
    assert code == 0
    # options before the model folder, as --help lists them (argparse's remainder split them apart)
    assert main(["analyze", "--tasks", "table_species", "--limit", "2", "--out", str(tmp_path / "first"),
                 str(tmp_path / "m")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "MI(expert; modality)" in report and (tmp_path / "report" / "routing.json").exists()
    assert main(["analyze", str(tmp_path / "nope"), "--tasks", "table_species", "--out", str(tmp_path / "x")]) == 2


def test_null_empties_a_mapping_field_that_an_empty_mapping_cannot():
    """``{}`` merges into the recipe's mapping key by key, leaving it as it was; ``null`` empties it
    (it was refused: "must be a mapping, got None"), as ``--section null`` empties a section. A
    field where None means something else keeps None."""
    from moe_gen.cli import load_run_config
    from moe_gen.trainer import TrainConfig

    assert load_run_config("demo", ["--train.modality_budget", "{}"]).train.modality_budget == {"AUDIO": 600,
                                                                                               "VIDEO": 600}
    assert load_run_config("demo", ["--train.modality_budget", "null"]).train.modality_budget == {}
    assert load_run_config("demo", ["--train.modality_budget", "null", "--train.modality_budget.AUDIO",
                                    "100"]).train.modality_budget == {"AUDIO": 100}
    assert TrainConfig(masked_target_alpha=None).masked_target_alpha is None  # None: masked_alpha's


# ---- a mutation test of cli.py: behaviours no test held (each test failed with its mutant) ------------

QUIET = ["--train.progress", "false", "--train.tensorboard", "false", "--baseline", "false", "--train.eval_limit", "2",
         "--train.warmup_steps", "0"]


@pytest.fixture(scope="module")
def species_model(tmp_path_factory, tok):
    """(directory, model): a debug model of ``table_species`` saved where the commands read it."""
    from helpers import build

    from moe_gen.tasks import load_preset

    path = tmp_path_factory.mktemp("species") / "model"
    model = build([load_preset("table_species", "train")], tok)  # (every label: the test rows hold all three)
    model.save_pretrained(str(path))
    return path, model


def test_a_flag_below_a_value_that_is_not_a_section_is_refused_by_name(tmp_path, capsys):
    """(Without the check, ``--train.steps.x`` failed with a TypeError, exit status 1, naming no flag.)"""
    with pytest.raises(ValueError, match=r"^--train\.lr\.x: 'lr' is not a section \(it holds 1\.0\)$"):
        apply_overrides({"train": {"lr": 1.0}}, ["--train.lr.x", "1"])
    assert main(["pretrain", "--config", "debug", "--train.steps.x", "1", "--output", str(tmp_path / "run")]) == 2
    assert "--train.steps.x: 'steps' is not a section (it holds 20)" in capsys.readouterr().err


def test_a_run_with_no_tasks_is_refused_before_its_folder_is_made(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "debug", "--tasks", "[]", "--output", str(run)]) == 2
    assert "the run configuration names no tasks (set tasks: or --tasks a,b)" in capsys.readouterr().err
    assert not run.exists()


def test_metric_table_marks_lower_is_better_keeps_counts_whole_and_dashes_a_missing_baseline():
    from moe_gen.cli import metric_table

    results = {"a": {"accuracy": 0.5, "wer/title": 0.25, "skipped": 2}, "b": {"accuracy": 1.0}}
    assert metric_table(results, {"a": {"accuracy": 0.125, "skipped": 0}}) == "\n".join([
        "| task | metric | before training | trained |", "|---|---|---:|---:|",
        "| a | accuracy | 0.125 | 0.500 |", "| a | wer/title (lower is better) | - | 0.250 |",
        "| a | skipped | 0 | 2 |", "| b | accuracy | - | 1.000 |"])
    assert metric_table({"b": {"skipped": 3}}) == "| task | metric | value |\n|---|---|---:|\n| b | skipped | 3 |"


def test_finetune_refuses_model_overrides_before_reading_the_model(tmp_path, capsys):
    code = main(["finetune", "--from", str(tmp_path / "missing"), "--model.flavour", "tiny", "--output",
                 str(tmp_path / "ft")])
    assert code == 2 and "finetune takes the model from --from; drop the model: section" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("argv", [["eval", "MODEL"], ["infer", "MODEL", "--task", "table_species"]])
def test_eval_and_infer_refuse_overrides_before_reading_the_model(tmp_path, capsys, argv):
    """(Unchecked, ``eval m --train.eval_limit 5`` would score every row without a word.)"""
    argv = [str(tmp_path / "missing") if a == "MODEL" else a for a in argv]
    assert main([*argv, "--train.lr", "1"]) == 2
    assert f"moe-gen {argv[0]}: error: {argv[0]} takes no overrides, got --train.lr 1" in capsys.readouterr().err


def test_eval_limit_scores_the_rows_evaluate_scores_with_that_limit(species_model, tmp_path, capsys):
    from moe_gen.tasks import load_preset
    from moe_gen.trainer.evaluation import evaluate

    path, model = species_model
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--tasks", "table_species", "--limit", "2", "--out", str(out)]) == 0
    test = load_preset("table_species", "test")
    expected = evaluate(model, [test], limit=2)
    assert expected != evaluate(model, [test])  # (else the limit could not be told from every row)
    assert json.loads(out.read_text()) == expected
    assert f"| table_species | accuracy | {expected['table_species']['accuracy']:.3f} |" in capsys.readouterr().out


def test_eval_out_makes_its_folder(species_model, tmp_path):
    """(``--out`` into a folder not yet made failed when the metrics were written, after the evaluation.)"""
    path, _ = species_model
    out = tmp_path / "new" / "deeper" / "eval.json"
    assert main(["eval", str(path), "--tasks", "table_species", "--limit", "2", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["table_species"]


def test_eval_out_naming_a_folder_is_refused_before_reading_the_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    expected = f"--out must name a file to write the metrics to, got the folder {str(tmp_path)!r}"
    assert expected in capsys.readouterr().err


def test_infer_prints_the_first_rows_answers_without_targets_for_a_single_target(species_model, capsys):
    from moe_gen.tasks import load_preset

    path, model = species_model
    assert main(["infer", str(path), "--task", "table_species", "--rows", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    test = load_preset("table_species", "test")
    answers = model.infer(test, [test.data[0], test.data[1]])
    assert [sorted(line) for line in lines] == [["row", "score", "text"]] * 2
    assert [(line["row"], line["text"]) for line in lines] == [(0, answers[0].text), (1, answers[1].text)]


def test_finetune_overwrite_removes_the_run_s_model_when_it_reads_a_sibling_folder(species_model, tmp_path, capsys):
    """--overwrite keeps RUN/model when the finetune reads it (or a folder inside it), not when it reads
    RUN/model_before, whose path merely starts with the same letters."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(species_model[0], run / "model")
    shutil.copytree(species_model[0], run / "model_before")
    code = main(["finetune", "--from", str(run / "model_before"), "--output", str(run), "--overwrite", "--tasks",
                 "table_species", "--train.steps", "4", "--train.lr", "1e30", "--train.max_bad_steps", "1", *QUIET])
    assert code == 1 and "training stopped" in capsys.readouterr().err
    assert not (run / "model").exists() and (run / "model_before" / "model.safetensors").exists()


def test_the_final_evaluation_scores_the_eval_tasks_only(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "debug", "--output", str(run), "--tasks", "table_species",
                 "digit_classification", "--eval_tasks", "table_species", "--train.steps", "1", *QUIET]) == 0
    assert set(json.load(open(run / "eval.json"))["trained"]) == {"table_species"}
    capsys.readouterr()


def test_a_run_whose_last_checkpoint_failed_saves_its_model_and_results_and_exits_1(tmp_path, monkeypatch, capsys):
    """A checkpoint write that fails at the last step (not enough failures in a row to stop the run)."""
    import errno

    from moe_gen import distributed

    original = distributed.save_shards

    def failing(directory, prefix, tensors, plan):
        if os.path.basename(directory).startswith("step-0000002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, prefix, tensors, plan)

    monkeypatch.setattr(distributed, "save_shards", failing)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "debug", "--output", str(run), "--tasks", "table_species", "--train.steps",
                 "2", "--train.checkpoint_every", "1", *QUIET])
    err = capsys.readouterr().err
    assert code == 1, err
    assert (f"the model is saved to {run / 'model'}, but the checkpoint of the last step (2) was not written (1 "
            f"failed checkpoint writes); the latest checkpoint is {run / 'checkpoints' / 'step-0000001'} (step 1)"
            ) in err
    assert (run / "model" / "model.safetensors").exists() and (run / "eval.json").exists()


def test_a_run_that_diverges_after_a_checkpoint_names_it(tmp_path, tok):
    from helpers import build, quiet

    from moe_gen.cli import RunIncomplete, _fit
    from moe_gen.tasks import load_preset
    from moe_gen.trainer import Trainer
    from moe_gen.trainer.trainer import TrainingDiverged

    task = load_preset("table_species", "train", limit=8)
    model = build([task], tok)
    run = tmp_path / "run"
    trainer = Trainer(model, [task], quiet(steps=4, batch_size=2, checkpoint_every=1), output_dir=str(run))
    train_step, calls = trainer.train_step, []

    def diverge_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise TrainingDiverged("1 step in a row (up to step 3) had a non-finite loss")
        return train_step(*args, **kwargs)

    trainer.train_step = diverge_at_the_third
    with trainer, pytest.raises(RunIncomplete) as stopped:
        _fit(trainer, model, [task], str(run))
    assert f"the model was not saved; the latest checkpoint is {run / 'checkpoints' / 'step-0000002'}" in str(
        stopped.value)


def test_infer_lines_give_tensors_as_their_shapes():
    import numpy as np
    import torch

    from moe_gen.cli import _jsonable

    value = {"frames": torch.zeros(2, 3), 1: (np.zeros((4, 5, 3), dtype=np.uint8), "a", [0.5, None])}
    assert _jsonable(value) == {"frames": {"shape": [2, 3]}, "1": [{"shape": [4, 5, 3]}, "a", [0.5, None]]}
    assert json.loads(json.dumps(_jsonable(value))) == _jsonable(value)
