"""Settings and saved files are checked before anything trains, and errors name the key or file
(issue 13, finding 10): run settings, ``from_pretrained``, ``--overwrite`` over a broken
``latest``, skipped-row bookkeeping, and evaluation under ``on_error="skip"``."""

from __future__ import annotations

import json
import time

import pytest
import torch

from moe_gen.cli import main
from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer, evaluate_task


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tables():
    return load_preset("table_species", "train", limit=12)


def build(tasks, tok) -> GeneralistModel:
    torch.manual_seed(0)
    return GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}), tasks, tok)


# ---- run settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    (["--train.eval_batch_size", "0"], "eval_batch_size"),
    (["--train.eval_limit", "-1"], "eval_limit"),
    (["--train.lr", "abc"], "TrainConfig.lr must be a number, got 'abc'"),
    (["--train.num_threads", "-1"], "num_threads"),
    (["--train.steps", "ten"], "TrainConfig.steps must be an integer"),
    (["--train.betas", "[0.9]"], "TrainConfig.betas"),
    (["--train.betas", "[1.5, 0.9]"], "TrainConfig: betas must be two numbers in [0, 1), got [1.5, 0.9]"),
    (["--train.modality_budget", "{AUDIO: 600"], "--train.modality_budget: cannot read"),
    (["--train.checkpoint_every", "-5"], "checkpoint_every"),
    (["--train.max_failed_checkpoints", "0"], "max_failed_checkpoints"),
    (["--tasks", "[1, 2]"], "'tasks' must be a list of preset names"),
    # checked before any task's data is read or the run directory is made
    (["--model.flavour", "tinyy"], "unknown model flavour 'tinyy'"),
    (["--model.moe.router.strategy", "tokn"], "unknown router strategy 'tokn'"),
    (["--tasks", "table_species,digit_clasification"], "unknown task 'digit_clasification'"),
    (["--train.modality_budget", "{AUDO: 600}"], "names unknown modalities ['AUDO'] (did you mean 'AUDIO'?)"),
    (["--train.modality_budget", "{audio: 600}"], "names unknown modalities ['audio'] (did you mean 'AUDIO'?)"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_bad_settings_are_refused_before_training(override, key, tmp_path, capsys):
    start = time.monotonic()
    code = main(["pretrain", "--config", "debug", "--output", str(tmp_path / "run"), *override])
    err = capsys.readouterr().err
    assert code == 2 and key in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # nothing ran, nothing was written
    assert time.monotonic() - start < 30


def test_malformed_yaml_is_named_with_its_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: debug\ntrain:\n  steps: [3\n  lr: 0.1\n")
    assert main(["pretrain", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not valid YAML" in err and "line" in err and not (tmp_path / "run").exists()
    path.write_text("- just\n- a list\n")
    assert main(["pretrain", "--config", str(path)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_yaml_reads_exponent_floats_as_numbers(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string; run files read it as YAML 1.2 does, a number."""
    from moe_gen.cli import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("recipe: debug\ntrain:\n  lr: 1e-3\n  steps: 2e1\n  warmup_steps: 1_0\n")
    config = load_run_config(str(path))
    assert config.train.lr == 1e-3 and config.train.steps == 20 and isinstance(config.train.steps, int)
    assert config.train.warmup_steps == 10
    path.write_text("recipe: debug\ntasks: [table_species]\ntrain:\n  lr: x1e-3\n")
    with pytest.raises(ValueError, match="TrainConfig.lr must be a number, got 'x1e-3'"):
        load_run_config(str(path))


def test_resume_past_the_runs_steps_and_resume_with_overwrite_are_refused(tables, tok, tmp_path):
    config = TrainConfig(steps=2, batch_size=4, progress=False, tensorboard=False)
    Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path)).fit()
    fewer = TrainConfig(steps=1, batch_size=4, progress=False, tensorboard=False)
    fresh = build([tables], tok)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="is at step 2, past this run's steps = 1"):
        Trainer(fresh, [tables], fewer, output_dir=str(tmp_path), resume=True)
    other = Task("other_species", tables.instruction, tables.data)
    with pytest.raises(ValueError, match=r"was trained on tasks \['table_species'\]; this run has \['other_species'\]"):
        Trainer(fresh, [other], config, output_dir=str(tmp_path), resume=True)
    # refused from the checkpoint's trainer.json, before its weights reached the model passed in
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path), resume=True, overwrite=True)
    same = Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path), resume=True)
    assert same.step == 2 and same.fit()["step"] == 2  # resuming a finished run trains nothing more
    same.close()
    assert (tmp_path / "checkpoints" / "step-0000002").is_dir()  # neither touched the run


def test_infer_names_the_usual_mistakes(tables, tok):
    own = Task("my_species", tables.instruction, tables.data)
    model = build([own], tok)
    with pytest.raises(ValueError, match=r"infer takes a list of rows, got one dict; pass \[row\]"):
        model.infer(own, own.data[0])
    with pytest.raises(ValueError, match="'my_species' is not a preset; pass the Task object itself"):
        model.infer("my_species", own.data[:1])
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        model.infer("no_such_task", own.data[:1])
    assert len(model.infer(own, own.data[:2])) == 2


def test_instruction_errors_name_the_task():
    from moe_gen.tasks import InstructionError

    with pytest.raises(InstructionError, match="task 'mine': bad value for 'mask_ratio'"):
        Task("mine", "[IMAGE:img,mask_ratio=abc] what? -> [TEXT:caption]", [])
    with pytest.raises(InstructionError, match="task 'mine': nested '\\[' inside a slot: is the slot opened at "
                                               "position 0 missing its '\\]'"):
        Task("mine", "[IMAGE:img what? -> [TEXT:caption]", [])


def test_train_config_checks_types_and_ranges_when_built():
    with pytest.raises(ValueError, match="TrainConfig.lr must be a number"):
        TrainConfig(lr="abc")
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        TrainConfig(eval_batch_size=0)
    with pytest.raises(ValueError, match="eval_limit must be >= 1 or None"):
        TrainConfig(eval_limit=-1)
    with pytest.raises(ValueError, match="num_threads must be >= 1 or None"):
        TrainConfig(num_threads=-1)
    with pytest.raises(ValueError, match="sharding must be one of replicate, fsdp, hsdp; got 'zero3'"):
        TrainConfig(sharding="zero3")
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        TrainConfig(sharding="hsdp", shard_size=0)
    with pytest.raises(ValueError, match="fsdp_unit must be 'block' or 'stack'"):
        TrainConfig(fsdp_unit="layer")
    with pytest.raises(ValueError, match="progress must be true or false"):
        TrainConfig.from_dict({"progress": "yes please"})
    assert TrainConfig.from_dict({"steps": 1e3}).steps == 1000  # YAML reads 1e3 as a float
    assert TrainConfig(eval_limit=None, num_threads=None).eval_limit is None


@pytest.mark.parametrize("betas", [(1.5, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, float("nan"))])
def test_betas_outside_zero_to_one_are_refused_when_built(betas):
    # (torch's AdamW refused them only once the Trainer was built: after the data was read)
    with pytest.raises(ValueError, match=r"TrainConfig: betas must be two numbers in \[0, 1\)"):
        TrainConfig(betas=betas)
    assert TrainConfig(betas=(0, 0.999)).betas == (0, 0.999)


@pytest.mark.parametrize("field, refused, accepted", [
    ("steps", 0, 1),
    ("eval_limit", 0, 1),
    ("max_tokens", 0, 1),
    ("min_lr_ratio", 1.01, 1.0),  # 1: a constant learning rate after the warm-up
    ("modality_budget", {"AUDIO": 0}, {"AUDIO": 1}),
    ("lr_scales", {1: 0.5}, {"encoder.": 0.0}),  # prefixes are names; 0 freezes
    ("loss_weights", {"t": -0.5}, {"t": 0}),  # 0 leaves the task's loss out
    ("task_weights", {"t": -0.5}, {"t": 0.0}),
])
def test_train_config_refuses_the_first_value_past_each_bound_and_takes_the_bound(field, refused, accepted):
    with pytest.raises(ValueError, match=f"TrainConfig[:.] ?{field}"):
        TrainConfig(**{field: refused})
    assert getattr(TrainConfig(**{field: accepted}), field) == accepted


@pytest.mark.parametrize("make, refused, accepted, message", [
    # (config class, its fields, message): the first value past each bound is refused, the bound is taken
    (RouterConfig, {"weight_scale": 0.0}, {"weight_scale": 1e-3}, "weight_scale must be a finite number > 0"),
    (RouterConfig, {"expert_groups": 0, "topk_groups": 0}, {"expert_groups": 1, "topk_groups": 1},
     "expert_groups must be >= 1 and topk_groups in"),
    (RouterConfig, {"expert_groups": 2, "topk_groups": 0}, {"expert_groups": 2, "topk_groups": 1},
     "topk_groups in \\[1, expert_groups\\]"),
    (RouterConfig, {"expert_groups": 2, "topk_groups": 3}, {"expert_groups": 2, "topk_groups": 2},
     "topk_groups in \\[1, expert_groups\\]"),
    (RouterConfig, {"jitter_eps": 1.0}, {"jitter_eps": 0.0}, "jitter_eps must be in \\[0, 1\\)"),
    (RouterConfig, {"noise_std": -0.1}, {"noise_std": 0.0}, "noise_std must be a finite number >= 0"),
    (RouterConfig, {"word_buckets": 0}, {"word_buckets": 1}, "word_buckets must be >= 1"),
    (RouterConfig, {"tag_balance_window": -1}, {"tag_balance_window": 0}, "tag_balance_window must be a finite"),
    (RouterConfig, {"balance_loss_weight": float("nan")}, {"balance_loss_weight": 0.0}, "balance_loss_weight must"),
    (RouterConfig, {"num_roles": 17}, {"num_roles": 16}, "num_roles must be <= 16"),
    (RouterConfig, {"num_modalities": 41}, {"num_modalities": 40, "num_tasks": 64}, "num_modalities must be <= 40"),
    (RouterConfig, {"num_modalities": 40, "num_tasks": 65}, {"num_modalities": 40, "num_tasks": 64},
     "num_tasks must be <= 64 with 40 modalities"),
    (RouterConfig, {"num_tasks": 1, "task_words": (("a",), ("b",))}, {"num_tasks": 2, "task_words": (("a",), ("b",))},
     "task_words lists 2 tasks but num_tasks is 1"),
    (ExpertsConfig, {"shared_expert": True, "shared_hidden": 0}, {"shared_expert": True, "shared_hidden": 1},
     "shared_hidden must be >= 1"),
    (ExpertsConfig, {"shared_gate": True}, {"shared_gate": True, "shared_expert": True}, "set shared_expert=True"),
    (MoEConfig, {"top_k": 5}, {"top_k": 4}, "top_k=5 is larger than num_experts=4"),
    (MoEConfig, {"min_capacity": -1}, {"min_capacity": 0}, "min_capacity must be >= 0"),
    (MoEConfig, {"capacity_factor": 0.0}, {"capacity_factor": 1e-3}, "capacity_factor must be a finite number > 0"),
])
def test_moe_configs_refuse_the_first_value_past_each_bound_and_take_the_bound(make, refused, accepted, message):
    layer = dict(d_model=8, d_hidden=8, num_experts=4)
    with pytest.raises(ValueError, match=message):
        make(**refused) if make is not MoEConfig else make(**layer, **refused)
    config = make(**accepted) if make is not MoEConfig else make(**layer, **accepted)
    assert {name: getattr(config, name) for name in accepted} == accepted


def test_moe_config_refuses_router_settings_its_gate_would_ignore():
    """Each pair a layer could not honour is refused by name, and the pair it can is built."""
    layer = dict(d_model=8, d_hidden=8)

    def moe(num_experts=4, top_k=2, **router):
        return MoEConfig(**layer, num_experts=num_experts, top_k=top_k, router=RouterConfig(**router))

    # group-limited routing: a token may use topk_groups · E / expert_groups experts (here 1 · 8 / 4 = 2)
    with pytest.raises(ValueError, match="top_k=3 is larger than the 2 experts of the topk_groups=1 groups"):
        moe(num_experts=8, top_k=3, expert_groups=4, topk_groups=1)
    assert moe(num_experts=8, top_k=3, expert_groups=4, topk_groups=2).top_k == 3
    with pytest.raises(ValueError, match="does not split into expert_groups=3"):
        moe(num_experts=8, expert_groups=3, topk_groups=3)
    for gate in ("expert_choice", "balanced", "hash"):
        with pytest.raises(ValueError, match=f"apply to the 'topk' gate only, got gate '{gate}'"):
            moe(top_k=1, gate=gate, weight_scale=2.0)
    assert moe(weight_scale=2.0).router.weight_scale == 2.0
    for noise in ("gaussian", "jitter", "gumbel"):
        with pytest.raises(ValueError, match=f"router noise '{noise}' would make the fixed 'hash' gate"):
            moe(gate="hash", noise=noise)
    assert moe(gate="hash").router.noise == "none"
    with pytest.raises(ValueError, match="selection_bias shifts which experts a token selects; gate 'expert_choice'"):
        moe(gate="expert_choice", selection_bias=True)
    assert moe(gate="topk", selection_bias=True).router.selection_bias
    with pytest.raises(ValueError, match="normalize=True renormalises the top-k gate's weights; gate 'expert_choice'"):
        moe(gate="expert_choice", normalize=True)


def test_a_null_in_a_field_that_takes_no_null_is_refused_by_name():
    """``None`` fits a union only where the union holds ``None`` (``router: RouterConfig | str`` does not)."""
    with pytest.raises(ValueError, match=r"MoEConfig.router must be a RouterConfig or a string, got None"):
        MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=None)
    with pytest.raises(ValueError, match=r"MoEConfig.experts must be a ExpertsConfig or a string, got None"):
        MoEConfig.from_dict({"d_model": 8, "d_hidden": 8, "num_experts": 4, "experts": None})
    assert RouterConfig(noise_std=None, normalize=None).noise_std is None


def test_model_config_checks_sizes_when_built():
    from moe_gen.model import ModelConfig

    for field, value, message in [("num_heads", 0, "num_heads must be >= 1"),
                                  ("encoder_layers", -1, "encoder_layers must be >= 0"),
                                  ("dropout", 1.0, "dropout and label_smoothing must be in")]:
        with pytest.raises(ValueError, match=message):
            flavour("debug", **{field: value})
    for field, value, message in [("num_experts", 0, "MoELayers.num_experts must be >= 1"),
                                  ("top_k", 9, "MoELayers.top_k=9 exceeds num_experts=4"),
                                  ("every", 3, "MoELayers.every must be 0"),
                                  ("router", {"stratgy": "x"}, "unknown RouterConfig keys")]:
        with pytest.raises(ValueError, match=message):
            flavour("debug", moe={field: value})
    with pytest.raises(ValueError, match="ModelConfig.num_heads must be >= 1"):
        ModelConfig.from_dict({"num_heads": 0})
    with pytest.raises(ValueError, match="ModelConfig.moe.layers names 'encoder.blocks.7'"):
        flavour("debug", moe={"layers": ["encoder.blocks.7"]})


@pytest.mark.parametrize("refused, accepted, message", [
    ({"positions": "rotary", "d_model": 12}, {"positions": "rotary", "d_model": 16},  # 4 heads of 3, then 4
     "rotary positions need an even head width"),
    ({"norm_eps": 0.0}, {"norm_eps": 1e-12}, "norm_eps must be a finite number > 0"),
    ({"moe": {"layers": ["encoder.blocks.2"]}}, {"moe": {"layers": ["encoder.blocks.1"]}},  # 2 encoder blocks
     "moe.layers names 'encoder.blocks.2', which is not a block"),
    ({"moe": {"layers": ["decoder.blocks.2"]}}, {"moe": {"layers": ["decoder.blocks.1"]}},
     "moe.layers names 'decoder.blocks.2', which is not a block"),
    ({"num_kv_heads": 3}, {"num_kv_heads": 2}, "num_kv_heads=3 must be >= 1 and divide num_heads=4"),
])
def test_model_config_refuses_the_first_value_past_each_bound_and_takes_the_bound(refused, accepted, message):
    with pytest.raises(ValueError, match=message):
        flavour("debug", **refused)
    config = flavour("debug", **accepted)
    assert config.norm_eps == accepted.get("norm_eps", 1e-5) and config.d_model == accepted.get("d_model", 64)


def test_configs_built_in_python_check_types_as_yaml_and_flags_do():
    """A config made in Python skipped the type checks ``from_dict`` applies to YAML and flags:
    ``selection_bias="false"`` was accepted (and truthy), ``tasks="abc"`` became three tasks, and
    ``d_model="64"`` failed later in a comparison with a bare TypeError."""
    import re

    from moe_gen.config import ExpertsConfig, MoEConfig
    from moe_gen.model import ModelConfig, MoELayers

    layer = dict(d_model=8, d_hidden=8, num_experts=4)
    for make, message in [
        (lambda: RouterConfig(selection_bias="false"),
         "RouterConfig.selection_bias must be true or false, got 'false'"),
        (lambda: RouterConfig(normalize="false"), "RouterConfig.normalize must be true or false or null (None), got"),
        (lambda: RouterConfig(num_tasks="8"), "RouterConfig.num_tasks must be an integer, got '8'"),
        (lambda: RouterConfig(jitter_eps="0.1"), "RouterConfig.jitter_eps must be a number, got '0.1'"),
        (lambda: ExpertsConfig(bias="false"), "ExpertsConfig.bias must be true or false, got 'false'"),
        (lambda: ExpertsConfig(shared_hidden=True), "ExpertsConfig.shared_hidden must be an integer or null"),
        (lambda: MoEConfig(**layer, check_finite="no"), "MoEConfig.check_finite must be true or false, got 'no'"),
        (lambda: MoEConfig(**layer, capacity_factor="1.25"), "MoEConfig.capacity_factor must be a number or null"),
        (lambda: MoELayers(attention="false"), "MoELayers.attention must be true or false, got 'false'"),
        (lambda: MoELayers(top_k=True), "MoELayers.top_k must be an integer, got True"),
        (lambda: ModelConfig(tie_embeddings="false"), "ModelConfig.tie_embeddings must be true or false, got 'false'"),
        (lambda: ModelConfig(d_model="64"), "ModelConfig.d_model must be an integer, got '64'"),
        (lambda: ModelConfig(dropout="0.1"), "ModelConfig.dropout must be a number, got '0.1'"),
        (lambda: flavour("debug").replace(tasks="abc"), "ModelConfig.tasks must be a list of strings, got 'abc'"),
        (lambda: flavour("debug").with_moe(every="1"), "MoELayers.every must be an integer, got '1'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make()
    # what the code accepted and still does: ints for floats, None where optional, lists for tuples,
    # the shorthands (a strategy name, a dict of fields, the decoder's router as a RouterConfig)
    router = RouterConfig(weight_scale=2, jitter_eps=0, noise_std=None, normalize=None,
                          balance_loss_groups=["modality"], task_words=[["a", "b"]])
    assert router.balance_loss_groups == ("modality",) and router.task_words == (("a", "b"),)
    assert MoEConfig(**layer, router="task", experts="glu", capacity_factor=2).router.strategy == "task"
    layers = MoELayers(router={"strategy": "attribute"}, experts="glu", layers=["encoder.blocks.1"],
                       decoder_router=RouterConfig(strategy="hybrid"), capacity_factor=1)
    assert layers.layers == ("encoder.blocks.1",) and layers.decoder_router == {"strategy": "hybrid"}
    config = ModelConfig(dropout=0, rotary_base=10000, num_kv_heads=None, tasks=["a", "b"], frame_adapters=[],
                         moe={"router": "attribute", "num_experts": 8})
    assert config.tasks == ("a", "b") and config.frame_adapters == () and config.moe.num_experts == 8
    assert ModelConfig.from_dict(config.to_dict()) == config


# ---- from_pretrained -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tables, tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "model"
    build([tables], tok).save_pretrained(str(directory))
    return directory


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(saved, target)
    return target


def test_a_truncated_weights_file_is_named(saved, tmp_path):
    model = _copy(saved, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights}: cannot read the weights"):
        GeneralistModel.from_pretrained(str(model))


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[:-40], "cannot read the model configuration"),
    (lambda text: json.dumps({**json.loads(text), "num_heads": 0}), "not a valid model configuration"),
    (lambda text: json.dumps({**json.loads(text), "d_model": "wide"}), "ModelConfig.d_model must be an integer"),
    (lambda text: json.dumps({**json.loads(text), "d_model": 96}), "does not fit"),
])
def test_a_broken_config_is_named(saved, tmp_path, damage, message):
    model = _copy(saved, tmp_path)
    config = model / "config.json"
    config.write_text(damage(config.read_text()))
    with pytest.raises(ValueError, match=message) as error:
        GeneralistModel.from_pretrained(str(model))
    assert str(config) in str(error.value) or str(model / "model.safetensors") in str(error.value)


def test_eval_of_a_broken_or_missing_model_exits_2_naming_the_file(saved, tmp_path, capsys):
    model = _copy(saved, tmp_path)
    (model / "config.json").write_text("{")
    assert main(["eval", str(model), "--tasks", "table_species", "--limit", "2"]) == 2
    assert str(model / "config.json") in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--limit", "2"]) == 2
    assert "is not a model directory" in capsys.readouterr().err


# ---- --overwrite over a broken latest pointer ------------------------------------------------------

def test_overwrite_clears_a_latest_pointer_naming_a_missing_step(tables, tok, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "latest").write_text("step-0000009")  # its directory is gone
    config = TrainConfig(steps=1, batch_size=4, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path), resume=True)
    trainer = Trainer(build([tables], tok), [tables], config, output_dir=str(tmp_path), overwrite=True)
    assert not checkpoints.exists()
    assert trainer.fit()["checkpoint_step"] == 1


# ---- skipped rows --------------------------------------------------------------------------------

def _rows(bad: int, good: int = 2) -> list[dict]:
    good_rows = [{"table": {"sepal length": 5.0 + i}, "species": "setosa"} for i in range(good)]
    return good_rows + [{"species": "setosa"} for _ in range(bad)]  # no table: the row fails


def test_skipped_counts_rows_and_errors_stay_bounded(tok):
    task = Task("t", "[STRUCT:table] which? -> [CATEGORY:species]", _rows(150), on_error="skip")
    for _ in range(3):
        assert len(list(task.samples(tok))) == 2
    assert task.skipped == 150  # distinct rows, not attempts
    assert len(task.errors) == 100 and "row 2" in task.errors[0]


def test_evaluation_skips_and_reports_rows_that_fail_under_skip(tables, tok):
    model = build([tables], tok)
    test = load_preset("table_species", "test", limit=6, on_error="skip")
    rows = [dict(row) for row in test.data]
    del rows[1]["table"]
    test.data = rows
    results = evaluate_task(model, test)
    assert results["skipped"] == 1 and 0 <= results["accuracy"] <= 1
    assert test.skipped == 1 and "row 1" in test.errors[0]
    strict = load_preset("table_species", "test", limit=6)
    strict.data = rows
    with pytest.raises(TaskDataError, match="row 1"):
        evaluate_task(model, strict)
    assert "skipped" not in evaluate_task(model, load_preset("table_species", "test", limit=3))


def test_infer_answers_none_for_rows_that_fail_under_skip(tables, tok):
    model = build([tables], tok)
    rows = [dict(row) for row in load_preset("table_species", "test", limit=3).data]
    del rows[1]["table"]
    lenient = Task("table_species", tables.instruction, [], on_error="skip")
    answers = model.infer(lenient, rows)
    assert answers[1] is None and all(a is not None and a.text for a in (answers[0], answers[2]))
    assert lenient.skipped == 1 and "row 1" in lenient.errors[0]
    assert model.infer(lenient, rows[1:2], indices=[41]) == [None]  # rows named by their indices
    assert lenient.skipped == 2 and "row 41" in lenient.errors[1]
    with pytest.raises(ValueError, match="3 rows but 1 indices"):
        model.infer(lenient, rows, indices=[0])
    with pytest.raises(TaskDataError, match="row 1"):
        model.infer(Task("table_species", tables.instruction, []), rows)


def test_fsdp_sharding_outside_torchrun_is_refused_clearly():
    from torch import nn

    from moe_gen.fsdp import shard_dense

    with pytest.raises(ValueError, match="sharding='fsdp' needs torch.distributed; launch with torchrun"):
        shard_dense(nn.Linear(2, 2))


def test_numpy_bools_and_integers_fill_config_fields_as_python_ones_do():
    """(numpy integers were accepted, numpy bools refused: a flag read from an array failed.)"""
    import numpy as np

    from moe_gen.config import RouterConfig

    router = RouterConfig(selection_bias=np.bool_(True), num_tasks=np.int64(32))
    assert router.selection_bias is True and router.num_tasks == 32 and type(router.num_tasks) is int
    with pytest.raises(ValueError, match="num_tasks"):
        RouterConfig(num_tasks=np.bool_(True))  # a bool is no count, numpy's neither


def test_numpy_numbers_in_train_config_are_stored_as_python_ones():
    """(a np.float32 lr or a np.int64 modality budget was accepted, then the first log line or
    checkpoint failed with a TypeError from JSON, and the run lost everything since its start)"""
    import json

    import numpy as np

    config = TrainConfig(lr=np.float32(1e-3), frame_weight=np.float64(2.0),
                         modality_budget={"IMAGE": np.int64(200)}, task_weights={"a": np.float32(0.5)})
    assert type(config.lr) is float and type(config.frame_weight) is float
    assert type(config.modality_budget["IMAGE"]) is int and type(config.task_weights["a"]) is float
    json.dumps(config.to_dict())  # what checkpoints and logs write
    assert config.lr == pytest.approx(1e-3) and config.modality_budget == {"IMAGE": 200}
    with pytest.raises(ValueError, match="frame_weight must be >= 0, got -1"):
        TrainConfig(frame_weight=-1.0)  # (it trained the frame loss upwards)
