"""train.py continues from a trained checkpoint (`--init-from`), and refuses one of another shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.sudoku_examples import SUDOKU, load

# One step, one small pool, no evaluation: the test checks where training starts, not how it learns.
ONE_STEP = ["--steps", "1", "--batch", "2", "--givens", "50-50", "--pool", "1", "--eval-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def train():
    return load("train")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def test_init_from_starts_at_the_checkpoints_weights(train, tmp_path):
    """Catches a continued run that silently starts from random weights (the shipped weights
    would be thrown away): at learning rate 0 one step must leave them exactly as loaded."""
    out = tmp_path / "out"
    train.main(["--run-dir", str(tmp_path / "run"), "--init-from", str(SUDOKU / "checkpoint"), "--lr", "0",
                "--out", str(out), *ONE_STEP])
    shipped, written = weights(SUDOKU / "checkpoint"), weights(out)
    assert shipped.keys() == written.keys()
    for name, tensor in shipped.items():
        assert torch.equal(tensor, written[name]), name


def test_init_from_a_checkpoint_of_another_shape_is_refused(train, tmp_path):
    with pytest.raises(SystemExit, match="does not fit this model"):
        train.main(["--run-dir", str(tmp_path / "run"), "--init-from", str(SUDOKU / "checkpoint"),
                    "--hidden", "64", *ONE_STEP])
