"""Tests for examples/sudoku/sudoku_tokenizer.py: the cell tokens and the text users see."""

import pytest

from tests.sudoku_examples import load

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


@pytest.fixture(scope="module")
def sudoku_tokenizer():
    return load("sudoku_tokenizer")


@pytest.fixture(scope="module")
def cells(sudoku_tokenizer):
    return sudoku_tokenizer.build_sudoku_tokenizer("cells")


def test_each_cell_is_one_token_naming_its_cell(sudoku_tokenizer, cells):
    """Prevents a tokenizer whose tokens do not carry the cell (the format lever) or that
    splits a cell into several tokens (the canvas would no longer line up with the prompt)."""
    ids = cells(PUZZLE + "\n")["input_ids"]
    assert len(ids) == 1 + 81 + 1
    assert ids[0] == cells.bos_token_id
    vocab = cells.get_vocab()
    assert ids[1:82] == [vocab[sudoku_tokenizer.cell_token(i, ch)] for i, ch in enumerate(PUZZLE)]
    assert ids[-1] == sudoku_tokenizer.standalone_ids("\n")[0]
    # The same digit in two cells is two tokens: the '5' of cell 0 and the next '5'.
    other_five = PUZZLE.index("5", 1)
    assert ids[1] != ids[1 + other_five]
    assert cells.decode([ids[1]]) == cells.decode([ids[1 + other_five]]) == "5"


def test_users_text_is_unchanged(cells):
    """Prevents the cell markers leaking into what a user reads, and '0' blanks (the Kaggle
    and Gemma-recipe format) being read differently from '.'."""
    ids = cells(PUZZLE + "\n")["input_ids"]
    assert cells.decode(ids, skip_special_tokens=True) == PUZZLE + "\n"
    assert cells(PUZZLE.replace(".", "0") + "\n")["input_ids"] == ids


def test_replies_are_standalone_characters(sudoku_tokenizer, cells):
    """Prevents the reply (digits, or the invalid-puzzle message) from needing characters the
    vocabulary lacks, or decoding to other text."""
    puzzles = load("puzzles")
    for text in (puzzles.INVALID_REPLY, "534678912"):
        ids = sudoku_tokenizer.standalone_ids(text)
        assert max(ids) < sudoku_tokenizer.VOCAB_SIZES["cells"]
        assert cells.decode(ids) == text


def test_filler_ids_never_show_as_text(sudoku_tokenizer, cells):
    """Prevents an untrained or confused model's filler ids appearing as '<unusedN>' in replies."""
    filler = len(cells) - 1
    assert cells.convert_ids_to_tokens(filler).startswith("<unused")
    assert cells.decode([filler] + sudoku_tokenizer.standalone_ids("12"), skip_special_tokens=True) == "12"
    assert len(cells) == sudoku_tokenizer.VOCAB_SIZES["cells"]
