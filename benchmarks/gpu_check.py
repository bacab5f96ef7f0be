"""One-shot GPU check and timing of the denoise path, for a lent H100/H200 (15 device minutes).

`bash benchmarks/gpu_check.sh` runs `python benchmarks/gpu_check.py --out $OUT`. Every number
goes to $OUT/gpu_check.json and a readable $OUT/gpu_check.md. Both files are rewritten after
each section, so a run cut short still leaves what it measured. The sections, most important
first:
  environment        card, versions, HBM copy bandwidth and bf16 matmul rate (the two ceilings)
  attention_parity   paged canvas attention vs `naive_canvas_attention`, release shapes, bf16
  sampler_parity     the GEMM sampler (the CUDA path) and the torch vocab-tiled one vs the
                     materialising reference, and their draws against each other, at
                     V=262144, H=2816, 256 rows
  attention          the paged kernel per layer at 1..64 canvases (ms, TFLOP/s, GB/s)
  sampler            the GEMM sampler (with and without the soft embedding), torch vocab-tiled
                     (up to 4 canvases: the CPU path) and materialised, per pass: ms and peak
                     memory (the fused Triton kernel it replaced: results of 2026-11-27)
  router             the router's expert choice per layer: torch reference vs the fused kernel
                     (ms, device activities, same experts), and the difference per 30-layer pass
  backbone           one denoise pass of the 26B-A4B backbone (random bf16 weights) through the
                     plugin's `denoise_pass`, eager vs CUDA graph, per-pass overhead
  ar_decode          one autoregressive step of the same backbone at batch 1 and 64, and the
                     diffusion/AR tokens/s ratios at 12, 16 and 48 passes per canvas
  roofline           bytes a pass must read vs the measured copy bandwidth
  transformers       DiffusionGemmaForBlockDiffusion doing the same denoise step (the reference)
  plugin_loop        the plugin's whole loop (`denoise_canvases`), a canvas of 16 passes at
                     1..64 canvases, eager vs its graph ladder (1 and 4 passes per replay)
  block_sweep        the attention kernel's launch candidates at 16 canvases, and its key
                     splits (1, 2, 4) at 1 and 4 canvases
  sampler_sweep      the GEMM sampler's launch candidates at 1 and 64 canvases
  goals              each target of research/perf_anchors.md: met, not met, or unknown
Each section checks a deadline (default 420 s) and records a skip reason once past it. An
exception is recorded with its traceback, and the next section runs.

Method (the device README's METHOD.md). Correctness comes before timing, reported as
‖out − ref‖ / ‖ref‖. Times are medians of repeats after warm-up, from CUDA events. Inputs are
rotated where one set fits in L2. The backbone uses random bf16 weights at the real shapes.
RoPE is omitted: it is elementwise on q/k and does not change what is timed. Norms are
`F.rms_norm` (one kernel, like vLLM's RMSNorm op); results committed before 2026-11-27 used
six composed ops per norm, which inflated their eager and graph-gap times. `--layers` of the
30 are built (default 6 = one 5-sliding : 1-full period) and timed, then extrapolated as
t30 = t_pass + (30 / layers - 1) * t_layers, with t_layers measured in the same mode.
"Overhead" is eager - graph time per pass. "Graph gap" is graph time minus the kernels' summed
device time, from the profiler.

`--smoke` runs every section on the CPU with toy shapes (Triton interpreter, no graphs); see
tests/test_gpu_check_smoke.py. Imports: torch, triton, transformers (the reference section
only) and this repo's config, sampler and kernels modules, none of which import vLLM
(meta.vllm_imported records it).

One file over the 500-line guide: the device tool runs one prepared script per lease.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from diffusiongemma_vllm.model.config import MAX_DENOISING_STEPS_LIMIT, BackboneConfig, SamplerConfig
from diffusiongemma_vllm.denoise.loop import (CanvasBatch, CanvasJob, Unembedding, denoise_canvases, denoise_pass,
                                         row_stats_for)
from diffusiongemma_vllm.denoise.graphs import CudaGraph, DenoiseGraphs
from diffusiongemma_vllm.engine.device_timing import device_busy, median_ms, synchronize
from diffusiongemma_vllm.denoise.noise import philox_bits
from diffusiongemma_vllm.kernels.canvas_attention import naive_canvas_attention
from diffusiongemma_vllm.kernels.gemm_sampler import gemm_row_stats
from diffusiongemma_vllm.kernels.moe_routing import moe_routing, naive_moe_routing
from diffusiongemma_vllm.kernels.paged_canvas_attention import paged_canvas_attention
from diffusiongemma_vllm.kernels.philox_tokens import philox_tokens
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import RowStats, naive_row_stats, vocab_tiled_row_stats

TOTAL_LAYERS = 30
PASSES_PER_CANVAS = (12, 16, 48)  # adaptive halting typically 12-16; the release caps at 48
KV_BLOCK = 16
ENTROPY_BOUND = 0.1
TEMPERATURE = 0.6  # mid-schedule (t_max 0.8 -> t_min 0.4)
SOFTCAP = 30.0
RELEASE = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
               sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
               max_position_embeddings=262144)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
           head_dim=32, global_head_dim=64, num_global_key_value_heads=1, sliding_window=16, num_experts=8,
           top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096)
TOY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2)


@dataclass(frozen=True)
class Plan:
    """Every size the sections use: the release on a GPU, toys for --smoke."""

    dims: dict
    layers: int
    canvas: int
    canvas_counts: tuple[int, ...]
    ar_batches: tuple[int, ...]
    context: int  # committed tokens before each timed canvas (backbone, AR, transformers)
    attention_context: int  # committed tokens in the per-layer attention timings
    parity_contexts: tuple[int, int]  # prefix lengths drawn from this range
    parity_canvases: tuple[int, ...]
    sampler_rows: int
    warmup: int
    reps: int
    graph_passes: int  # passes captured in one CUDA graph
    loop_passes: int  # passes per canvas in the plugin_loop section
    loop_reps: int
    copy_bytes: int
    matmul_size: int
    block_candidates: dict = field(default_factory=dict)  # head_dim -> [launch kwargs of the kernel]


def _launch(block_m: int, block_n: int, block_dv: int, num_warps: int, num_stages: int) -> dict:
    return dict(block_m=block_m, block_n=block_n, block_dv=block_dv, num_warps=num_warps, num_stages=num_stages)


# Paged canvas attention launch settings worth sweeping on an H100 (the first of each is the
# kernel's default); each fits 227 KB of shared memory (tests/test_kernels_compile_offline.py
# compiles the defaults: all shapes tried spill some registers with Triton 3.9).
HOPPER_ATTENTION_CANDIDATES = {
    256: [_launch(128, 64, 256, 8, 2), _launch(128, 32, 256, 8, 2), _launch(128, 32, 256, 8, 3),
          _launch(64, 64, 256, 8, 2), _launch(64, 64, 256, 8, 3), _launch(64, 32, 256, 8, 3),
          _launch(128, 64, 128, 8, 2), _launch(128, 64, 256, 8, 1)],
    512: [_launch(128, 32, 256, 8, 2), _launch(128, 16, 256, 8, 3), _launch(128, 32, 256, 8, 1),
          _launch(64, 16, 512, 8, 2), _launch(64, 32, 256, 8, 2), _launch(64, 32, 256, 8, 3),
          _launch(128, 32, 128, 8, 2), _launch(128, 64, 128, 8, 1)],
}


def gpu_plan(layers: int) -> Plan:
    return Plan(RELEASE, layers, 256, (1, 4, 16, 64), (1, 64), 2048, 4096, (300, 4000), (1, 16), 256,
                warmup=3, reps=10, graph_passes=4, loop_passes=16, loop_reps=1, copy_bytes=2 << 30, matmul_size=8192,
                block_candidates=HOPPER_ATTENTION_CANDIDATES)


def smoke_plan() -> Plan:
    return Plan(TOY, 2, 16, (1, 2), (1, 2), 40, 40, (5, 60), (1, 3), 24, warmup=1, reps=2, graph_passes=2, loop_passes=3, loop_reps=1,
                copy_bytes=1 << 20, matmul_size=64,
                block_candidates={32: [dict(block_m=16, block_n=16)], 64: [dict(block_m=32, block_n=16, block_dv=32)]})


def text_config(dims: dict, layers: int) -> dict:
    """text_config in the release's form, cut to `layers` (full every 6th and last, as released)."""
    kinds = ["full_attention" if i % 6 == 5 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return {**dims, "model_type": "diffusion_gemma_text", "num_hidden_layers": layers, "layer_types": kinds,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1000000.0}},
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": SOFTCAP,
            "attention_bias": False, "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


def backbone_config(text: dict, canvas: int) -> BackboneConfig:
    hf = SimpleNamespace(model_type="diffusion_gemma", canvas_length=canvas, eos_token_id=[1, 106, 50],
                         text_config=SimpleNamespace(**text))
    return BackboneConfig.from_hf(hf)


class OutOfTime(Exception):
    """Raised inside a section once the run is past its deadline."""


class Report:
    """The JSON record, rewritten (with its Markdown twin) after every section."""

    def __init__(self, out: Path, deadline_s: float, meta: dict):
        self.out, self.deadline_s, self.start = out, deadline_s, time.monotonic()
        self.data = {"meta": meta, "sections": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> None:
        if self.elapsed() > self.deadline_s:
            raise OutOfTime(f"past the {self.deadline_s:.0f} s deadline at {self.elapsed():.0f} s")

    def run(self, name: str, section, run: "Run", always: bool = False) -> None:
        rec = self.data["sections"][name] = {}
        start = time.monotonic()
        try:
            if not always:
                self.check()
            section(rec, run)
        except OutOfTime as stop:
            rec["skipped" if len(rec) == 0 else "stopped"] = str(stop)
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
            rec["error"] = f"{type(error).__name__}: {error}"[:2000]
            rec["traceback"] = traceback.format_exc()[-4000:]
        finally:
            rec["seconds"] = round(time.monotonic() - start, 1)
            gc.collect()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(render_markdown(self.data))


@dataclass
class Run:
    plan: Plan
    device: torch.device
    report: Report
    cfg: BackboneConfig
    blocks: dict = field(default_factory=dict)  # head_dim -> launch kwargs that compiled
    backbone: "Backbone | None" = None

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated while `fn` runs, above what was allocated before (outputs included)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def graph_ms(run: Run, fn) -> tuple[float, float | None, float | None]:
    """(ms, device-busy ms, device activities) per call of `fn`, replayed from one CUDA graph of
    `graph_passes` calls."""
    passes = run.plan.graph_passes
    torch.cuda.empty_cache()  # the eager runs' cached blocks would sit beside the graph's pool

    def calls() -> None:
        for _ in range(passes):
            fn()

    graph = CudaGraph(pool=None)  # the plugin's capture: warm-up on a side stream, then capture
    graph.capture(calls)
    ms = median_ms(graph.replay, run.device, 1, run.plan.reps) / passes
    busy, activities = device_busy(graph.replay)
    del graph
    torch.cuda.empty_cache()
    if not busy or busy >= 1.05 * ms * passes:
        return ms, None, None
    return ms, busy / passes, activities / passes


def extrapolate(run: Run, step_ms: float, layers_ms: float) -> float:
    """Time of the 30-layer step from the built layers: step + (30 / layers - 1) * layers-only."""
    return step_ms + (TOTAL_LAYERS / run.plan.layers - 1) * layers_ms


def measure_modes(run: Run, step, layers) -> dict:
    """Eager and graph-replayed ms of one step and of its layers alone, and their 30-layer values."""
    p = run.plan
    eager, eager_layers = (median_ms(fn, run.device, p.warmup, p.reps) for fn in (step, layers))
    row = {"eager_ms": eager, "eager_layers_ms": eager_layers, "eager_ms_30": extrapolate(run, eager, eager_layers),
           "eager_per_layer_ms": eager_layers / p.layers}
    if run.device.type != "cuda":
        row["graph"] = "skipped: no CUDA graphs on the CPU"
        return row
    try:
        graph, busy, launches = graph_ms(run, step)
        graph_layers, busy_layers, launches_layers = graph_ms(run, layers)
    except Exception as error:  # noqa: BLE001 - e.g. a host sync inside the step cannot be captured
        row["graph_error"] = f"{type(error).__name__}: {error}"[:500]
        return row
    row.update(graph_ms=graph, graph_layers_ms=graph_layers, graph_ms_30=extrapolate(run, graph, graph_layers),
               graph_per_layer_ms=graph_layers / p.layers)
    row["overhead_ms_30"] = row["eager_ms_30"] - row["graph_ms_30"]
    if busy and busy_layers:
        row["busy_ms_30"] = extrapolate(run, busy, busy_layers)
        row["graph_gap_ms_30"] = row["graph_ms_30"] - row["busy_ms_30"]
        row["launches_30"] = extrapolate(run, launches, launches_layers)  # device activities per 30-layer step
        row["gap_us_per_launch"] = 1e3 * row["graph_gap_ms_30"] / row["launches_30"]
    return row


def best_ms_30(row: dict) -> tuple[float | None, str]:
    """The 30-layer step time to report: graph-replayed where captured, else eager."""
    if "graph_ms_30" in row:
        return row["graph_ms_30"], "graph"
    return row.get("eager_ms_30"), "eager"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def is_oom(error: Exception) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def paged_prefix(contexts: list[int], kv_heads: int, head_dim: int, window: int | None, device, gen,
                 dense: bool = False) -> SimpleNamespace:
    """Each request's visible prefix (the last window-1 tokens on sliding layers) in shuffled
    cache blocks of KV_BLOCK. Every other cell is NaN, and block 0 is all NaN. Table entries
    before the window point at block 0. With `dense`, the same prefix padded for the reference."""
    starts = [0 if window is None else max(0, c - (window - 1)) for c in contexts]
    first, last = [s // KV_BLOCK for s in starts], [-(-c // KV_BLOCK) for c in contexts]
    num_blocks = 1 + sum(b - a for a, b in zip(first, last))
    shape = (num_blocks, KV_BLOCK, kv_heads, head_dim)
    key = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)
    value = key.clone()
    order = torch.randperm(num_blocks - 1, generator=gen, device=device).int() + 1
    table = torch.zeros(len(contexts), max(1, max(last)), dtype=torch.int32, device=device)
    used, prefixes = 0, []
    for r, (start, context) in enumerate(zip(starts, contexts)):
        table[r, first[r]:last[r]] = order[used:used + last[r] - first[r]]
        used += last[r] - first[r]
        positions = torch.arange(start, context, device=device)
        k, v = (torch.randn(len(positions), kv_heads, head_dim, generator=gen, device=device).bfloat16()
                for _ in range(2))
        blocks = table[r, positions // KV_BLOCK].long()
        key[blocks, positions % KV_BLOCK] = k
        value[blocks, positions % KV_BLOCK] = v
        if dense:
            prefixes.append((k, v))
    cache = SimpleNamespace(key=key, value=value, table=table,
                            context=torch.tensor(contexts, dtype=torch.int32, device=device))
    if dense:
        width = max(1, max(len(k) for k, _ in prefixes))
        pad = lambda x: torch.cat([x, x.new_zeros(width - len(x), *x.shape[1:])])  # noqa: E731
        cache.dense = (torch.stack([pad(k) for k, _ in prefixes]), torch.stack([pad(v) for _, v in prefixes]),
                       torch.tensor([len(k) for k, _ in prefixes], device=device))
    return cache


def layer_kinds(cfg: BackboneConfig) -> dict:
    """One LayerAttention per kind present: {'sliding': ..., 'full': ...}."""
    return {("sliding" if a.is_sliding else "full"): a for a in cfg.layers}


def attention_call(run: Run, attn, q, k, v, cache, causal: bool, **blocks):
    window = run.cfg.sliding_window if attn.is_sliding else None
    launch = blocks or run.blocks.get(attn.head_dim, {})
    return paged_canvas_attention(q, k, v, cache.key, cache.value, cache.table, cache.context, window, causal,
                                  **launch)


def canvas_qkv(run: Run, attn, n: int, canvas: int, gen):
    heads = run.cfg.num_heads
    return tuple(torch.randn(n, canvas, h, attn.head_dim, generator=gen, device=run.device).bfloat16()
                 for h in (heads, attn.num_kv_heads, attn.num_kv_heads))


def sampler_inputs(run: Run, rows: int, gen) -> SimpleNamespace:
    """Hidden rows scaled from 0.2 to 3 (confident to flat softmaxes), logits of std ~8."""
    hidden_size, vocab = run.cfg.hidden_size, run.cfg.vocab_size
    scale = torch.linspace(0.2, 3.0, rows, device=run.device)[:, None]
    return SimpleNamespace(
        hidden=(torch.randn(rows, hidden_size, generator=gen, device=run.device) * scale).bfloat16(),
        embedding=(torch.randn(vocab, hidden_size, generator=gen, device=run.device) * 8 / hidden_size**0.5).bfloat16(),
        temperature=torch.rand(rows, generator=gen, device=run.device) * 0.4 + 0.4,
        keys=torch.randint(0, 2**62, (rows,), generator=gen, device=run.device))


def embed_scale(cfg: BackboneConfig) -> float:
    return float(torch.tensor(cfg.hidden_size**0.5, dtype=torch.bfloat16))  # 53.0 at the release


def materialized_row_stats(hidden, embedding, softcap, temperature, keys, with_soft) -> RowStats:
    """The baseline of a plain torch engine: fp32 logits [N, V] and every statistic from them.
    `keys` is unused: the Gumbel noise is drawn, materialised, from torch's generator."""
    z = torch.tanh((hidden @ embedding.T).float() / softcap) * softcap / temperature[:, None]
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    gumbel = -torch.log(-torch.log(torch.rand_like(z).clamp_(min=1e-20)))
    soft = probs.to(embedding.dtype) @ embedding if with_soft else None
    return RowStats(z.argmax(-1), (z + gumbel).argmax(-1), -(probs * log_probs).sum(-1), soft)


# Sampler statistics per pass, (hidden, embedding, softcap, temperature, keys, with_soft) -> RowStats:
# the plugin's CUDA sampler (GEMMs + a Triton statistics kernel), its torch path (vocab-tiled,
# used off CUDA), and the materialising baseline.
SAMPLERS = {"gemm": gemm_row_stats,
            "gemm_no_soft": lambda *args: gemm_row_stats(*args[:-1], False),
            "torch_tiled": vocab_tiled_row_stats,
            "materialized": materialized_row_stats}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """One fused kernel on CUDA where torch has it, as vLLM's RMSNorm op is: composed of six
    elementwise ops, the ten norms of a layer alone would add ~60 launches per layer that the
    plugin's vLLM layers do not have (a graph replay pays ~2 us per launch)."""
    return F.rms_norm(x, (x.shape[-1],), None if weight is None else weight.to(x.dtype), eps)


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up) @ down.T


def grouped_experts(x, weights, ids, w1, w2) -> torch.Tensor:
    """Top-k MoE as two grouped matmuls over expert-sorted rows; no host sync (graph-safe)."""
    tokens, top_k = ids.shape
    flat = ids.flatten().long()  # the router gives int32 ids, as vLLM's FusedMoE takes them
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w1.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[order // top_k], w1.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, w2.transpose(-2, -1), offs=offs)
    y = y * weights.flatten()[order, None].to(y.dtype)
    return torch.empty_like(y).index_copy_(0, order, y).view(tokens, top_k, -1).sum(1)


def looped_experts(x, weights, ids, w1, w2) -> torch.Tensor:
    """The same MoE as one matmul pair per hit expert (host-synchronising: eager only)."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        token, slot = (ids == expert).nonzero(as_tuple=True)
        y = gated_mlp(x[token], w1[expert], w2[expert])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


class Backbone:
    """The release backbone with random bf16 weights: the denoise pass and the AR decode step.

    Layer maths follow research/hf_reference.md 2.2 (RoPE omitted, see the module docstring).
    The experts run grouped (`torch._grouped_mm`) where that matches the per-expert loop, else
    looped, which leaves graphs out."""

    def __init__(self, cfg: BackboneConfig, device: torch.device, gen: torch.Generator):
        self.cfg, self.device, self.gen = cfg, device, gen
        hidden, vocab = cfg.hidden_size, cfg.vocab_size
        self.embedding = self._matrix(vocab, hidden)
        self.sc = SimpleNamespace(gate_up=self._matrix(2 * cfg.self_conditioning_size, hidden),
                                  down=self._matrix(hidden, cfg.self_conditioning_size), pre_norm=self._norm(hidden))
        self.final_norm = self._norm(hidden)
        self.layers = [self._layer(attn) for attn in cfg.layers]
        self.scale = embed_scale(cfg)
        self.experts = grouped_experts if hasattr(torch, "_grouped_mm") else looped_experts
        self.caches = []
        self.launch = {}  # head_dim -> attention block sizes that compiled (attention_parity)
        self.unembedding = Unembedding(self.embedding, SOFTCAP, self.scale)
        self.row_stats = row_stats_for(device)

    def _matrix(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.bfloat16).mul_(shape[-1] ** -0.5)

    def _norm(self, size: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(size, generator=self.gen, device=self.device)).bfloat16()

    def _layer(self, attn) -> SimpleNamespace:
        cfg, hidden = self.cfg, self.cfg.hidden_size
        q_size, kv_size = cfg.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        experts, width = cfg.num_experts, cfg.moe_intermediate_size
        return SimpleNamespace(
            attn=attn, qkv=self._matrix(q_size + kv_size * (1 if attn.k_eq_v else 2), hidden),
            o=self._matrix(hidden, q_size), q_norm=self._norm(attn.head_dim), k_norm=self._norm(attn.head_dim),
            norms=[self._norm(hidden) for _ in range(7)], gate_up=self._matrix(2 * cfg.intermediate_size, hidden),
            down=self._matrix(hidden, cfg.intermediate_size), router=self._matrix(experts, hidden),
            router_scale=self._norm(hidden), expert_scale=self._norm(experts),
            w1=self._matrix(experts, 2 * width, hidden), w2=self._matrix(experts, hidden, width),
            scalar=self._norm(1))

    def allocate(self, n: int, context: int) -> None:
        """One paged cache per layer: n requests with `context` committed tokens each."""
        self.caches = []
        for attn in self.cfg.layers:
            window = self.cfg.sliding_window if attn.is_sliding else None
            self.caches.append(paged_prefix([context] * n, attn.num_kv_heads, attn.head_dim, window,
                                            self.device, self.gen))

    def attention(self, w, x, cache, rows, n: int, canvas: int, causal: bool) -> torch.Tensor:
        attn, heads = w.attn, self.cfg.num_heads
        q_size, kv_size = heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        qkv = x @ w.qkv.T
        q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
        v = k if attn.k_eq_v else qkv[:, q_size + kv_size:]
        q = rms_norm(q.reshape(n, canvas, heads, attn.head_dim), w.q_norm)
        v = rms_norm(v.reshape(n, canvas, attn.num_kv_heads, attn.head_dim), None)
        k = rms_norm(k.reshape(n, canvas, attn.num_kv_heads, attn.head_dim), w.k_norm)
        window = self.cfg.sliding_window if attn.is_sliding else None
        table, context = (cache.table, cache.context) if rows is None else (cache.table[rows], cache.context[rows])
        out = paged_canvas_attention(q, k, v, cache.key, cache.value, table, context, window, causal,
                                     **self.launch.get(attn.head_dim, {}))
        return out.reshape(n * canvas, q_size) @ w.o.T

    def moe(self, w, x, residual, touched: list | None) -> torch.Tensor:
        logits = (rms_norm(residual, None) * w.router_scale * self.cfg.hidden_size**-0.5) @ w.router.T
        route = moe_routing if logits.is_cuda else naive_moe_routing  # as model/diffusion_gemma.py's Router
        weights, ids = route(logits.float(), w.expert_scale, self.cfg.top_k_experts)
        if touched is not None:
            touched.append(int(ids.unique().numel()))
        return self.experts(x, weights, ids, w.w1, w.w2)

    def run_layers(self, x, n: int, canvas: int, causal: bool, touched: list | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The layers over n canvases whose prefixes are the caches' rows `rows` (default: 0..n-1)."""
        for w, cache in zip(self.layers, self.caches):
            in_norm, post_attn, pre_ff, post_ff, pre_ff2, post_ff1, post_ff2 = w.norms
            attended = self.attention(w, rms_norm(x, in_norm), cache, rows, n, canvas, causal)
            residual = x + rms_norm(attended, post_attn)
            dense = rms_norm(gated_mlp(rms_norm(residual, pre_ff), w.gate_up, w.down), post_ff1)
            routed = rms_norm(self.moe(w, rms_norm(residual, pre_ff2), residual, touched), post_ff2)
            x = (residual + rms_norm(dense + routed, post_ff)) * w.scalar
        return x

    def embed_canvas(self, ids, soft) -> torch.Tensor:
        """Scaled embeddings through the self-conditioning block."""
        embeds = self.embedding[ids] * self.scale
        return rms_norm(embeds + gated_mlp(rms_norm(soft, self.sc.pre_norm), self.sc.gate_up, self.sc.down), None)

    def run_pass(self, rows: torch.Tensor, canvas: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """The plugin's `run_pass` contract: hidden states [n, C, H] of canvases at cache rows `rows`."""
        n, length = canvas.shape
        x = self.run_layers(self.embed_canvas(canvas.flatten(), soft.flatten(0, 1)), n, length, causal=False,
                            rows=rows)
        return rms_norm(x, self.final_norm).view(n, length, -1)

    def jobs(self, n: int, max_passes: int) -> list[CanvasJob]:
        """n canvases that never halt early (random weights are never confident): `max_passes` each."""
        sampler = SamplerConfig(max_denoising_steps=max_passes, t_min=TEMPERATURE, t_max=TEMPERATURE,
                                entropy_bound=ENTROPY_BOUND, confidence_threshold=0.0)
        return [CanvasJob(0, sampler, seed=i) for i in range(n)]

    def denoise_state(self, n: int) -> SimpleNamespace:
        """A CanvasBatch in the steady state (self-conditioning signal present) and its embeddings."""
        cfg = self.cfg
        batch = CanvasBatch.start(self.jobs(n, MAX_DENOISING_STEPS_LIMIT), cfg.canvas_length, cfg.vocab_size,
                                  cfg.hidden_size, torch.bfloat16, self.device)
        batch.soft.copy_(torch.randn(batch.soft.shape, generator=self.gen, device=self.device))
        return SimpleNamespace(n=n, batch=batch, x=self.embed_canvas(batch.canvas.flatten(), batch.soft.flatten(0, 1)))

    def denoise_pass(self, s: SimpleNamespace) -> None:
        """One pass of the plugin's loop: layers, sampler, acceptance, re-noise, halting, in place."""
        denoise_pass(s.batch, self.run_pass, self.unembedding, self.row_stats)

    def denoise_layers(self, s: SimpleNamespace) -> torch.Tensor:
        return self.run_layers(s.x, s.n, self.cfg.canvas_length, causal=False)

    def experts_touched(self, s: SimpleNamespace) -> list[int]:
        touched = []
        self.run_layers(s.x, s.n, self.cfg.canvas_length, causal=False, touched=touched)
        return touched

    def ar_state(self, batch: int) -> SimpleNamespace:
        ids = torch.randint(0, self.cfg.vocab_size, (batch,), generator=self.gen, device=self.device)
        return SimpleNamespace(n=batch, ids=ids, x=self.embedding[ids] * self.scale)

    def ar_step(self, s: SimpleNamespace) -> None:
        """One token per sequence: layers over the paged prefix, full-vocabulary logits, greedy."""
        x = self.run_layers(self.embedding[s.ids] * self.scale, s.n, 1, causal=True)
        logits = (rms_norm(x, self.final_norm) @ self.embedding.T).float()
        s.ids.copy_((torch.tanh(logits / SOFTCAP) * SOFTCAP).argmax(-1))

    def ar_layers(self, s: SimpleNamespace) -> torch.Tensor:
        return self.run_layers(s.x, s.n, 1, causal=True)


def release_bytes(cfg30: BackboneConfig) -> dict:
    """bf16 bytes of all weights and the parameters one token activates, at the 30 layers."""
    hidden, total, active = cfg30.hidden_size, 0, 0
    for a in cfg30.layers:
        attention = hidden * (cfg30.num_heads * a.head_dim * 2 + a.num_kv_heads * a.head_dim * (1 if a.k_eq_v else 2))
        expert = 3 * hidden * cfg30.moe_intermediate_size
        shared = attention + 3 * hidden * cfg30.intermediate_size + hidden * cfg30.num_experts
        total += shared + cfg30.num_experts * expert
        active += shared + cfg30.top_k_experts * expert
    embedding = cfg30.vocab_size * hidden
    self_conditioning = 3 * hidden * cfg30.self_conditioning_size
    return {"weight_bytes": 2 * (total + embedding + self_conditioning),
            "active_params_per_token": active + embedding + self_conditioning}


def measure_environment(rec: dict, run: Run) -> None:
    p, device = run.plan, run.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   l2_mib=getattr(props, "L2_cache_size", 0) / 2**20,
                   shared_memory_per_block_optin_kib=getattr(props, "shared_memory_per_block_optin", 0) / 1024)
    src = torch.randn(p.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, p.warmup, p.reps)
    rec["copy_gbps"] = 2 * p.copy_bytes / ms / 1e6  # bytes read + written
    a, b = (torch.randn(p.matmul_size, p.matmul_size, device=device).bfloat16() for _ in range(2))
    ms = median_ms(lambda: a @ b, device, p.warmup, p.reps)
    rec["bf16_matmul_tflops"] = 2 * p.matmul_size**3 / ms / 1e9


def check_attention_parity(rec: dict, run: Run) -> None:
    """bf16 canvas q/k/v, paged prefixes of random lengths, against the fp32 reference."""
    p, gen, cpu_gen = run.plan, run.gen(1), torch.Generator().manual_seed(1)
    rows = rec["rows"] = []
    cases = [(n, False) for n in p.parity_canvases] + [(p.parity_canvases[-1], True)]
    for kind, attn in layer_kinds(run.cfg).items():
        window = run.cfg.sliding_window if attn.is_sliding else None
        for n, causal in cases:
            run.report.check()
            contexts = torch.randint(p.parity_contexts[0], p.parity_contexts[1] + 1, (n,), generator=cpu_gen).tolist()
            q, k, v = canvas_qkv(run, attn, n, p.canvas, gen)
            cache = paged_prefix(contexts, attn.num_kv_heads, attn.head_dim, window, run.device, gen, dense=True)
            got = launch_first_that_compiles(rec, run, attn, q, k, v, cache, causal)
            want = naive_canvas_attention(q, k, v, *cache.dense, cache.context, window, causal)
            err = rel_err(got, want)
            rows.append({"layer": kind, "head_dim": attn.head_dim, "heads": f"{run.cfg.num_heads}:{attn.num_kv_heads}",
                         "canvases": n, "causal": causal, "contexts": f"{min(contexts)}..{max(contexts)}",
                         "rel_err": err, "finite": bool(torch.isfinite(got).all()), "ok": err < 1e-2})
    rec["blocks_used"] = {str(hd): kw or "kernel default" for hd, kw in run.blocks.items()}


def launch_first_that_compiles(rec: dict, run: Run, attn, q, k, v, cache, causal: bool) -> torch.Tensor:
    """Run the kernel with the launch settings that compiled before, or find them: the kernel's
    defaults first, then the plan's candidates (head_dim 512 may exceed shared memory)."""
    if attn.head_dim in run.blocks:
        return attention_call(run, attn, q, k, v, cache, causal)
    candidates = [{}] + run.plan.block_candidates.get(attn.head_dim, [])
    for blocks in candidates:
        try:
            out = attention_call(run, attn, q, k, v, cache, causal, **blocks)
        except Exception as error:  # noqa: BLE001 - e.g. triton OutOfResources
            rec.setdefault("launch_errors", []).append(f"head_dim {attn.head_dim} {blocks or 'default'}: "
                                                       f"{type(error).__name__}: {str(error)[:300]}")
            continue
        run.blocks[attn.head_dim] = blocks
        return out
    raise RuntimeError(f"no launch settings compiled for head_dim {attn.head_dim}")


def check_sampler_parity(rec: dict, run: Run) -> None:
    """The samplers against the materialising reference at the release vocabulary. The GEMM
    sampler (fp32 logits from bf16 inputs: exact products, fp32 sums) against fp32 copies of
    its inputs; the torch path against the bf16 matmul it runs (bf16 logits, as transformers'
    lm_head). Then the GEMM sampler's draws against the torch path on the same fp32 copies: the
    same Philox noise, so equal draws but for near-ties. (On 2026-11-27 a GPU sampler against
    the torch path on bf16 inputs agreed on 97.3 % of argmax and 99.2 % of draws, soft rel_err
    2.3 %: the bf16 rounding of the torch path's logits.)"""
    s = sampler_inputs(run, run.plan.sampler_rows, run.gen(2))
    rec.update(sampler_rows=s.hidden.shape[0], vocab=s.embedding.shape[0], hidden=s.embedding.shape[1],
               thresholds="agreement >= 0.97 (bf16 near-ties), entropy rel_err < 1e-2, soft rel_err < 2e-2")
    args = (SOFTCAP, s.temperature, s.keys, True)
    hidden32, embedding32 = s.hidden.float(), s.embedding.float()
    gemm_stats = gemm_row_stats(s.hidden, s.embedding, *args)
    exact = naive_row_stats(hidden32, embedding32, *args)
    rows = rec["rows"] = []
    for name, got, want in (
            ("gemm", gemm_stats, lambda: exact),
            ("torch_tiled", vocab_tiled_row_stats(s.hidden, s.embedding, *args),
             lambda: naive_row_stats(s.hidden, s.embedding, *args)),
            ("gemm vs torch_tiled (fp32 inputs)", gemm_stats,
             lambda: vocab_tiled_row_stats(hidden32, embedding32, *args))):
        row = compare_stats(name, got, want())
        rows.append(row)
        gc.collect()
    keys = s.keys[:64].contiguous()
    rec["philox_tokens_equal_torch_philox"] = bool(torch.equal(
        philox_tokens(keys, run.plan.canvas, s.embedding.shape[0]),
        philox_bits(keys, torch.arange(run.plan.canvas, device=keys.device)) % s.embedding.shape[0]))


def compare_stats(name: str, got: RowStats, want: RowStats) -> dict:
    row = {"sampler": name, "argmax_agreement": float((got.argmax == want.argmax).float().mean()),
           "sample_agreement": float((got.sample == want.sample).float().mean()),
           "entropy_rel_err": rel_err(got.entropy, want.entropy), "soft_rel_err": rel_err(got.soft, want.soft),
           "finite": bool(torch.isfinite(got.entropy).all() and torch.isfinite(got.soft).all())}
    row["ok"] = (row["argmax_agreement"] >= 0.97 and row["sample_agreement"] >= 0.97 and row["finite"]
                 and row["entropy_rel_err"] < 1e-2 and row["soft_rel_err"] < 2e-2)
    return row


def time_attention(rec: dict, run: Run) -> None:
    """Per-layer kernel time; input sets rotate so that they do not sit in L2 together."""
    p, gen = run.plan, run.gen(3)
    l2 = l2_bytes(run)
    rows = rec["rows"] = []
    rec["context"] = p.attention_context
    for kind, attn in layer_kinds(run.cfg).items():
        window = run.cfg.sliding_window if attn.is_sliding else None
        visible = min(p.attention_context, window - 1) if window else p.attention_context
        for n in p.canvas_counts:
            run.report.check()
            kv_bytes = 2 * 2 * n * visible * attn.num_kv_heads * attn.head_dim
            io_bytes = 2 * 2 * n * p.canvas * attn.head_dim * (run.cfg.num_heads + attn.num_kv_heads)
            copies = max(1, min(8, math.ceil(2 * l2 / (kv_bytes + io_bytes))))
            sets = [(canvas_qkv(run, attn, n, p.canvas, gen),
                     paged_prefix([p.attention_context] * n, attn.num_kv_heads, attn.head_dim, window, run.device, gen))
                    for _ in range(copies)]
            fns = [lambda qkv=qkv, cache=cache: launch_first_that_compiles(rec, run, attn, *qkv, cache, False)
                   for qkv, cache in sets]
            ms = median_ms(fns, run.device, p.warmup, p.reps)
            flops = 4 * n * run.cfg.num_heads * p.canvas * (visible + p.canvas) * attn.head_dim
            rows.append({"layer": kind, "canvases": n, "ms": ms, "tflops": flops / ms / 1e9,
                         "gbps": (kv_bytes + io_bytes) / ms / 1e6, "input_sets": copies})
            del sets, fns


def time_router(rec: dict, run: Run) -> None:
    """The router's expert choice for one layer: the torch reference (softmax, top-k,
    renormalise, per-expert scale: several kernels) against the fused Triton kernel (one), on
    the same logits; then the difference over a 30-layer pass."""
    cfg, gen = run.cfg, run.gen(7)
    rows = rec["rows"] = []
    for n in run.plan.canvas_counts:
        run.report.check()
        logits = torch.randn(n * run.plan.canvas, cfg.num_experts, generator=gen, device=run.device) * 4
        scale = (0.5 + torch.rand(cfg.num_experts, generator=gen, device=run.device)).bfloat16()
        want, got = (fn(logits, scale, cfg.top_k_experts) for fn in (naive_moe_routing, moe_routing))
        row = {"canvases": n, "same_experts": bool(torch.equal(want[1], got[1])),
               "weights_max_rel_err": float(((got[0] - want[0]).abs() / want[0].abs()).max())}
        for name, fn in (("torch", naive_moe_routing), ("fused", moe_routing)):
            call = functools.partial(fn, logits, scale, cfg.top_k_experts)
            row[f"{name}_ms"] = median_ms(call, run.device, run.plan.warmup, run.plan.reps)
            row[f"{name}_activities"] = device_busy(call)[1] if run.device.type == "cuda" else None
        row["saved_per_pass_ms"] = TOTAL_LAYERS * (row["torch_ms"] - row["fused_ms"])
        rows.append(row)


def l2_bytes(run: Run) -> int:
    if run.device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(run.device), "L2_cache_size", 50 << 20)


TORCH_SAMPLER_MAX_CANVASES = 4  # the CPU path; 3.1 s a pass at 64 canvases on an H100 (2026-11-27)


def time_sampler(rec: dict, run: Run) -> None:
    """ms and peak memory per pass of each sampler at each canvas count."""
    p, cfg = run.plan, run.cfg
    rows = rec["rows"] = []
    s = sampler_inputs(run, p.canvas * max(p.canvas_counts), run.gen(4))
    for n in p.canvas_counts:
        rows_n = n * p.canvas
        args = (s.hidden[:rows_n], s.embedding, SOFTCAP, s.temperature[:rows_n], s.keys[:rows_n], True)
        output_mib = rows_n * (cfg.hidden_size * 4 + 3 * 8) / 2**20
        for name, sampler in SAMPLERS.items():
            run.report.check()
            if name == "torch_tiled" and n > TORCH_SAMPLER_MAX_CANVASES:
                continue
            row = {"sampler": name, "canvases": n, "outputs_mib": output_mib}
            need = 7 * rows_n * cfg.vocab_size * 4
            if name == "materialized" and run.device.type == "cuda" and need > torch.cuda.mem_get_info()[0]:
                row["error"] = f"skipped: needs ~{need / 2**30:.0f} GiB of fp32 [rows, vocab] temporaries"
                rows.append(row)
                continue
            try:
                row["peak_mib"] = peak_mib(lambda: sampler(*args), run.device)
                row["ms"] = median_ms(lambda: sampler(*args), run.device, p.warmup, p.reps)
                row["ms_per_canvas"] = row["ms"] / n
            except Exception as error:  # noqa: BLE001
                if not is_oom(error):
                    raise
                row["error"] = "OOM"
            rows.append(row)
            gc.collect()


def time_backbone(rec: dict, run: Run) -> None:
    """One denoise pass: embed + self-conditioning, the layers, final norm, sampler, accept."""
    p, cfg = run.plan, run.cfg
    model = run.backbone = Backbone(cfg, run.device, run.gen(5))
    model.launch = run.blocks
    rec.update(layers_built=p.layers, context=p.context, rope="omitted (elementwise; not timed)",
               sampler=getattr(model.row_stats, "__name__", str(model.row_stats)),
               extrapolation=f"t30 = t_pass + ({TOTAL_LAYERS}/{p.layers} - 1) * t_layers, same mode")
    check_experts(rec, model)
    rows = rec["rows"] = []
    for n in p.canvas_counts:
        run.report.check()
        row = {"canvases": n}
        try:
            model.allocate(n, p.context)
            state = model.denoise_state(n)
            if n == 1:
                rec["experts_touched_per_layer"] = model.experts_touched(state)
            row.update(measure_modes(run, lambda: model.denoise_pass(state), lambda: model.denoise_layers(state)))
            ms30, mode = best_ms_30(row)
            row["tokens_per_s"] = {f"{k}_passes": 1e3 * p.canvas * n / (k * ms30) for k in PASSES_PER_CANVAS}
            row["mode"] = mode
        except Exception as error:  # noqa: BLE001
            if not is_oom(error):
                raise
            row["error"] = "OOM"
        rows.append(row)
        model.caches, state = [], None
        gc.collect()


def time_plugin_loop(rec: dict, run: Run) -> None:
    """The plugin's whole loop (`denoise_canvases`) on this backbone: one canvas of `loop_passes`
    passes per request at each canvas count, eager, then replayed from the graph ladder
    (`DenoiseGraphs`) with 1 and 4 passes per replay; replayed tokens are compared with eager ones."""
    p = run.plan
    model = run.backbone or Backbone(run.cfg, run.device, run.gen(5))
    model.launch = run.blocks
    rec.update(passes_per_canvas=p.loop_passes, layers_built=p.layers, context=p.context,
               extrapolation=f"t30 = t + passes * ({TOTAL_LAYERS}/{p.layers} - 1) * t_layers (backbone section)")
    layer_ms = {r["canvases"]: r.get("graph_layers_ms", r.get("eager_layers_ms"))
                for r in run.report.data["sections"].get("backbone", {}).get("rows", [])}
    rows = rec["rows"] = []
    for n in p.canvas_counts:
        run.report.check()
        row = {"canvases": n}
        model.allocate(n, p.context)
        jobs = model.jobs(n, p.loop_passes)

        def loop(graphs=None):
            return denoise_canvases(jobs, p.canvas, model.run_pass, model.unembedding, run.device, graphs=graphs)

        try:
            eager = loop()
            if n == p.canvas_counts[0]:  # graph agreement below 1 means something only if eager repeats
                row["eager_repeat_agreement"] = float((loop().tokens == eager.tokens).float().mean())
            modes = {"eager": median_ms(loop, run.device, 0, p.loop_reps)}
            if run.device.type == "cuda":
                for per_replay in (1, 4):
                    graphs = DenoiseGraphs(model.run_pass, model.unembedding, model.row_stats,
                                           passes_per_replay=per_replay)
                    try:
                        replayed = loop(graphs)  # captures this size's graph
                        if graphs.disabled:  # the loop fell back to eager passes: not a graph timing
                            raise RuntimeError(graphs.disabled)
                        modes[f"graph_k{per_replay}"] = median_ms(lambda: loop(graphs), run.device, 0, p.loop_reps)
                        row[f"graph_k{per_replay}_agreement"] = float((replayed.tokens == eager.tokens).float().mean())
                    except Exception as error:  # noqa: BLE001 - a capture failure is a finding
                        if is_oom(error):
                            raise
                        row[f"graph_k{per_replay}_error"] = f"{type(error).__name__}: {error}"[:400]
                    graphs = None
                    torch.cuda.empty_cache()
            for mode, ms in modes.items():
                row[f"{mode}_ms_per_pass"] = ms / p.loop_passes
                if layer_ms.get(n):
                    ms30 = ms + p.loop_passes * (TOTAL_LAYERS / p.layers - 1) * layer_ms[n]
                    row[f"{mode}_tokens_per_s_30"] = 1e3 * p.canvas * n / ms30
        except Exception as error:  # noqa: BLE001
            if not is_oom(error):
                raise
            row["error"] = "OOM"
        rows.append(row)
        model.caches = []
        gc.collect()


def check_experts(rec: dict, model: Backbone) -> None:
    """Keep the grouped MoE only where it matches the per-expert loop at the canvas size."""
    cfg, w = model.cfg, model.layers[0]
    x = torch.randn(cfg.canvas_length, cfg.hidden_size, generator=model.gen, device=model.device).bfloat16()
    weights, ids = torch.topk(torch.rand(x.shape[0], cfg.num_experts, generator=model.gen, device=model.device),
                              cfg.top_k_experts, dim=-1)
    want = looped_experts(x, weights, ids, w.w1, w.w2)
    try:
        err = rel_err(grouped_experts(x, weights, ids, w.w1, w.w2), want)
    except Exception as error:  # noqa: BLE001 - no grouped matmul in this build
        err, rec["grouped_mm_error"] = float("inf"), f"{type(error).__name__}: {str(error)[:300]}"
    model.experts = grouped_experts if err < 1e-2 else looped_experts
    rec.update(experts="torch._grouped_mm" if err < 1e-2 else "per-expert loop (no CUDA graphs)",
               grouped_vs_loop_rel_err=err)


def time_ar_decode(rec: dict, run: Run) -> None:
    """One token per sequence per step over a paged prefix; then diffusion/AR tokens/s."""
    p = run.plan
    model = run.backbone or Backbone(run.cfg, run.device, run.gen(5))
    model.launch = run.blocks
    rows = rec["rows"] = []
    rec.update(context=p.context, sampler="greedy over full-vocabulary fp32 logits",
               kv_write="omitted (one token per layer; negligible)")
    for batch in p.ar_batches:
        run.report.check()
        model.allocate(batch, p.context)
        state = model.ar_state(batch)
        row = {"batch": batch, **measure_modes(run, lambda: model.ar_step(state), lambda: model.ar_layers(state))}
        ms30, row["mode"] = best_ms_30(row)
        row["tokens_per_s"] = 1e3 * batch / ms30
        rows.append(row)
        model.caches = []
    rec["diffusion_over_ar"] = diffusion_over_ar(run, rows)


def diffusion_over_ar(run: Run, ar_rows: list[dict]) -> list[dict]:
    """Denoise tokens/s (256 * canvases / (passes * pass time)) over AR tokens/s, fewest canvases
    against AR batch 1 and most canvases against the largest AR batch."""
    backbone = {r["canvases"]: r for r in run.report.data["sections"].get("backbone", {}).get("rows", [])}
    ar = {r["batch"]: r["tokens_per_s"] for r in ar_rows}
    ratios = []
    for canvases, batch in zip((run.plan.canvas_counts[0], run.plan.canvas_counts[-1]), run.plan.ar_batches):
        diffusion = backbone.get(canvases, {}).get("tokens_per_s")
        for passes in PASSES_PER_CANVAS:
            tps = diffusion and diffusion[f"{passes}_passes"]
            ratios.append({"canvases": canvases, "ar_batch": batch, "passes_per_canvas": passes,
                           "diffusion_tokens_per_s": tps, "ar_tokens_per_s": ar.get(batch),
                           "ratio": tps / ar[batch] if tps and batch in ar else None})
    return ratios


def roofline(rec: dict, run: Run) -> None:
    """Bytes a 30-layer pass reads (all weights: every expert is hit at 256 tokens) vs copy bandwidth."""
    sections = run.report.data["sections"]
    cfg30 = backbone_config(text_config(run.plan.dims, TOTAL_LAYERS), run.plan.canvas)
    counts = release_bytes(cfg30)
    bandwidth = sections.get("environment", {}).get("copy_gbps")
    touched = sections.get("backbone", {}).get("experts_touched_per_layer")
    rec.update(counts, copy_gbps=bandwidth, experts_touched_per_layer=touched,
               note="weights only; KV and sampler traffic excluded; floor = weight_bytes / copy bandwidth")
    if not bandwidth:
        rec["skipped"] = "no copy bandwidth measured"
        return
    rec["floor_ms"] = counts["weight_bytes"] / bandwidth / 1e6
    rows = rec["rows"] = []
    for row in sections.get("backbone", {}).get("rows", []):
        ms30, mode = best_ms_30(row)
        if ms30 is None:
            continue
        flops = 2 * counts["active_params_per_token"] * run.plan.canvas * row["canvases"]
        rows.append({"canvases": row["canvases"], "mode": mode, "pass_ms_30": ms30,
                     "over_floor": ms30 / rec["floor_ms"], "weight_gbps": counts["weight_bytes"] / ms30 / 1e6,
                     "fraction_of_copy_bw": counts["weight_bytes"] / ms30 / 1e6 / bandwidth,
                     "gemm_tflops": flops / ms30 / 1e9})


def time_transformers(rec: dict, run: Run) -> None:
    """transformers' decoder + its entropy-bound step, same layers and canvases, eager."""
    import transformers

    try:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DynamicCache
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            EntropyBoundSampler, EntropyBoundSamplerConfig)
    except ImportError as error:
        rec["skipped"] = f"transformers {transformers.__version__} has no diffusion_gemma ({error})"
        return
    p = run.plan
    run.backbone = None  # free our weights first
    gc.collect()
    config = DiffusionGemmaConfig(text_config=text_config(p.dims, p.layers), vision_config=TOY_VISION,
                                  canvas_length=p.canvas)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(run.device):
            model = DiffusionGemmaForBlockDiffusion(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND), p.canvas,
                                  p.dims["vocab_size"], 48)
    rec.update(version=transformers.__version__, layers_built=p.layers, context=p.context,
               experts_implementation=getattr(config.text_config, "_experts_implementation", None),
               attn_implementation=getattr(config, "_attn_implementation", None),
               step="decoder forward + softmax + multinomial + argmax + accept_canvas + renoise_canvas")
    watch = LayerStopwatch(model.model.decoder.layers, run.device)
    rows = rec["rows"] = []
    with torch.no_grad():
        for n in p.canvas_counts:
            run.report.check()
            row = {"canvases": n}
            need = 6 * n * p.canvas * p.dims["vocab_size"] * 4
            if run.device.type == "cuda" and need > torch.cuda.mem_get_info()[0]:
                row["error"] = f"skipped: needs ~{need / 2**30:.0f} GiB of fp32 [n, canvas, vocab] temporaries"
                rows.append(row)
                break
            try:
                step = transformers_step(model, sampler, DynamicCache, n, run)
                watch.reset()
                row["eager_ms"] = median_ms(step, run.device, p.warmup, p.reps)
                row["eager_layers_ms"] = watch.median_ms(last=min(3, p.reps))
                row["eager_ms_30"] = extrapolate(run, row["eager_ms"], row["eager_layers_ms"])
                row["tokens_per_s"] = {f"{k}_passes": 1e3 * p.canvas * n / (k * row["eager_ms_30"])
                                       for k in PASSES_PER_CANVAS}
                row["ours_speedup"] = speedup_over_transformers(run.report.data["sections"], n, row)
            except Exception as error:  # noqa: BLE001
                if not is_oom(error):
                    raise
                row["error"] = "OOM"
            rows.append(row)
            step = None
            gc.collect()
            if "error" in row:
                break
    watch.remove()


def transformers_step(model, sampler, cache_class, n: int, run: Run):
    """A callable doing one `_denoising_step` worth of work on a prefilled cache of n canvases."""
    p, vocab = run.plan, run.plan.dims["vocab_size"]
    gen = run.gen(6)
    cache = cache_class(config=model.config.text_config)
    model.model.encoder(input_ids=torch.randint(0, vocab, (n, p.context), generator=gen, device=run.device),
                        past_key_values=cache, use_cache=True)
    state = SimpleNamespace(canvas=torch.randint(0, vocab, (n, p.canvas), generator=gen, device=run.device), sc=None)

    def step():
        z = model(decoder_input_ids=state.canvas, past_key_values=cache,
                  self_conditioning_logits=state.sc).logits / TEMPERATURE
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        drawn = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(n, p.canvas)
        z.argmax(-1)  # the argmax canvas transformers keeps for halting
        accepted = sampler.accept_canvas(state.canvas, drawn, z, 0)
        state.canvas, state.sc = sampler.renoise_canvas(accepted, 0), z.to(torch.bfloat16)

    step()  # the first pass has no self-conditioning; time the steady state
    return step


class LayerStopwatch:
    """Times the span from the first to the last of `layers` in every forward (eager only)."""

    def __init__(self, layers, device: torch.device):
        self.device, self.marks = device, []
        self.hooks = [layers[0].register_forward_pre_hook(lambda *_: self._mark()),
                      layers[-1].register_forward_hook(lambda *_: self._mark())]

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def reset(self):
        self.marks = []

    def median_ms(self, last: int) -> float:
        """Median span of the `last` forwards (the timed repeats, after warm-up)."""
        synchronize(self.device)
        pairs = list(zip(self.marks[::2], self.marks[1::2]))[-last:]
        if self.device.type == "cuda":
            return statistics.median(a.elapsed_time(b) for a, b in pairs)
        return statistics.median((b - a) * 1e3 for a, b in pairs)

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def sweep_attention_blocks(rec: dict, run: Run) -> None:
    """Each launch candidate at the second-largest canvas count, then the kernel's default
    settings with 1, 2 and 4 key splits at the two smallest counts; or why a launch failed."""
    p, gen = run.plan, run.gen(7)
    rows = rec["rows"] = []
    for kind, attn in layer_kinds(run.cfg).items():
        window = run.cfg.sliding_window if attn.is_sliding else None
        trials = [(p.canvas_counts[-2], launch) for launch in p.block_candidates.get(attn.head_dim, [])]
        trials += [(n, {"num_splits": splits}) for n in p.canvas_counts[:2] for splits in (1, 2, 4)]
        inputs = {}
        for n, launch in trials:
            run.report.check()
            if n not in inputs:
                inputs = {n: (canvas_qkv(run, attn, n, p.canvas, gen), paged_prefix(
                    [p.attention_context] * n, attn.num_kv_heads, attn.head_dim, window, run.device, gen))}
            qkv, cache = inputs[n]
            row = {"layer": kind, "head_dim": attn.head_dim, "canvases": n, **launch}
            call = lambda: attention_call(run, attn, *qkv, cache, False, **launch)  # noqa: E731
            try:
                row["ms"] = median_ms(call, run.device, p.warmup, p.reps)
            except Exception as error:  # noqa: BLE001 - OutOfResources is an answer here
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)


GEMM_SAMPLER_CANDIDATES = [dict(block=b, num_warps=w, block_elements=e)
                           for b, w, e in ((2048, 8, 1 << 24), (1024, 4, 1 << 24), (4096, 8, 1 << 24),
                                           (2048, 4, 1 << 24), (2048, 8, 1 << 23), (2048, 8, 1 << 25))]


def sweep_gemm_sampler(rec: dict, run: Run) -> None:
    """The GEMM sampler's statistics step (columns per step, warps) and logits block size (the
    first candidate is its default), with the soft signal, at the fewest and most canvases."""
    p = run.plan
    s = sampler_inputs(run, p.canvas * max(p.canvas_counts), run.gen(8))
    rows = rec["rows"] = []
    for n in (p.canvas_counts[0], p.canvas_counts[-1]):
        args = (s.hidden[:n * p.canvas], s.embedding, SOFTCAP, s.temperature[:n * p.canvas], s.keys[:n * p.canvas],
                True)
        for launch in GEMM_SAMPLER_CANDIDATES:
            run.report.check()
            call = lambda: gemm_row_stats(*args, **launch)  # noqa: E731
            rows.append({"canvases": n, **launch, "ms": median_ms(call, run.device, p.warmup, p.reps),
                         "peak_mib": peak_mib(call, run.device)})


def judge_goals(rec: dict, run: Run) -> None:
    sections = run.report.data["sections"]
    first = run.plan.canvas_counts[0]
    backbone = {r["canvases"]: r for r in sections.get("backbone", {}).get("rows", [])}.get(first, {})
    roof = next((r for r in sections.get("roofline", {}).get("rows", []) if r["canvases"] == first), {})
    rec["rows"] = [
        goal("denoise pass at batch 1 within 1.3x of the bandwidth floor", roof.get("over_floor"), 1.3, "x floor"),
        goal("per-pass overhead with CUDA graphs under 0.5 ms (graph - kernel time)",
             backbone.get("graph_gap_ms_30"), 0.5, "ms"),
        goal(">= 5x transformers' reference tokens/s (batch 1)", speedup_over_transformers(sections, first), 5.0,
             "x", at_least=True),
        goal("the pass's sampler: memory flat in concurrency up to 64", sampler_growth(sections), 2.0,
             "x peak(64)/peak(1) less outputs"),
    ]
    rec["eager_minus_graph_ms_30_at_batch_1"] = backbone.get("overhead_ms_30")


def goal(name: str, measured, target: float, unit: str, at_least: bool = False) -> dict:
    if measured is None:
        status = "unknown (not measured; see its section)"
    else:
        status = "met" if (measured >= target if at_least else measured <= target) else "not met"
    return {"goal": name, "measured": measured, "target": f"{'>=' if at_least else '<='} {target} {unit}",
            "status": status}


def speedup_over_transformers(sections: dict, canvases: int, theirs: dict | None = None) -> float | None:
    """transformers' 30-layer step time over ours (graph where captured) at `canvases`."""
    ours = {r["canvases"]: r for r in sections.get("backbone", {}).get("rows", [])}.get(canvases, {})
    if theirs is None:
        theirs = {r["canvases"]: r for r in sections.get("transformers", {}).get("rows", [])}.get(canvases, {})
    ms30, _ = best_ms_30(ours)
    return theirs["eager_ms_30"] / ms30 if ms30 and theirs.get("eager_ms_30") else None


def sampler_growth(sections: dict) -> float | None:
    """Peak memory of the sampler the backbone pass used, at the most canvases over the fewest,
    outputs subtracted (+64 MiB slack)."""
    used = sections.get("backbone", {}).get("sampler")
    name = next((k for k, fn in SAMPLERS.items() if getattr(fn, "__name__", None) == used), None)
    rows = [r for r in sections.get("sampler", {}).get("rows", []) if r["sampler"] == name and r.get("peak_mib")]
    if len(rows) < 2:
        return None
    work = [max(0.0, r["peak_mib"] - r["outputs_mib"]) + 64 for r in (rows[0], rows[-1])]
    return work[1] / work[0]


SECTIONS = [("environment", measure_environment, False), ("attention_parity", check_attention_parity, False),
            ("sampler_parity", check_sampler_parity, False), ("attention", time_attention, False),
            ("sampler", time_sampler, False), ("router", time_router, False), ("backbone", time_backbone, False),
            ("ar_decode", time_ar_decode, False), ("roofline", roofline, True),
            ("transformers", time_transformers, False), ("plugin_loop", time_plugin_loop, False),
            ("block_sweep", sweep_attention_blocks, False), ("sampler_sweep", sweep_gemm_sampler, False),
            ("goals", judge_goals, True)]


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return "–" if value is None else str(value).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return lines + ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]


def render_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# GPU check: {meta.get('card')}, {meta.get('date')}", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in meta.items()] + [""]
    sections = data["sections"]
    order = ["goals"] + [name for name in sections if name != "goals"]
    for name in (n for n in order if n in sections):
        rec = sections[name]
        tables = {k: v for k, v in rec.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines += [f"## {name}", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in rec.items() if k not in tables and k != "traceback"]
        for key, rows in tables.items():
            lines += ["", f"{key}:", ""] + _table(rows)
        if "traceback" in rec:
            lines += ["", "```", rec["traceback"].strip(), "```"]
        lines.append("")
    return "\n".join(lines)


def metadata(args, device: torch.device) -> dict:
    import numpy
    import transformers
    import triton

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"
    return {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "smoke": args.smoke, "layers_built": args.layers, "deadline_s": args.deadline,
            "vllm_imported": "vllm" in sys.modules}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="toy shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--layers", type=int, default=6, help="backbone layers built of 30 (GPU only)")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds after which sections are skipped")
    return parser.parse_args(argv)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the device machine, or use --smoke")
    signal.signal(signal.SIGTERM, _terminate)
    device = torch.device("cpu" if args.smoke else "cuda")
    plan = smoke_plan() if args.smoke else gpu_plan(args.layers)
    args.layers = plan.layers
    torch.manual_seed(0)
    report = Report(args.out, args.deadline, metadata(args, device))
    run = Run(plan, device, report, backbone_config(text_config(plan.dims, plan.layers), plan.canvas))
    try:
        for name, section, always in SECTIONS:
            print(f"[{report.elapsed():6.1f} s] {name}", flush=True)
            report.run(name, section, run, always=always)
    except SystemExit:
        report.data["meta"]["terminated"] = f"killed at {report.elapsed():.0f} s; later sections missing"
        report.save()
        raise
    print("\n".join(_table(report.data["sections"]["goals"].get("rows", []))))
    print(json.dumps({"out": str(args.out), "card": report.data["meta"]["card"],
                      "goals": {g["goal"]: g["status"] for g in report.data["sections"]["goals"].get("rows", [])}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
