"""The built-in recipes (moe_gen/trainer/recipes.py): looked up by either spelling, built afresh,
each in its own folder, and equal to what the README says they train (the README's demo paragraph
and tables, the demo-pretrained comparison, the image_generation run)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from helpers import load_script

from moe_gen.tasks.presets import preset_info
from moe_gen.trainer.recipes import DEMO_TASKS, PRETRAINED_DEMO_TASKS, RECIPES, get_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    """The README with every run of whitespace as one space (its paragraphs wrap anywhere)."""
    return " ".join(README.read_text().split())


# ---- the registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RECIPES.list())
def test_every_recipe_trains_presets_into_its_own_folder(name):
    config = get_recipe(name)
    assert config.output_dir == f"runs/{name}"
    assert config.tasks and all(preset_info(task) for task in config.tasks + config.eval_tasks)
    assert get_recipe(name.replace("_", "-")) == config  # demo-pretrained is demo_pretrained


def test_a_recipe_is_built_afresh_on_every_call():
    changed = get_recipe("demo")
    changed.model["moe"]["router"]["strategy"] = "token"
    changed.train.modality_budget["AUDIO"] = 1
    again = get_recipe("demo")
    assert again is not changed and again.model["moe"]["router"]["strategy"] == "attribute"
    assert again.train.modality_budget["AUDIO"] == 600


def test_an_unknown_recipe_is_refused_with_a_guess_and_every_known_name():
    with pytest.raises(ValueError) as refused:
        get_recipe("dmeo-pretrained")
    message = str(refused.value)
    assert message.startswith("unknown recipe 'dmeo_pretrained' (did you mean 'demo_pretrained'?)")
    assert f"known: {', '.join(RECIPES.list())} (or pass a YAML file)" in message


# ---- the recipes are what the README says they train --------------------------------------------

def test_the_demo_recipe_is_the_run_the_readme_describes(readme):
    config = get_recipe("demo")
    model, train = config.model, config.train
    router, decoder = model["moe"]["router"], model["moe"]["decoder_router"]
    assert router["strategy"] == "attribute" and decoder == {"strategy": "hybrid"}
    described = (f"`make demo` (recipe `demo`) trains the `{model['flavour']}` flavour", "attribute routing in the "
                 f"encoder with the tag-balance loss at weight {router['balance_loss_weight']} plus the selection bias "
                 f"(`tag_balance=\"{router['tag_balance']}\"`), hybrid tag-and-content routing in the decoder) for "
                 f"{train.steps} steps of {train.batch_size} samples on eight built-in tasks",
                 f"with audio and video capped at {train.modality_budget['AUDIO']} positions a batch and the frame "
                 f"loss of text-to-speech counted {train.frame_weight:g}× (`frame_weight`); it then evaluates "
                 f"{train.eval_limit} held-out rows per task")
    for text in described:
        assert text in readme
    assert train.modality_budget == {"AUDIO": 600, "VIDEO": 600}
    assert len(DEMO_TASKS) == 8 and config.tasks == DEMO_TASKS and config.baseline  # the table's "before training"
    lines = README.read_text().splitlines()
    header = lines.index("| task | metric | before training (seed 0 / 1) | trained (seed 0 / 1) | trained / before |")
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[header + 2:])]
    assert tuple(re.match(r"\| ([a-z_]+)", row).group(1) for row in rows) == DEMO_TASKS


def test_demo_pretrained_is_the_demos_tasks_on_the_benchmarks_pretrained_system(readme, monkeypatch):
    """The README reports demo-pretrained against the demo with `doc_topic` as the text task, and
    describes it as bench_pretrained.py's `pretrained` system (MiniLM, every other FFN upcycled into 8
    attribute-routed experts, top-2, a new 2-block decoder, the checkpoint's weights at 0.1x of lr)."""
    config = get_recipe("demo_pretrained")
    assert PRETRAINED_DEMO_TASKS == tuple("doc_topic" if t == "language_identification" else t for t in DEMO_TASKS)
    assert config.tasks == PRETRAINED_DEMO_TASKS and config.baseline
    assert (f"(the demo's tasks with `doc_topic` as the text task, on MiniLM upcycled, {config.train.steps} steps, "
            f"batch {config.train.batch_size};") in readme
    bench = load_script("bench_pretrained", monkeypatch)
    assert config.model["init"] == "hf:minilm" and config.model["decoder_layers"] == 2
    assert config.model["upcycle"] == bench.UPCYCLE
    assert config.train.lr_scales == bench.PRETRAINED_LR_SCALES
    assert config.train.lr == bench.LEARNING_RATES["pretrained"]


def test_the_image_generation_recipe_is_the_run_the_readme_reports(readme):
    train = get_recipe("image_generation").train
    assert (f"with {train.masked_input_budget} input and {train.masked_target_budget} target positions"
            in readme)
    assert f"The recipe now gives text an input α of {train.masked_alpha['TEXT']}" in readme
    assert (f"one attribute-routed `debug` model, the four presets mixed {train.mixing}ly, {train.steps:,} steps of "
            f"{train.batch_size} samples, 1 thread; {train.eval_limit} held-out rows") in readme
