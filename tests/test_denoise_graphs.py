"""The graph-replayed denoise loop against the eager one, on CPU with a recorded stand-in graph.

A CUDA graph replays the captured kernels on the captured addresses. `RecordedGraph` mimics
that on CPU: capture keeps the work without running it, replay re-runs it against whatever
the captured tensors hold then. So these tests catch what breaks graphs on a GPU: state kept
outside the static batch, inputs read from per-step tensors instead of static ones, padding
rows that change results, and canvases that keep changing after they halt inside a replay.
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.loop import CanvasBatch, CanvasJob, denoise_canvases, row_stats_for
from diffusiongemma_vllm.denoise.graphs import DenoiseGraphs, ladder_for
from diffusiongemma_vllm.testing.standalone import load_standalone

# Halting after 3 passes, after 6, and after 1 (stability off, confidence always met).
KNOBS = [{"max_denoising_steps": 3}, {"max_denoising_steps": 6, "entropy_bound": 0.5},
         {"stability_threshold": 0, "confidence_threshold": 100.0}]
PROMPTS = [[2, 17, 99, 4], [2] + list(range(30, 53)), [2] + list(range(60, 100))]


class RecordedGraph:
    def __init__(self, pool):
        self.work = None

    def capture(self, work):
        self.work = work

    def replay(self):
        self.work()


@pytest.fixture(scope="module")
def standalone(tiny_dir):
    return load_standalone(tiny_dir)


def short_prompt_requests(model, n: int):
    """Prefill n requests with one 4-token prompt; returns the run_pass over them."""
    model.allocate(n, 256)
    store_rows = torch.arange(n)
    model.prefill(store_rows, torch.tensor([[2, 5, 6, 7]] * n), torch.zeros(n, dtype=torch.long))
    context = torch.full((n,), 4)

    def run_pass(rows, canvas, soft):
        return model.denoise(store_rows[rows], canvas, context[rows], soft)

    return run_pass


@pytest.mark.parametrize("passes_per_replay, replays_per_block, sizes", [(1, 6, [1, 2, 4]), (3, 2, [1, 4])])
def test_replayed_passes_equal_eager_passes(standalone, passes_per_replay, replays_per_block, sizes):
    """Over two blocks, three requests halting after 1, 3 and 6 passes give the same tokens and
    pass counts replayed as eagerly, while the batch shrinks through the ladder sizes. With 3
    passes per replay two canvases halt inside the first replay and must stay frozen."""
    model, cfg = standalone, standalone.model.cfg
    model.allocate(len(PROMPTS), 256)
    store_rows = torch.arange(len(PROMPTS))
    for r, prompt in enumerate(PROMPTS):
        model.prefill(store_rows[r:r + 1], torch.tensor([prompt]), torch.tensor([0]))
    # Static per-step inputs, indexed by job: what the engine keeps for its graphs.
    static_context = torch.tensor([len(p) for p in PROMPTS])

    def run_pass(rows, canvas, soft):
        return model.denoise(store_rows[rows], canvas, static_context[rows], soft)

    unembedding = model.model.unembedding()
    graphs = DenoiseGraphs(run_pass, unembedding, row_stats_for(torch.device("cpu")), ladder=(1, 2, 4),
                           passes_per_replay=passes_per_replay, graph_factory=RecordedGraph)
    for block in range(2):
        jobs = [CanvasJob(block, SamplerConfig().with_request_overrides(k), seed=21 + i) for i, k in enumerate(KNOBS)]
        eager = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding)
        replayed = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding, graphs=graphs)
        assert replayed.passes.tolist() == eager.passes.tolist() == [3, 6, 1]
        assert torch.equal(replayed.tokens, eager.tokens)
        model.prefill(store_rows, eager.tokens, static_context.clone())
        static_context += cfg.canvas_length  # in place: the captured run_pass sees the new prefix
    assert sorted(graphs.captured) == sizes
    assert graphs.replays == 2 * replays_per_block


def test_batches_beyond_the_ladder_run_eagerly(standalone):
    """Catches a lookup past the largest ladder size (StopIteration) instead of the eager path."""
    model, cfg = standalone, standalone.model.cfg
    run_pass = short_prompt_requests(model, 3)
    graphs = DenoiseGraphs(run_pass, model.model.unembedding(), row_stats_for(torch.device("cpu")), ladder=(1, 2),
                           graph_factory=RecordedGraph)
    jobs = [CanvasJob(0, SamplerConfig(max_denoising_steps=2, stability_threshold=0, confidence_threshold=0.0),
                      seed=s) for s in range(3)]
    result = denoise_canvases(jobs, cfg.canvas_length, run_pass, model.model.unembedding(), graphs=graphs)
    assert result.passes.tolist() == [2, 2, 2]
    assert not graphs.captured and graphs.replays == 0


def test_ladder_covers_max_num_seqs_and_captures_largest_first(standalone):
    """Catches start-up captures of sizes no step can need (memory for nothing; a top rounded
    up past the canvases a pass may hold needs more than the workspaces vLLM locked, and the
    failed capture turned every graph off), a ladder whose top cannot hold max_num_seqs
    canvases, and captures in an order that keeps the smaller graphs from reusing the
    largest one's memory pool."""
    assert ladder_for(1) == (1,)
    assert ladder_for(5) == (1, 2, 4, 5)
    assert ladder_for(39) == (1, 2, 4, 8, 16, 32, 39)
    assert ladder_for(64) == (1, 2, 4, 8, 16, 32, 64)
    assert ladder_for(256) == (1, 2, 4, 8, 16, 32, 64)
    cfg = standalone.model.cfg
    unembedding = standalone.model.unembedding()
    graphs = DenoiseGraphs(lambda rows, canvas, soft: None, unembedding, row_stats_for(torch.device("cpu")),
                           ladder=ladder_for(5), graph_factory=RecordedGraph)
    like = CanvasBatch.start([CanvasJob(0, SamplerConfig(), seed=0)], cfg.canvas_length, cfg.vocab_size,
                             cfg.hidden_size, torch.float32, "cpu")
    graphs.capture_ladder(like)
    assert list(graphs.captured) == [5, 4, 2, 1]
    assert [len(static) for _, static in graphs.captured.values()] == [5, 4, 2, 1]


def test_paged_step_inputs_put_ready_requests_in_job_order():
    """Catches the static GPU inputs filled in batch order instead of ready (job) order, or
    one KV group's table rows copied into another's: the captured passes index context
    lengths and block tables by job."""
    from types import SimpleNamespace

    from diffusiongemma_vllm.engine.step_prefixes import PagedStepInputs

    tables = [torch.arange(5 * 3, dtype=torch.int32).view(5, 3), 100 + torch.arange(5 * 2, dtype=torch.int32).view(5, 2)]
    runner = SimpleNamespace(input_batch=SimpleNamespace(
        num_reqs=5, block_table=[SimpleNamespace(get_device_tensor=lambda n, t=t: t[:n]) for t in tables]))
    inputs = PagedStepInputs(torch.full((8,), -1), [torch.full((8, 3), -1, dtype=torch.int32),
                                                     torch.full((8, 2), -1, dtype=torch.int32)], {})
    inputs.load(runner, ready=[4, 1, 2], context=[40, 10, 20])
    assert inputs.context_lens[:3].tolist() == [40, 10, 20]
    assert torch.equal(inputs.tables[0][:3], tables[0][[4, 1, 2]])
    assert torch.equal(inputs.tables[1][:3], tables[1][[4, 1, 2]])


class FailingGraph(RecordedGraph):
    def capture(self, work):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("up_front", [False, True])
def test_a_failed_capture_turns_graphs_off_and_the_step_still_completes(standalone, up_front):
    """Catches a capture failure (an op that cannot be captured, memory) that kills engine
    start-up or the step being served: the graphs switch off, say why, and the passes run
    eagerly with the same tokens."""
    model, cfg = standalone, standalone.model.cfg
    run_pass = short_prompt_requests(model, 2)
    unembedding = model.model.unembedding()
    graphs = DenoiseGraphs(run_pass, unembedding, row_stats_for(torch.device("cpu")), ladder=(1, 2),
                           graph_factory=FailingGraph)
    jobs = [CanvasJob(0, SamplerConfig(**k), seed=s) for s, k in enumerate(KNOBS[:2])]
    if up_front:
        graphs.capture_ladder(CanvasBatch.start(jobs, cfg.canvas_length, cfg.vocab_size, cfg.hidden_size,
                                                torch.float32, "cpu"))
    replayed = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding, graphs=graphs)
    eager = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding)
    assert "RuntimeError: operation not permitted" in graphs.disabled
    assert not graphs.captured and not graphs.covers(1)
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.passes, eager.passes)


def test_a_capture_that_failed_on_another_rank_turns_these_graphs_off_too(standalone):
    """Catches tensor-parallel ranks disagreeing on graphs after one rank's capture failed: that
    rank would run eager passes while the others replay, and their collectives would not pair
    up. Here this rank's captures succeed and another rank reports a failure: the graphs go off
    after the first size, saying so, and tokens equal eager passes."""
    model, cfg = standalone, standalone.model.cfg
    run_pass = short_prompt_requests(model, 2)
    unembedding = model.model.unembedding()
    votes = []

    def agree(ok: bool) -> bool:
        votes.append(ok)
        return False  # another rank failed

    graphs = DenoiseGraphs(run_pass, unembedding, row_stats_for(torch.device("cpu")), ladder=(1, 2),
                           graph_factory=RecordedGraph, agree=agree)
    jobs = [CanvasJob(0, SamplerConfig(**k), seed=s) for s, k in enumerate(KNOBS[:2])]
    graphs.capture_ladder(CanvasBatch.start(jobs, cfg.canvas_length, cfg.vocab_size, cfg.hidden_size,
                                            torch.float32, "cpu"))
    assert votes == [True] and "another tensor-parallel rank" in graphs.disabled and not graphs.captured
    replayed = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding, graphs=graphs)
    eager = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding)
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.passes, eager.passes)
