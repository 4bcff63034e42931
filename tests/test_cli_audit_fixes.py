"""Entry-point and configuration defects found by an audit (2026-12-05, seventh session); each test
failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from moe_gen.cli import RunIncomplete, _fit, _model_config, main
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Tokenizer, collate, load_preset
from moe_gen.trainer import TrainConfig


def test_infer_prints_every_target_of_a_repeated_group(tmp_path, capsys):
    """Only text and box were printed: a detection answer printed its score alone."""
    task = load_preset("digit_detection", "train", limit=4)
    torch.manual_seed(0)
    GeneralistModel.build(flavour("debug"), [task], Tokenizer.default()).save_pretrained(str(tmp_path / "m"))
    assert main(["infer", str(tmp_path / "m"), "--task", "digit_detection", "--rows", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line["targets"]) == {"boxes", "labels"}
    assert len(line["targets"]["boxes"]) == len(line["targets"]["labels"])


def test_infer_refuses_a_row_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", str(tmp_path), "--task", "table_species", "--rows", "0"])
    assert exit_info.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "MODEL", "--limit", "0"], ["infer", "MODEL", "--task", "table_species",
                                                                      "--beams", "0"]])
def test_eval_limit_and_beams_below_one_are_refused_before_the_model_loads(tmp_path, capsys, argv):
    """(``eval --limit 0`` loaded the model and failed in the first task's evaluation.)"""
    argv = [str(tmp_path / "missing") if a == "MODEL" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err


def test_a_yaml_recipe_that_is_not_a_name_is_refused(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: 5\ntasks: [table_species]\n")
    assert main(["pretrain", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "recipe must be a recipe name" in capsys.readouterr().err


def test_non_finite_numbers_and_unknown_devices_are_refused_by_the_config():
    with pytest.raises(ValueError, match="lr must be a finite number, got inf"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="device must be 'auto' or a torch device.*got 'gpu'"):
        TrainConfig(device="gpu")


def test_moe_layer_settings_are_checked_with_the_model_section():
    with pytest.raises(ValueError, match="unknown router strategy 'tokn'"):
        _model_config({"moe": {"every": 1, "router": {"strategy": "tokn"}}})
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        _model_config({"moe": {"every": 1, "capacity_factor": -1}})


@pytest.mark.parametrize("flag, message", [
    (["--model.upcycle", "{num_expert: 8}"],
     "model.upcycle: unknown keys ['num_expert'] (did you mean 'num_experts'?)"),
    (["--model.upcycle", "{router: attribute}"], "model.upcycle needs num_experts"),
    (["--model.decoder_layers", "two"], "model.decoder_layers must be an integer, got 'two'"),
    (["--model.upcycle", "{num_experts: 4, top_k: 8}"], "top_k must be between 1 and num_experts (4), got 8"),
])
def test_a_model_init_section_is_checked_before_any_data_or_weights(tmp_path, capsys, flag, message):
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "debug", "--output", str(out), "--tasks", "table_species",
                 "--model", "null", "--model.init", "hf:minilm", *flag])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_overrides_that_contradict_a_checkpoint_are_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from moe_gen.pretrained import from_hf

    for override, fixed in (({"num_heads": 6}, "num_heads=12"), ({"attention_bias": False}, "attention_bias=True"),
                            ({"encoder_layers": 3}, "encoder_layers=6")):
        with pytest.raises(ValueError, match=f"contradicts the checkpoint, whose weights fix {fixed}"):
            from_hf("minilm", **override)


def test_a_sample_past_the_position_table_is_refused_instead_of_reading_its_last_row():
    task = load_preset("table_species", "train", limit=4)
    tok = Tokenizer.default()
    model = GeneralistModel.build(flavour("debug", max_positions=8), [task], tok).eval()
    batch = collate(list(task.samples(tok)), tok, model.task_ids)
    with pytest.raises(ValueError, match=r"past the learned position table \(ModelConfig.max_positions=8\)"):
        model(batch)
    wide = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    wide(batch)  # within the table: runs


def test_a_diverged_run_says_what_was_saved(tmp_path, monkeypatch):
    from moe_gen.trainer import Trainer
    from moe_gen.trainer.trainer import TrainingDiverged

    task = load_preset("table_species", "train", limit=8)
    model = GeneralistModel.build(flavour("debug"), [task], Tokenizer.default())
    trainer = Trainer(model, [task], TrainConfig(steps=2, batch_size=2, progress=False, tensorboard=False),
                      output_dir=str(tmp_path / "run"))

    def diverge(*args, **kwargs):
        raise TrainingDiverged("3 steps in a row (up to step 1) had a non-finite loss")

    monkeypatch.setattr(trainer, "train_step", diverge)
    with pytest.raises(RunIncomplete, match="training stopped: 3 steps in a row.*no checkpoint was written"):
        _fit(trainer, model, [task], str(tmp_path / "run"))


# ---- a second configuration audit (2026-12-05, ninth session) ---------------------------------------

def test_yaml_reads_numbers_as_yaml_1_2_and_the_flags_do():
    """YAML read 010 as eight (1.1's octal) where the flag read ten, and refused .5e3."""
    from moe_gen.cli import _parse_value, yaml_load

    assert yaml_load("a: 010\nb: .5e3\nc: -.5e-3\nd: 1e-3\ne: 0o10\nf: name\ng: 1.5.2") == \
        {"a": 10, "b": 500.0, "c": -0.0005, "d": 0.001, "e": 8, "f": "name", "g": "1.5.2"}
    assert _parse_value("train.modality_budget", "{AUDIO: 0600}") == {"AUDIO": 600}  # was 384


def test_non_finite_weights_and_scales_are_refused():
    from moe_gen.config import RouterConfig

    for field in ("lr_scales", "loss_weights", "task_weights"):  # inf trained a step, then every loss was NaN
        key = "encoder." if field == "lr_scales" else "t"
        with pytest.raises(ValueError, match="finite"):
            TrainConfig(**{field: {key: float("inf")}})
    for field in ("balance_loss_weight", "z_loss_weight", "noise_std"):  # NaN switched the loss off
        with pytest.raises(ValueError, match="finite number >= 0"):
            RouterConfig(**{field: float("nan")})


def test_settings_that_name_tasks_are_checked_before_any_data_is_read(tmp_path, monkeypatch):
    import moe_gen.cli as cli

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr(cli, "_tasks", no_data)
    out = str(tmp_path / "run")
    for flags, message in ((["--train.mixing", "weights", "--train.task_weights", "{digit_clasification: 2}"],
                            r"task_weights names tasks not being trained: \['digit_clasification'\] \(did you mean"),
                           (["--train.loss_weights", "{table_specis: 2}"], "loss_weights names tasks"),
                           (["--train.mixing", "all", "--train.batch_size", "2"], "batch_size 2 is below the 3 tasks"),
                           (["--tasks", "table_species,table_species"], "named more than once")):
        with pytest.raises(ValueError, match=message):
            cli._train(cli.load_run_config("debug", ["--output_dir", out, *flags]))


def test_a_misspelt_decoder_router_field_gets_a_guess():
    from moe_gen.model.config import MoELayers

    with pytest.raises(ValueError, match=r"stratgy \(did you mean 'strategy'\?\)"):
        MoELayers(decoder_router={"stratgy": "token"}).router_for("decoder")
