"""Structure limits of the code base (issue 15), measured by scripts/check_structure.py: the call path
from the model's forward to the expert matmul, function length, import cycles, module-level state."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_structure.py")
_spec = importlib.util.spec_from_file_location("check_structure", _PATH)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_no_function_in_the_package_is_longer_than_60_lines():
    lines, where = check.longest_functions(1)[0]
    assert lines <= 60, f"{where} has {lines} lines"


def test_no_import_cycle_among_modules():
    assert check.import_cycles() == []


def test_no_module_level_mutable_state():
    assert check.module_state() == []


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    # a cycle, a long function and a module-level cache in a fake package are all found
    package = tmp_path / "moe_gen"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from moe_gen.b import g\n_CACHE = {}\n\ndef f(k):\n    _CACHE[k] = 1\n")
    (package / "b.py").write_text("from moe_gen.a import f\n\ndef g():\n" + "    x = 1\n" * 70)
    monkeypatch.setattr(check, "ROOT", str(package))
    assert check.import_cycles() == [["moe_gen.a", "moe_gen.b"]]
    assert check.longest_functions(1)[0][0] == 71
    assert check.module_state() == ["moe_gen/a.py:2 _CACHE"]


@pytest.mark.parametrize("router,backend", [("attribute", "torch"), ("token", "torch"), ("task", "merged")])
def test_the_forward_reaches_the_expert_matmul_in_at_most_8_hops(router, backend):
    hops = check.trace_hops(router, backend)
    assert hops["num_hops"] <= 8, hops["hops"]
    assert hops["path"][0].endswith("GeneralistModel.forward")
    # control never comes back into a module by another way than the one that first led there
    assert hops["reentries"] == [], hops["reentries"]


def test_the_script_fails_when_a_limit_is_broken():
    """It printed the figures and exited 0 whatever they were (a 66-line function went unnoticed until
    the test suite ran): now each broken limit is named, and main exits non-zero."""
    hops = {"num_hops": 4, "num_reentries": 0}
    assert check.over_limits(hops, [(60, "a.py:1 f")], [], []) == []
    broken = check.over_limits({"num_hops": 9, "num_reentries": 1}, [(66, "b.py:3 g"), (60, "a.py:1 f")],
                               [["moe_gen.a", "moe_gen.b"]], ["moe_gen/a.py:2 _CACHE"])
    assert broken == ["9 hops (at most 8), 1 re-entries (none)", "b.py:3 g has 66 lines (at most 60)",
                      "import cycle moe_gen.a → moe_gen.b", "module-level mutable state moe_gen/a.py:2 _CACHE"]

