"""The debug recipe's first 12 losses equal the committed golden curve (scripts/make_golden_losses.py
rewrites it when a change is meant to alter training numerics)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_debug_recipe_reproduces_the_golden_loss_curve():
    spec = importlib.util.spec_from_file_location("make_golden_losses",
                                                  os.path.join(ROOT, "scripts", "make_golden_losses.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(os.path.join(ROOT, "tests", "data", "golden_debug_losses.json")) as f:
        golden = json.load(f)["losses"]
    assert script.debug_losses(len(golden)) == pytest.approx(golden, rel=1e-4)
