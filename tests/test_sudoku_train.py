"""train.py continues from a trained checkpoint (`--init-from`), grows a shallower one deeper
without changing what it computes, and refuses one of another shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.sudoku_examples import SUDOKU, load

SHIPPED_LAYERS = ["--layers", "6"]  # the shipped checkpoint's depth (train.py's default is the recipe's 4)
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
                "--out", str(out), *SHIPPED_LAYERS, *ONE_STEP])
    shipped, written = weights(SUDOKU / "checkpoint"), weights(out)
    assert shipped.keys() == written.keys()
    for name, tensor in shipped.items():
        assert torch.equal(tensor, written[name]), name


def test_init_from_a_checkpoint_of_another_shape_is_refused(train, tmp_path):
    with pytest.raises(SystemExit, match="does not fit this model"):
        train.main(["--run-dir", str(tmp_path / "run"), "--init-from", str(SUDOKU / "checkpoint"),
                    "--hidden", "64", *SHIPPED_LAYERS, *ONE_STEP])


def test_a_deeper_model_starts_as_the_checkpoints_function(train, tmp_path):
    """Catches growth that changes the model (a layer misplaced, an inserted layer that adds to
    the residual stream): a 4-layer checkpoint grown to 6 layers gives exactly its training
    loss on the same draws, the inserted layers are the ones whose post-norm scales are zero,
    and the checkpoint's last layer stays last."""
    from sudoku_tokenizer import build_sudoku_tokenizer

    source = tmp_path / "four"
    spec = train.model_spec("cells", 128, 4)
    train.save_checkpoint(train.build_model(1, spec), spec, "cells", source)
    tokenizer = build_sudoku_tokenizer("cells")
    puzzle = ".6..329.7..7.4651.539..16.23946.8........342621645.8.997.314268.83..57.46427.935."
    solution = "461532987827946513539871642394628175758193426216457839975314268183265794642789351"
    prompts = torch.tensor([train.encode_prompt(tokenizer, puzzle)] * 4)
    targets = torch.tensor([train.encode_target(tokenizer, solution, "cells")] * 4)
    losses, models = [], []
    for layers in (4, 6):
        model = train.build_model(0, train.model_spec("cells", 128, layers))
        train.load_weights(model, source)
        with torch.no_grad():
            losses.append(train.diffusion_loss(model.eval(), prompts, targets, torch.Generator().manual_seed(0)))
        models.append(model)
    assert torch.equal(losses[0], losses[1])
    grown = models[1].model.decoder.layers
    assert [not layer.post_attention_layernorm.weight.any() for layer in grown] == \
        [False, False, False, True, True, False]
    assert torch.equal(grown[5].self_attn.q_proj.weight, weights(source)["model.decoder.layers.3.self_attn.q_proj.weight"])


def test_a_deeper_checkpoint_than_the_model_is_refused(train, tmp_path):
    with pytest.raises(SystemExit, match="more than this model"):
        train.main(["--run-dir", str(tmp_path / "run"), "--init-from", str(SUDOKU / "checkpoint"),
                    "--layers", "3", *ONE_STEP])
