"""Sudoku puzzle generation, solving and answer checking for the showcase.

This module owns the board format and everything that can be decided about a
board without a model: solving, counting solutions, generating puzzles with a
unique solution, checking a model's answer, and printing a grid.

Design points:
- A board is an 81-character row-major string of '1'-'9', with '.' for blanks.
- The solver is depth-first search over bitmasks (one 9-bit mask of used digits
  per row, column and box), always branching on the empty cell with the fewest
  candidates. Forced cells (one candidate) therefore cost no branching.
- Puzzles are made by blanking the cells of a full grid in random order and
  undoing any blank that would admit a second solution; uniqueness is what makes
  a puzzle's solution well defined as a training target.
- Everything random takes an explicit `random.Random`, so datasets are
  reproducible from a seed. Pure Python, no torch.
"""

from __future__ import annotations

import argparse
import random

BLANK = "."
DIGITS = "123456789"
FULL_MASK = 0x1FF
# What the model answers to a request that is not a valid board (trained on, see train.py).
INVALID_REPLY = "not a valid puzzle: 81 cells of 1-9 or ., no digit twice in a row, column or box"

ROW_OF = [i // 9 for i in range(81)]
COL_OF = [i % 9 for i in range(81)]
BOX_OF = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
CANDIDATE_COUNT = [bin(mask).count("1") for mask in range(512)]
# For each mask: the (bit, digit) pairs it contains, in increasing digit order.
CANDIDATES = [[(1 << d, d + 1) for d in range(9) if mask >> d & 1] for mask in range(512)]
UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[i for i in range(81) if BOX_OF[i] == b] for b in range(9)]
)


def _search(puzzle: str, limit: int, rng: random.Random | None = None) -> tuple[int, str | None]:
    """Count solutions up to `limit`; also return the first one found.

    With `rng`, candidate digits are tried in random order (used to draw grids).
    """
    if len(puzzle) != 81:
        raise ValueError(f"board must have 81 cells, got {len(puzzle)}")
    cells = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    empties = []
    for i, ch in enumerate(puzzle):
        if ch == BLANK:
            empties.append(i)
            continue
        if ch not in DIGITS:
            raise ValueError(f"invalid cell character {ch!r}")
        bit = 1 << (int(ch) - 1)
        r, c, b = ROW_OF[i], COL_OF[i], BOX_OF[i]
        if (rows[r] | cols[c] | boxes[b]) & bit:
            return 0, None
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        cells[i] = int(ch)

    count = 0
    first: list[str] = []

    def descend(n_empty: int) -> bool:
        """Fill empties[:n_empty]; return True once `limit` solutions are seen."""
        nonlocal count
        if n_empty == 0:
            count += 1
            if not first:
                first.append("".join(map(str, cells)))
            return count >= limit
        best_k, best_free, best_n = 0, 0, 10
        for k in range(n_empty):
            i = empties[k]
            free = FULL_MASK & ~(rows[ROW_OF[i]] | cols[COL_OF[i]] | boxes[BOX_OF[i]])
            n = CANDIDATE_COUNT[free]
            if n < best_n:
                best_k, best_free, best_n = k, free, n
                if n <= 1:
                    break
        if best_n == 0:
            return False
        # Move the chosen cell to the end of the active prefix; the prefix keeps
        # the same set of cells, so no swap back is needed.
        i = empties[best_k]
        empties[best_k], empties[n_empty - 1] = empties[n_empty - 1], i
        r, c, b = ROW_OF[i], COL_OF[i], BOX_OF[i]
        options = CANDIDATES[best_free]
        if rng is not None:
            options = options[:]
            rng.shuffle(options)
        for bit, digit in options:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = digit
            if descend(n_empty - 1):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        cells[i] = 0
        return False

    descend(len(empties))
    return count, (first[0] if first else None)


def solve(puzzle: str) -> str | None:
    """Return a solution of `puzzle` (the first found), or None if it has none."""
    return _search(puzzle, limit=1)[1]


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions of `puzzle`, counting stops at `limit`."""
    return _search(puzzle, limit=limit)[0]


def random_solution(rng: random.Random) -> str:
    """A random full valid grid.

    Randomized backtracking can reach every valid grid, unlike permuting one
    pattern grid (which stays inside that grid's symmetry class), though it is
    not exactly uniform over all grids.
    """
    solution = _search(BLANK * 81, limit=1, rng=rng)[1]
    assert solution is not None
    return solution


def make_puzzle(rng: random.Random, givens: int, max_attempts: int = 100) -> tuple[str, str]:
    """Return (puzzle, solution) with exactly `givens` clues and a unique solution."""
    if not 17 <= givens <= 81:
        raise ValueError(f"givens must be in [17, 81], got {givens}")
    for _ in range(max_attempts):
        solution = random_solution(rng)
        board = list(solution)
        order = list(range(81))
        rng.shuffle(order)
        remaining = 81
        for i in order:
            if remaining == givens:
                break
            board[i] = BLANK
            if count_solutions("".join(board), limit=2) == 1:
                remaining -= 1
            else:
                board[i] = solution[i]
        if remaining == givens:
            return "".join(board), solution
    raise RuntimeError(f"no unique puzzle with {givens} givens after {max_attempts} grids")


def board_problem(text: str) -> str | None:
    """Why `text` is not a valid board (None if it is one): length, characters, or a clash.

    A valid board is 81 characters of '1'-'9' and '.' ('0' also counts as a blank) with no
    digit twice in a row, column or box. Whether it has one solution is `count_solutions`'
    business.
    """
    board = text.replace("0", BLANK)
    if len(board) != 81:
        return f"a board has 81 cells, this has {len(board)}"
    wrong = sorted(set(board) - set(DIGITS + BLANK))
    if wrong:
        return f"cells are 1-9 or '.', not {''.join(wrong)!r}"
    for k, unit in enumerate(UNITS):
        digits = [board[i] for i in unit if board[i] != BLANK]
        if len(digits) != len(set(digits)):
            return f"a digit repeats in {('row', 'column', 'box')[k // 9]} {k % 9 + 1}"
    return None


def givens_kept(puzzle: str, candidate: str) -> bool:
    """True if `candidate` has the same digit as `puzzle` in every given cell."""
    return len(candidate) == 81 and all(p == BLANK or p == c for p, c in zip(puzzle, candidate))


def is_valid_solution(puzzle: str, candidate: str) -> bool:
    """True if `candidate` is a full, rule-consistent grid that keeps the givens.

    Checked against the rules rather than a stored solution, so any correct
    answer is accepted.
    """
    if len(candidate) != 81 or any(ch not in DIGITS for ch in candidate):
        return False
    if not givens_kept(puzzle, candidate):
        return False
    return all(len({candidate[i] for i in unit}) == 9 for unit in UNITS)


def cell_accuracy(candidate: str, solution: str, puzzle: str) -> float:
    """Fraction of `puzzle`'s blank cells where `candidate` matches `solution`.

    Givens are excluded: a model that copies its input would otherwise score
    well without solving anything.
    """
    blanks = [i for i, ch in enumerate(puzzle) if ch == BLANK]
    if not blanks:
        return 1.0
    return sum(candidate[i] == solution[i] for i in blanks) / len(blanks)


def random_symmetry(rng: random.Random) -> tuple[list[int], str]:
    """A random validity-preserving transform of the grid: (cell map, digit relabelling).

    Drawn from the Sudoku symmetry group: transpose or not, the three bands and the three
    stacks in any order, the rows inside each band and the columns inside each stack in any
    order, and any permutation of the digits. `apply_symmetry` uses it; cell i of the result
    is cell `cells[i]` of the input.
    """
    def axis_order() -> list[int]:
        blocks = rng.sample(range(3), 3)
        return [3 * b + k for b in blocks for k in rng.sample(range(3), 3)]

    rows, cols, transpose = axis_order(), axis_order(), rng.random() < 0.5
    cells = []
    for r in range(9):
        for c in range(9):
            src_r, src_c = rows[r], cols[c]
            cells.append(src_c * 9 + src_r if transpose else src_r * 9 + src_c)
    digits = rng.sample(DIGITS, 9)
    return cells, "".join(digits)


def apply_symmetry(board: str, symmetry: tuple[list[int], str]) -> str:
    """`board` moved by a `random_symmetry` (blanks stay blank)."""
    cells, digits = symmetry
    table = str.maketrans(DIGITS, digits)
    return "".join(board[i] for i in cells).translate(table)


def render(board: str) -> str:
    """A 9x9 text grid with separators between 3x3 boxes."""
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        row = board[r * 9 : r * 9 + 9]
        lines.append(" | ".join(" ".join(row[s : s + 3]) for s in (0, 3, 6)))
    return "\n".join(lines)


def generate_dataset(seed: int, count: int, givens_range: tuple[int, int]) -> list[tuple[str, str]]:
    """`count` (puzzle, solution) pairs, givens drawn uniformly from the inclusive range."""
    low, high = givens_range
    rng = random.Random(seed)
    return [make_puzzle(rng, rng.randint(low, high)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Print 'puzzle solution' lines.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--givens", default="45", help="a number, or an inclusive range like 40-50")
    args = parser.parse_args()
    low, _, high = args.givens.partition("-")
    for puzzle, solution in generate_dataset(args.seed, args.count, (int(low), int(high or low))):
        print(puzzle, solution)


if __name__ == "__main__":
    main()
