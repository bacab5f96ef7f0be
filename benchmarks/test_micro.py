"""pytest-benchmark micro-benchmarks on CPU: one sampler pass and one denoise pass.

They report, they do not assert timings. Run: `.venv/bin/python -m pytest benchmarks/test_micro.py`
(CI runs only tests/; these are for comparing changes on one machine).
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.kernels.vocab_tiled_sampler import naive_row_stats, vocab_tiled_row_stats


@pytest.mark.parametrize("stats", [naive_row_stats, vocab_tiled_row_stats], ids=["naive", "tiled"])
@pytest.mark.parametrize("canvases", [1, 8])
def test_sampler_pass(benchmark, canvases, stats):
    """Per-position statistics of one pass over `canvases` canvases of 256, vocab 32768."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden, rows = 32768, 256, 256 * canvases
    h = torch.randn(rows, hidden, generator=gen)
    embedding = torch.randn(vocab, hidden, generator=gen) * 0.1
    benchmark(stats, h, embedding, 30.0, torch.full((rows,), 0.7), torch.arange(rows), True)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    from diffusiongemma_vllm.testing.standalone import load_standalone
    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    spec = TinySpec(canvas_length=256, sliding_window=128, layer_types=("sliding_attention",) * 5 + ("full_attention",))
    model = load_standalone(str(build_tiny_checkpoint(tmp_path_factory.mktemp("micro"), spec)))
    model.allocate(8, 1024)
    return model


@pytest.mark.parametrize("canvases", [1, 8])
def test_denoise_pass(benchmark, standalone, canvases):
    rows = torch.arange(canvases)
    for r in range(canvases):
        standalone.prefill(rows[r:r + 1], torch.randint(3, 500, (1, 300)), torch.tensor([0]))
    canvas = torch.randint(0, 512, (canvases, 256))
    context = torch.full((canvases,), 300)
    benchmark(lambda: standalone.denoise(rows, canvas, context, None))
