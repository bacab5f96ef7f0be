"""Tests for examples/sudoku/puzzles.py (loaded by path: examples/ is not a package)."""

import random

import pytest

from tests.sudoku_examples import load

puzzles = load("puzzles")

# Arto Inkala's "world's hardest sudoku": needs real search, not just forced cells.
HARD = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
HARD_SOLUTION = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"


def _blanks(board):
    return board.count(puzzles.BLANK)


def test_solver_solves_hard_puzzle():
    """Prevents a solver that only propagates singles or backtracks wrongly from passing."""
    assert puzzles.solve(HARD) == HARD_SOLUTION
    assert puzzles.count_solutions(HARD) == 1


def test_solver_reports_no_solution_and_multiple_solutions():
    """Prevents contradictory givens being 'solved' and an empty grid counted as unique."""
    contradictory = "11" + "." * 79
    assert puzzles.solve(contradictory) is None
    assert puzzles.count_solutions(contradictory) == 0
    assert puzzles.count_solutions("." * 81, limit=2) == 2
    assert puzzles.count_solutions("." * 81, limit=5) == 5


def test_random_solution_is_valid_and_varies():
    """Prevents the grid generator returning invalid grids or ignoring its rng."""
    rng = random.Random(0)
    grids = {puzzles.random_solution(rng) for _ in range(5)}
    assert len(grids) == 5
    for grid in grids:
        assert puzzles.is_valid_solution("." * 81, grid)


@pytest.mark.parametrize("givens", [45, 35, 30])
def test_generated_puzzle_is_unique_with_requested_givens(givens):
    """Prevents puzzles with several solutions (ambiguous targets) or the wrong clue count."""
    rng = random.Random(givens)
    for _ in range(5):
        puzzle, solution = puzzles.make_puzzle(rng, givens)
        assert 81 - _blanks(puzzle) == givens
        assert puzzles.count_solutions(puzzle, limit=2) == 1
        assert puzzles.solve(puzzle) == solution
        assert puzzles.is_valid_solution(puzzle, solution)


def test_dataset_is_deterministic_per_seed():
    """Prevents unseeded randomness, which would make train/eval splits irreproducible."""
    first = puzzles.generate_dataset(seed=7, count=20, givens_range=(40, 50))
    assert first == puzzles.generate_dataset(seed=7, count=20, givens_range=(40, 50))
    assert first != puzzles.generate_dataset(seed=8, count=20, givens_range=(40, 50))
    assert len(first) == 20
    assert all(40 <= 81 - _blanks(p) <= 50 for p, _ in first)
    assert len({p for p, _ in first}) == 20


def test_validity_rejects_bad_candidates():
    """Prevents wrong, inconsistent, incomplete or given-changing answers scoring as correct."""
    puzzle, solution = puzzles.make_puzzle(random.Random(3), 40)
    assert puzzles.is_valid_solution(puzzle, solution)

    blank = next(i for i, ch in enumerate(puzzle) if ch == puzzles.BLANK)
    wrong_digit = "1" if solution[blank] != "1" else "2"
    inconsistent = solution[:blank] + wrong_digit + solution[blank + 1 :]
    assert not puzzles.is_valid_solution(puzzle, inconsistent)

    # A full valid grid that differs from the givens: relabel every digit.
    relabelled = solution.translate(str.maketrans("123456789", "234567891"))
    assert puzzles.is_valid_solution("." * 81, relabelled)
    assert not puzzles.givens_kept(puzzle, relabelled)
    assert not puzzles.is_valid_solution(puzzle, relabelled)

    assert puzzles.givens_kept(puzzle, inconsistent)
    assert not puzzles.is_valid_solution(puzzle, solution[:-1])
    assert not puzzles.is_valid_solution(puzzle, solution[:blank] + "." + solution[blank + 1 :])
    assert not puzzles.is_valid_solution(puzzle, solution[:blank] + "0" + solution[blank + 1 :])


def test_cell_accuracy_counts_only_blanks():
    """Prevents givens inflating accuracy, so copying the input does not score well."""
    puzzle, solution = puzzles.make_puzzle(random.Random(5), 45)
    assert puzzles.cell_accuracy(solution, solution, puzzle) == 1.0
    copied_input = puzzle.replace(puzzles.BLANK, "0")
    assert puzzles.cell_accuracy(copied_input, solution, puzzle) == 0.0

    blanks = [i for i, ch in enumerate(puzzle) if ch == puzzles.BLANK]
    half = solution[: blanks[0]] + "0" + solution[blanks[0] + 1 :]
    assert puzzles.cell_accuracy(half, solution, puzzle) == pytest.approx(1 - 1 / len(blanks))


def test_render_shows_grid_with_box_separators():
    """Prevents a render that drops cells or misplaces the 3x3 box lines."""
    text = puzzles.render(HARD)
    lines = text.splitlines()
    assert len(lines) == 11
    assert lines[0] == "8 . . | . . . | . . ."
    assert lines[3] == lines[7] == "------+-------+------"
    assert "".join(ch for ch in text if ch in "123456789.") == HARD


def test_symmetry_keeps_puzzles_valid_and_unique():
    """Prevents an augmentation that breaks a puzzle (a transform outside the Sudoku group,
    or puzzle and solution moved differently) from feeding training wrong targets."""
    rng = random.Random(3)
    puzzle, solution = puzzles.make_puzzle(rng, 30)
    seen = set()
    for _ in range(20):
        symmetry = puzzles.random_symmetry(rng)
        moved_puzzle, moved_solution = (puzzles.apply_symmetry(b, symmetry) for b in (puzzle, solution))
        assert _blanks(moved_puzzle) == _blanks(puzzle)
        assert puzzles.is_valid_solution(moved_puzzle, moved_solution)
        assert puzzles.count_solutions(moved_puzzle) == 1
        seen.add(moved_puzzle)
    assert len(seen) == 20


def test_board_problem_names_what_is_wrong():
    """Prevents solve.py and the training data calling a malformed or clashing board valid,
    or a valid one (with '0' blanks) invalid."""
    puzzle, _ = puzzles.make_puzzle(random.Random(4), 40)
    assert puzzles.board_problem(puzzle) is None
    assert puzzles.board_problem(puzzle.replace(".", "0")) is None
    assert "81 cells" in puzzles.board_problem(puzzle[:80])
    assert "'x'" in puzzles.board_problem("x" + puzzle[1:])
    assert puzzles.board_problem("11" + "." * 79) == "a digit repeats in row 1"
    assert puzzles.board_problem("1" + "." * 8 + "1" + "." * 71) == "a digit repeats in column 1"
    assert puzzles.board_problem("1" + "." * 9 + "1" + "." * 70) == "a digit repeats in box 1"
