"""A denoise call's biases per pass (denoise/canvas_biases.py): each canvas's entries at its
own rows, whichever canvases are still in the batch and in whatever order."""

from __future__ import annotations

import torch

from diffusiongemma_vllm.denoise.canvas_biases import CanvasBiases, TokenBias


def test_each_canvas_gets_its_own_entries_at_its_positions():
    """Catches entries taken by batch position instead of job (after halted canvases leave the
    batch, or for a turn whose jobs start at `first_row`), `until` ignored or not clipped to
    the canvas, and padding entries that cover a position."""
    jobs = [(TokenBias(7, 1.5),), (), (TokenBias(9, -2.0, until=2), TokenBias(3, 0.5, until=99))]
    biases = CanvasBiases.of(jobs, canvas_length=4, first_row=10, device="cpu")
    got = biases.for_pass(torch.tensor([12, 10]), 4)  # job 2 first, then job 0; job 1 has halted
    triples = sorted(zip(got.rows.tolist(), got.ids.tolist(), got.values.tolist()))
    want = sorted([(0, 9, -2.0), (1, 9, -2.0)] + [(p, 3, 0.5) for p in range(4)] + [(4 + p, 7, 1.5) for p in range(4)])
    assert triples == want
    assert CanvasBiases.of([(), ()], 4, 0, "cpu") is None
    assert CanvasBiases.of(jobs, 4, 10, "cpu").for_pass(torch.tensor([11]), 4).rows.numel() == 0
