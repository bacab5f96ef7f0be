"""The denoise loop in vLLM's memory plan (GPU start-up).

vLLM sizes the KV cache from what it profiles before allocating it: the peak of a causal
forward at max_num_batched_tokens (`profile_run`) and the memory of its CUDA graphs
(`profile_cudagraph_memory`, taken off the KV cache). The denoise loop needs its own share of
both, or the engine leaves it only the margin outside `gpu_memory_utilization`:
- its transient peak, one pass over the most canvases a pass may hold (their device state,
  the model's activations at that many canvas tokens, the sampler's logits blocks, and the
  block of logit biases a biased canvas adds to them, as every profiled canvas has one): the GPU
  runner's `profile_run` runs that pass after vLLM's forward, so the profiled peak covers the
  larger of the two (`run_largest_pass`);
- what the denoise graph ladder keeps for the engine's life: its private pool holds one pass
  at the ladder's top (sizes are captured largest first and share the pool), and each size
  keeps a static batch; `graph_memory` measures the first and counts the second, and the
  runner adds both to vLLM's graph estimate.
The passes run on empty prefixes: a zero-length context reads no KV page, so one tiny dummy
page per layer stands in for vLLM's cache (not yet allocated when it profiles), and the
measured attention is the Triton paged kernel that serves. Their canvases are discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusiongemma_vllm.model.canvas_context import PagedPrefix, PrefixKV
from diffusiongemma_vllm.denoise.graphs import ladder_for
from diffusiongemma_vllm.denoise.canvas_biases import TokenBias
from diffusiongemma_vllm.denoise.loop import CanvasBatch, CanvasJob, denoise_canvases

DUMMY_BLOCK = 16  # tokens in each layer's one dummy page


@dataclass(frozen=True)
class DenoiseMemory:
    canvases: int  # canvases of the profiled pass
    peak_bytes: int  # reserved during it beyond what was reserved before (0 off CUDA)
    static_bytes: int  # the graph ladder's static batches


def empty_prefix_pass(step, runner, canvases: int, paged: bool = True):
    """The step's run_pass for `canvases` canvases on empty prefixes (context length 0, no KV
    read): one dummy page per layer read through the paged kernel, or (`paged` False, the CPU
    runner's path) empty gathered prefixes."""
    layers = runner.compilation_config.static_forward_context
    dtype, device = step.unembedding.weight.dtype, step.device
    table = torch.zeros((canvases, 1), dtype=torch.int32, device=device)
    lens = torch.zeros(canvases, dtype=torch.long, device=device)
    prefixes = {}
    for name in step.model.attention_layer_names():
        shape = (1 if paged else canvases, DUMMY_BLOCK, layers[name].num_kv_heads, layers[name].head_size)
        page = torch.zeros(shape, dtype=dtype, device=device)
        prefixes[name] = PagedPrefix(page, page, table, DUMMY_BLOCK, step.key_splits) if paged \
            else PrefixKV(page, page, lens)
    return step.pass_runner(lens, prefixes)


def run_largest_pass(step, runner, canvases: int | None = None, biased: bool = True) -> int:
    """One eager denoise pass over `canvases` (default: the most a pass may hold) on empty
    prefixes, each canvas with a logit bias unless `biased` is False (the graphs' passes
    never have one); returns how many canvases it ran."""
    n = canvases or step.largest_pass
    run_pass = empty_prefix_pass(step, runner, n)
    biases = (TokenBias(0, 0.0),) if biased else ()
    jobs = [CanvasJob(0, step.default_sampler, seed=i, biases=biases) for i in range(n)]
    with torch.inference_mode():
        denoise_canvases(jobs, step.canvas_length, run_pass, step.unembedding, device=step.device,
                         row_stats=step.row_stats, max_passes=1)
    return n


def graph_memory(step, runner) -> DenoiseMemory:
    """What the denoise graph ladder will hold: the allocator's peak over one pass at its top
    size (its pool; measured on CUDA) and the static batches of its sizes."""
    ladder = ladder_for(step.largest_pass)
    cfg = step.model.cfg
    one = CanvasBatch.start([CanvasJob(0, step.default_sampler, seed=0)], step.canvas_length, cfg.vocab_size,
                            cfg.hidden_size, step.unembedding.weight.dtype, step.device)
    static = sum(t.nbytes for t in one.tensors().values()) * sum(ladder)
    on_gpu = step.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved()
    canvases = run_largest_pass(step, runner, ladder[-1], biased=False)
    peak = 0
    if on_gpu:  # reserved, not allocated: a graph pool keeps whole allocator segments
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved() - before
        torch.cuda.empty_cache()
    return DenoiseMemory(canvases, peak, static)
