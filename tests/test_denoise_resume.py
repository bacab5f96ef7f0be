"""A block denoised a few passes per call, resumed from the pending state, against one call.

With `passes_per_step` the engine stops each canvas after a few passes and continues it in a
later scheduler step, possibly beside other canvases and in another request order. The
result must be what one uninterrupted call gives: the same tokens and pass counts.
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.loop import CanvasJob, denoise_canvases, row_stats_for
from diffusiongemma_vllm.denoise.graphs import DenoiseGraphs
from diffusiongemma_vllm.testing.standalone import load_standalone
from tests.test_denoise_graphs import KNOBS, PROMPTS, RecordedGraph


@pytest.fixture(scope="module")
def standalone(tiny_dir):
    return load_standalone(tiny_dir)


def prefilled(model):
    model.allocate(len(PROMPTS), 256)
    store_rows = torch.arange(len(PROMPTS))
    for r, prompt in enumerate(PROMPTS):
        model.prefill(store_rows[r:r + 1], torch.tensor([prompt]), torch.tensor([0]))
    context = torch.tensor([len(p) for p in PROMPTS])
    return store_rows, context


@pytest.mark.parametrize("max_passes, with_graphs", [(1, False), (2, False), (4, True)])
def test_resumed_canvases_equal_one_uninterrupted_call(standalone, max_passes, with_graphs):
    """Catches state lost between calls (self-conditioning, the stability counter, the pass
    counter that keys the draws), a resumed canvas put in the wrong row, and a pending batch
    that aliases a graph's static batch (replays would overwrite it)."""
    model, cfg = standalone, standalone.model.cfg
    store_rows, context = prefilled(model)
    order = [2, 0, 1]  # calls after the first take the unfinished requests in this order
    static_rows = torch.zeros(len(PROMPTS), dtype=torch.long)  # job -> request, updated in place per call

    def run_pass(rows, canvas, soft):
        picked = static_rows[rows]
        return model.denoise(store_rows[picked], canvas, context[picked], soft)

    unembedding = model.model.unembedding()
    jobs = [CanvasJob(0, SamplerConfig().with_request_overrides(k), seed=31 + i) for i, k in enumerate(KNOBS)]
    static_rows.copy_(torch.arange(len(PROMPTS)))
    whole = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding)

    graphs = None
    if with_graphs:
        graphs = DenoiseGraphs(run_pass, unembedding, row_stats_for(torch.device("cpu")), ladder=(1, 2, 4),
                               graph_factory=RecordedGraph)
    tokens, passes, held, calls = {}, {}, {}, 0
    while len(tokens) < len(jobs):
        requests = [0, 1, 2] if calls == 0 else [r for r in order if r not in tokens]
        static_rows[:len(requests)] = torch.tensor(requests)
        part = denoise_canvases([jobs[r] for r in requests], cfg.canvas_length, run_pass, unembedding,
                                graphs=graphs, max_passes=max_passes,
                                resumed={i: held.pop(r) for i, r in enumerate(requests) if r in held})
        for i, r in enumerate(requests):
            if part.passes[i] >= 0:
                tokens[r], passes[r] = part.tokens[i], int(part.passes[i])
        for job, state in part.pending.items():
            held[requests[job]] = state
        calls += 1
    assert [passes[r] for r in range(3)] == whole.passes.tolist() == [3, 6, 1]
    assert torch.equal(torch.stack([tokens[r] for r in range(3)]), whole.tokens)
    assert calls == -(-6 // max_passes)  # the longest canvas needed ceil(6 / max_passes) calls
    if with_graphs:
        assert graphs.replays > 0
