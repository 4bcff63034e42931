"""Every built-in task says under which licence its data comes; `moe-gen presets` lists them."""

import json

import pytest

from moe_gen import TASKS
from moe_gen.cli import main
from moe_gen.tasks import preset, preset_info


@pytest.mark.parametrize("name", TASKS.list())
def test_every_preset_names_a_licence(name):
    licence = preset_info(name).licence
    assert licence.strip() and any(word in licence for word in ("BSD", "PSF", "CC BY", "zlib", "MIT", "GPL",
                                                               "flite", "project's licence")), licence


def test_licences_of_the_sources():
    assert "CC BY 4.0" in preset_info("digit_classification").licence  # UCI digits
    assert "UCI Iris" in preset_info("table_species").licence
    assert preset_info("doc_topic").licence.startswith("PSF")
    assert "project's licence" in preset_info("sudoku_4x4").licence  # our own generator
    assert "zlib" in preset_info("motion_classification").licence
    assert "flite" in preset_info("speech_recognition").licence


def test_a_preset_without_a_licence_is_refused():
    with pytest.raises(ValueError, match="licence"):
        preset("nameless", "[TEXT:a] -> [TEXT:b]", "nowhere", ("exact_match",), licence=" ")
    with pytest.raises(TypeError):
        preset("nameless", "[TEXT:a] -> [TEXT:b]", "nowhere", ("exact_match",))  # licence is required
    assert "nameless" not in TASKS.list()


def test_the_presets_command_lists_instruction_metrics_and_licence(capsys):
    assert main(["presets", "sudoku_4x4", "text_to_sql", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["name"] for x in lines] == ["sudoku_4x4", "text_to_sql"]
    assert lines[1]["licence"] == preset_info("text_to_sql").licence and lines[0]["metrics"][0] == "sudoku_cells"
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}\n" in out for name in TASKS.list()) and out.count("  licence: ") == len(TASKS)
    assert main(["presets", "no_such_task"]) == 2
    assert "known: " in capsys.readouterr().err
