"""Sudoku puzzles from an exact generator (no data files), for the ``sudoku_4x4`` preset.

A solution grid is the classic pattern ``(box·(r mod box) + r div box + c) mod n`` shuffled by
the symmetries that keep it valid (digit relabelling, rows within a band, bands, columns within a
stack, stacks, transposition); cells are then blanked in random order, each blank kept only if
the puzzle still has exactly one solution (a backtracking count that stops at two). Every puzzle
therefore has one answer, and a predicted grid that is a valid sudoku and keeps the givens is that
answer. Grids are text: digits separated by spaces, 0 for a blank, rows separated by `` | ``.

Rows are drawn from ``random.Random(seed)``; a pool of distinct puzzles is split every 5th to test.
"""

from __future__ import annotations

import functools
import math
import random

__all__ = ["sudoku_rows", "grid_text", "parse_grid", "is_valid_solution", "count_solutions"]


def grid_text(grid: list[list[int]]) -> str:
    return " | ".join(" ".join(str(v) for v in row) for row in grid)


def parse_grid(text) -> list[list[int]] | None:
    """The grid written by ``grid_text`` (None when ``text`` is not a square grid of digits)."""
    try:
        rows = [[int(v) for v in row.split()] for row in str(text).split("|")]
    except ValueError:
        return None
    n = len(rows)
    return rows if n and all(len(row) == n for row in rows) else None


def _units(n: int):
    box = math.isqrt(n)
    yield from ([(r, c) for c in range(n)] for r in range(n))
    yield from ([(r, c) for r in range(n)] for c in range(n))
    for br in range(0, n, box):
        for bc in range(0, n, box):
            yield [(br + i, bc + j) for i in range(box) for j in range(box)]


def is_valid_solution(grid: list[list[int]] | None) -> bool:
    """Whether ``grid`` is a complete sudoku: every row, column and box holds 1..n once."""
    if grid is None or math.isqrt(len(grid)) ** 2 != len(grid):
        return False
    n = len(grid)
    want = set(range(1, n + 1))
    return all({grid[r][c] for r, c in unit} == want for unit in _units(n))


def count_solutions(grid: list[list[int]], limit: int = 2) -> int:
    """How many completions ``grid`` (0 = blank) has, counting no further than ``limit``."""
    n = len(grid)
    box = math.isqrt(n)
    cells = [list(row) for row in grid]
    blanks = [(r, c) for r in range(n) for c in range(n) if not cells[r][c]]

    def free(r, c):
        used = set(cells[r]) | {cells[i][c] for i in range(n)}
        br, bc = r - r % box, c - c % box
        used |= {cells[br + i][bc + j] for i in range(box) for j in range(box)}
        return [v for v in range(1, n + 1) if v not in used]

    def search(k: int, wanted: int) -> int:  # completions from blank k on, counting up to ``wanted``
        if k == len(blanks):
            return 1
        r, c = blanks[k]
        found = 0
        for v in free(r, c):
            cells[r][c] = v
            found += search(k + 1, wanted - found)
            cells[r][c] = 0
            if found >= wanted:
                break
        return found

    return search(0, limit)


def _solution(n: int, rng: random.Random) -> list[list[int]]:
    box = math.isqrt(n)
    digits = list(range(1, n + 1))
    rng.shuffle(digits)

    def order() -> list[int]:  # bands (or stacks) shuffled, and the lines within each
        bands = list(range(box))
        rng.shuffle(bands)
        return [b * box + i for b in bands for i in rng.sample(range(box), box)]

    rows, cols = order(), order()
    grid = [[digits[(box * (r % box) + r // box + c) % n] for c in cols] for r in rows]
    return [list(col) for col in zip(*grid)] if rng.random() < 0.5 else grid


def _puzzle(n: int, blanks: int, rng: random.Random) -> tuple[list[list[int]], list[list[int]]]:
    solution = _solution(n, rng)
    puzzle = [list(row) for row in solution]
    cells = [(r, c) for r in range(n) for c in range(n)]
    rng.shuffle(cells)
    removed = 0
    for r, c in cells:
        if removed == blanks:
            break
        kept, puzzle[r][c] = puzzle[r][c], 0
        if count_solutions(puzzle) == 1:
            removed += 1
        else:
            puzzle[r][c] = kept
    return puzzle, solution


@functools.lru_cache(maxsize=4)
def _pool(n: int, count: int, seed: int) -> tuple[tuple[str, str], ...]:
    rng = random.Random(seed)
    seen, pool = set(), []
    for _ in range(count * 20):
        if len(pool) == count:
            break
        puzzle, solution = _puzzle(n, rng.randint(n + n // 2, n * n - n), rng)
        text = grid_text(puzzle)
        if text not in seen:
            seen.add(text)
            pool.append((text, grid_text(solution)))
    return tuple(pool)


def sudoku_rows(split: str, size: int = 4, count: int = 1500, seed: int = 0) -> list[dict]:
    """Rows ``{"puzzle": text, "solution": text}`` of ``size``×``size`` sudokus (every 5th of a
    pool of ``count`` distinct puzzles is ``test``)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; known: train, test, all")
    if size < 4 or math.isqrt(size) ** 2 != size:
        raise ValueError(f"a sudoku's size is a square of at least 4 (4, 9, ...), got {size}")
    pool = _pool(size, count, seed)
    return [{"puzzle": p, "solution": s} for i, (p, s) in enumerate(pool)
            if split == "all" or (i % 5 == 0) == (split == "test")]
