"""The sudoku_4x4 preset: an exact generator (one solution per puzzle, disjoint splits) and its
metrics (exact match, cell accuracy, validity)."""

import pytest
import torch

from moe_gen.tasks import Tokenizer, load_preset, preset_info
from moe_gen.tasks.metrics import compute
from moe_gen.tasks.sources.puzzles import count_solutions, grid_text, is_valid_solution, parse_grid, sudoku_rows

SOLVED = "1 2 3 4 | 3 4 1 2 | 2 1 4 3 | 4 3 2 1"


def test_every_puzzle_has_one_solution_and_the_splits_are_disjoint():
    train, test = sudoku_rows("train"), sudoku_rows("test")
    assert len(train) == 1200 and len(test) == 300 and sudoku_rows("train") == train  # deterministic
    assert not {r["puzzle"] for r in train} & {r["puzzle"] for r in test}
    for row in train[:200] + test[:100]:
        puzzle, solution = parse_grid(row["puzzle"]), parse_grid(row["solution"])
        assert is_valid_solution(solution) and count_solutions(puzzle) == 1
        assert all(p in (0, s) for prow, srow in zip(puzzle, solution) for p, s in zip(prow, srow))  # givens kept
        assert 6 <= sum(v == 0 for prow in puzzle for v in prow) <= 12


def test_grid_checks():
    assert is_valid_solution(parse_grid(SOLVED))
    assert not is_valid_solution(parse_grid("1 2 3 4 | 3 4 1 2 | 2 1 4 3 | 4 3 1 2"))  # columns repeat
    assert parse_grid("1 2 | 3") is None and parse_grid("a b | c d") is None
    assert count_solutions(parse_grid("0 0 0 0 | 0 0 0 0 | 0 0 0 0 | 0 0 0 0"), limit=5) == 5
    with pytest.raises(ValueError, match="unknown split"):
        sudoku_rows("dev")


def test_metrics_score_exact_answers_cells_and_validity():
    other = "2 1 4 3 | 4 3 2 1 | 1 2 3 4 | 3 4 1 2"  # valid, but another grid
    scores = compute(("exact_match", "sudoku_cells", "sudoku_valid"), [SOLVED, other, "nonsense", "1 2 | 3 4"],
                     [SOLVED] * 4)
    assert scores["exact_match"] == 0.25 and scores["sudoku_valid"] == 0.5
    assert scores["sudoku_cells"] == pytest.approx((1.0 + 0.0 + 0.0 + 0.0) / 4)
    # a complete, valid grid of another size (1x1 here) is no answer to a 4x4 puzzle
    assert compute(("sudoku_valid", "sudoku_cells"), ["1"], [SOLVED]) == {"sudoku_valid": 0.0, "sudoku_cells": 0.0}


def test_the_preset_encodes_and_decodes(tmp_path):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.trainer.evaluation import evaluate_task

    info = preset_info("sudoku_4x4")
    assert info.metrics == ("sudoku_cells", "exact_match", "sudoku_valid") and "exact generator" in info.source
    tok = Tokenizer.default()
    task = load_preset("sudoku_4x4", "train", limit=4)
    assert len(tok.encode(task.data[0]["solution"])) == 19  # a digit per token, 3 row separators
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    scores = evaluate_task(model, load_preset("sudoku_4x4", "test", limit=3))
    assert set(scores) == {"exact_match", "sudoku_cells", "sudoku_valid"}


def test_splits_take_every_fifth_of_a_pool_of_distinct_puzzles():
    every = sudoku_rows("all")
    assert len(every) == 1500 and len({r["puzzle"] for r in every}) == 1500
    assert sudoku_rows("test") == every[::5]
    assert sudoku_rows("train") == [r for i, r in enumerate(every) if i % 5]
    for row in every[:50]:
        assert row["puzzle"] == grid_text(parse_grid(row["puzzle"]))  # digits, " " within a row, " | " between
        assert len(row["puzzle"]) == len("0 0 0 0 | ") * 4 - len(" | ")


def test_solutions_include_every_grid_with_its_transpose():
    # transposition is one of the shuffling symmetries: the set of solution grids is closed under it
    grids = {r["solution"] for r in sudoku_rows("all")}
    transposed = {grid_text([list(col) for col in zip(*parse_grid(g))]) for g in grids}
    assert transposed == grids and len(grids) > 100


def test_grid_checks_of_other_sizes_and_counting_two_solutions():
    assert grid_text([[1, 2], [3, 4]]) == "1 2 | 3 4"
    latin5 = [[(r + c) % 5 + 1 for c in range(5)] for r in range(5)]  # rows and columns fine, not a sudoku
    assert not is_valid_solution(latin5) and not is_valid_solution([[1, 2], [2, 1]]) and not is_valid_solution(None)
    assert is_valid_solution([[1]])
    # blanking a 2x2 rectangle of 1s and 2s across two boxes leaves two completions
    two = parse_grid("0 0 3 4 | 3 4 1 2 | 0 0 4 3 | 4 3 2 1")
    assert count_solutions(two) == 2 and count_solutions(two, limit=1) == 1
    for size in (5, 1):  # (1: random's "empty range in randrange" before)
        with pytest.raises(ValueError, match=f"a sudoku's size is a square of at least 4 .*got {size}"):
            sudoku_rows("train", size=size, count=2)


def test_the_generator_makes_9x9_puzzles_too():
    (row,) = sudoku_rows("all", size=9, count=1, seed=1)  # seed 1: one puzzle in milliseconds
    puzzle, solution = parse_grid(row["puzzle"]), parse_grid(row["solution"])
    assert len(puzzle) == 9 and is_valid_solution(solution)
    assert all(p in (0, s) for prow, srow in zip(puzzle, solution) for p, s in zip(prow, srow))
