"""Run settings of ``moe-gen`` refused before any data is read, naming the setting (audit 13); each
test failed before its fix."""

from __future__ import annotations

import pytest

import moe_gen.cli as cli
from moe_gen.cli import main


def _no_data(names, split):
    raise AssertionError(f"the {split} split of {list(names)} was read before the settings were checked")


@pytest.mark.parametrize("flags, message", [
    (["--model.upcycle.router", "bogus"], "model.upcycle.router: unknown router strategy 'bogus'"),
    (["--model.upcycle.router", "atribute"], "did you mean 'attribute'?"),
    (["--model.upcycle.router", "null", "--model.moe", "{router: tokn}"],
     "model.moe.router.strategy: unknown router strategy 'tokn'"),
    (["--model.upcycle.layers", "bogus"], "model.upcycle.layers must be 'all' or 'every_other' or a list"),
    (["--model.upcycle.layers", "[encoder.blocks.1, 3]"], "model.upcycle.layers must be"),
    (["--model.dropout", "2.0"], "dropout and label_smoothing must be in [0, 1), got 2.0"),
    (["--model.moe", "{experts: {activation: swish}}"], "model.moe.experts.activation: unknown expert activation"),
    # block names of the checkpoint (MiniLM has 12 encoder blocks) were judged by the stand-in's 2 + 2
    (["--model.moe", "{layers: [encoder.blocks.5]}"], "model.moe: a checkpoint (model.init) loads as a dense model"),
    (["--model.moe", "{every: 2}"], "make MoE layers of its FFNs with model.upcycle"),
])
def test_a_model_init_section_is_checked_before_any_data(monkeypatch, tmp_path, capsys, flags, message):
    """They passed the early check, and the run read every task's data (and the checkpoint) first."""
    monkeypatch.setattr(cli, "_tasks", _no_data)
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "demo-pretrained", "--tasks", "table_species", "--output", str(out), *flags])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_a_model_init_section_that_names_block_layers_passes_the_check():
    init, recipe, overrides = cli._init_section({"init": "hf:minilm", "dropout": 0.1, "upcycle": {
        "num_experts": 4, "layers": ["encoder.blocks.1", "decoder.blocks.0.ffn"]}})
    assert recipe["layers"] == ["encoder.blocks.1", "decoder.blocks.0.ffn"] and overrides == {"dropout": 0.1}


@pytest.mark.parametrize("command", [["pretrain", "--config", "debug"],
                                     ["finetune", "--config", "finetune", "--from", "unused"]])
@pytest.mark.parametrize("flags, message", [
    (["--output", "", "--overwrite"], "--output must name the run's folder, got an empty string"),
    (["--output_dir", ""], "run configuration key 'output_dir' must name the run's folder, got None"),
    (["--output_dir", "''"], "run configuration key 'output_dir' must name the run's folder, got ''"),
])
def test_an_empty_output_folder_is_refused(monkeypatch, capsys, command, flags, message):
    """``--output ""`` was ignored (the run, and --overwrite, went to the recipe's folder), and
    ``--output_dir ""`` (null) fell back to runs/default."""
    def no_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "_train", no_run)
    assert main([*command, *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_run_configuration_needs_an_output_folder():
    from moe_gen.trainer import RunConfig

    with pytest.raises(ValueError, match="RunConfig.output_dir must name the run's folder"):
        RunConfig(output_dir="")


def test_flat_moe_keys_of_old_run_files_are_read_into_model_moe(tmp_path):
    """ModelConfig.from_dict read them; the command line refused them as "unknown model keys"."""
    from moe_gen.cli import _model_config, load_run_config
    from moe_gen.model import ModelConfig

    path = tmp_path / "old_run.yaml"
    path.write_text("recipe: demo\nmodel:\n  flavour: tiny\n  router: {strategy: token}\n  num_experts: 8\n"
                    "  moe_every: 1\n")
    model = load_run_config(str(path)).model
    assert "router" not in model and model["moe"]["every"] == 1 and model["moe"]["num_experts"] == 8
    config = _model_config(model)
    # the flat router merges into the recipe's key by key, as model.moe.router would
    assert config.moe.router.strategy == "token" and config.moe.router.tag_balance == "loss+bias"
    assert _model_config(load_run_config("debug", ["--model.moe_every", "2"]).model).moe.every == 2
    flat = ModelConfig.from_dict({"num_experts": 8, "moe_every": 2, "router": {"strategy": "attribute"}})
    assert (flat.moe.num_experts, flat.moe.every, flat.moe.router.strategy) == (8, 2, "attribute")


@pytest.mark.parametrize("where", ["missing.jsonl", "folder", ""])
def test_infer_input_that_cannot_be_read_exits_2_naming_it(tmp_path, capsys, where):
    """It exited 1 (a run that stopped) with only "[Errno 2] No such file or directory"; an empty one
    was ignored, and the command answered the task's own test rows."""
    import torch

    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    torch.manual_seed(0)
    tasks = [load_preset("table_species", "train", limit=4)]
    GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()).save_pretrained(str(tmp_path / "model"))
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / where) if where else ""
    assert main(["infer", str(tmp_path / "model"), "--task", "table_species", "--input", path]) == 2
    out = capsys.readouterr()
    assert f"--input {path!r}: cannot read the rows of task 'table_species'" in out.err and not out.out
