"""The denoise loop: every canvas of a step, pass after pass, until each halts.

All canvases of all requests go through each pass together, each with its own settings,
pass counter and seeded draws (noise.py). A canvas's whole state lives on the device in a
`CanvasBatch`, and `denoise_pass` advances it by one pass with no host round trip: it runs
the model, samples (sampler.py; the GEMM sampler on CUDA, the vocab-tiled torch one
elsewhere, drawing the same tokens), and updates only the canvases still running, so a
halted canvas stays frozen however many passes follow. That makes a run of passes a fixed
sequence of kernels, which `denoise/graphs.py` captures as CUDA graphs.

`denoise_canvases` drives the passes: after each pass (or each replayed run of passes) it
reads which canvases halted, the loop's only host synchronisation, collects their argmax
canvas (what gets committed) and pass count, and drops them from the batch, so a halted
canvas costs no further work. The loop does not know how a pass is computed: the engine, the
standalone runner and the GPU check each supply `run_pass(rows, canvas, soft) -> hidden`,
where `rows` picks each canvas's request inputs (prefix, positions) by its index in `jobs`.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from diffusiongemma_vllm.denoise import noise
from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.canvas_biases import CanvasBiases, TokenBias
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import RowStats, SparseBias, vocab_tiled_row_stats
from diffusiongemma_vllm.denoise.sampler import PassResult, decide, unchanged_passes
from diffusiongemma_vllm.denoise.vocab_shards import EXACT_IDS, VocabShards, empty_row_stats, merge_row_stats

RunPass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RowStatsFn = Callable[..., RowStats]
OnPass = Callable[["CanvasBatch", torch.Tensor], None]


@dataclass(frozen=True)
class Unembedding:
    """The tied embedding as the sampler uses it: logits = softcap(h . E), and the
    self-conditioning signal softmax(z) @ E * scale. Under tensor parallelism `weight` is
    this rank's slice of the vocabulary, from id `first_id`, and `shards` merges the slices'
    statistics (vocab_shards.py). A constrained read's (`restricted`) reads a vocabulary of
    its own: the allowed ids, `token_ids`."""

    weight: torch.Tensor  # [V, H], or this rank's [rows, H]
    softcap: float
    scale: float
    first_id: int = 0
    vocab_size: int | None = None  # the whole vocabulary; None: weight's rows
    shards: VocabShards | None = None
    token_ids: torch.Tensor | None = None  # [K] restricted: the token id of each of the read's ids

    def restricted(self, allowed: tuple[int, ...]) -> "Unembedding":
        """The unembedding of a constrained read (`diffusion_constrained`): argmax, draw, entropy
        and self-conditioning signal of the softmax over the `allowed` ids alone, as if every
        other logit were -inf (vLLM's in-tree K-space read). Its vocabulary is the sorted,
        distinct allowed ids, id j standing for token allowed[j] (Gumbel noise is keyed by j);
        under tensor parallelism each rank holds the allowed ids inside its slice, a contiguous
        run of that vocabulary, and the runs merge as slices do. Canvases are still drawn from
        the whole vocabulary (`vocab`), as vLLM re-noises a constrained read."""
        assert self.token_ids is None
        ids = sorted(set(allowed))
        lo, hi = bisect.bisect_left(ids, self.first_id), bisect.bisect_left(ids, self.first_id + self.weight.shape[0])
        rows = torch.tensor(ids[lo:hi], dtype=torch.long, device=self.weight.device) - self.first_id
        return replace(self, weight=self.weight[rows], first_id=lo, vocab_size=self.vocab,
                       token_ids=torch.tensor(ids, dtype=torch.long, device=self.weight.device))

    def read_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` (any shape) as ids of this unembedding's vocabulary: themselves, or for a
        constrained read their index among the allowed ids, -1 for a token outside them."""
        if self.token_ids is None:
            return tokens
        index = torch.searchsorted(self.token_ids, tokens).clamp_max(len(self.token_ids) - 1)
        return torch.where(self.token_ids[index] == tokens, index, -1)

    def __post_init__(self):
        if self.shards is not None:  # the merge gathers token ids as fp32
            assert self.vocab < EXACT_IDS, f"a vocabulary of {self.vocab} ids is too large to merge"

    @property
    def vocab(self) -> int:
        """Ids of the whole vocabulary: what canvases are drawn from."""
        return self.vocab_size if self.vocab_size is not None else self.weight.shape[0]

    def row_stats(self, row_stats: RowStatsFn, hidden: torch.Tensor, temperature: torch.Tensor,
                  keys: torch.Tensor, bias: SparseBias | None = None) -> RowStats:
        """`row_stats` over the whole vocabulary, with the self-conditioning signal (token ids),
        the `bias` entries (token ids) added to the logits."""
        if bias is not None and self.token_ids is not None:  # to the read's ids; others cannot be drawn
            ids = self.read_ids(bias.ids)
            bias = SparseBias(bias.rows[ids >= 0], ids[ids >= 0], bias.values[ids >= 0])
        if self.shards is None:
            stats = row_stats(hidden, self.weight, self.softcap, temperature, keys, True, bias=bias)
        elif self.weight.shape[0]:
            # The GEMM sampler draws a slice's noise from an id that is a multiple of 4; a
            # constrained read's slice may start anywhere. The torch path draws the same tokens.
            aligned = self.first_id % 4 == 0
            local = (row_stats if aligned else vocab_tiled_row_stats)(
                hidden, self.weight, self.softcap, temperature, keys, True, first_id=self.first_id, bias=bias)
            stats = merge_row_stats(local, self.shards)
        else:  # a rank whose slice holds none of a constrained read's ids: no probability here
            stats = merge_row_stats(empty_row_stats(hidden), self.shards)
        if self.token_ids is None:
            return stats
        return replace(stats, argmax=self.token_ids[stats.argmax], sample=self.token_ids[stats.sample])


@dataclass(frozen=True)
class CanvasJob:
    """One request's canvas in this step."""

    block: int  # how many canvases this request has committed before
    sampler: SamplerConfig
    seed: int
    seed_canvas: tuple[int, ...] | None = None  # start from these ids instead of noise (engine/canvas_options.py)
    pinned: tuple[int, ...] = ()  # positions held at their seed_canvas ids through every pass
    max_passes: int | None = None  # a cap below the schedule's max_denoising_steps
    biases: tuple[TokenBias, ...] = ()  # added to its logits in every pass (canvas_biases.py)


@dataclass
class CanvasBatch:
    """Device state of canvases denoised together; dim 0 of every tensor is the canvas."""

    rows: torch.Tensor  # [n] index of each canvas's job (its request inputs in run_pass)
    block_keys: torch.Tensor  # [n] int64: noise.block_key(seed, block)
    canvas: torch.Tensor  # [n, C] tokens the next pass reads
    argmax: torch.Tensor  # [n, C] the last pass's argmax (-1 before the first): what a halted canvas commits
    soft: torch.Tensor  # [n, C, H] self-conditioning embeddings (zeros before the first pass: no signal)
    hidden: torch.Tensor  # [n, C, H] the last pass's final hidden states: a halted canvas's logprobs
    unchanged: torch.Tensor  # [n] passes in a row the argmax has not changed
    steps: torch.Tensor  # [n] passes run
    halted: torch.Tensor  # [n] bool
    entropy_bound: torch.Tensor  # [n] fp32
    stability_threshold: torch.Tensor  # [n] int64
    confidence_threshold: torch.Tensor  # [n] fp32
    max_steps: torch.Tensor  # [n] int64: the schedule's length
    pass_cap: torch.Tensor  # [n] int64: passes after which the canvas halts (at most max_steps)
    seed_canvas: torch.Tensor  # [n, C] the ids pinned positions hold (0 elsewhere)
    pinned: torch.Tensor  # [n, C] bool
    t_min: torch.Tensor  # [n] fp64: the schedule is evaluated as SamplerConfig.temperature does
    t_max: torch.Tensor  # [n] fp64

    @classmethod
    def start(cls, jobs: list[CanvasJob], canvas_length: int, vocab_size: int, hidden_size: int,
              dtype: torch.dtype, device: torch.device | str, first_row: int = 0) -> "CanvasBatch":
        n = len(jobs)

        def per_job(name: str, tensor_dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(job.sampler, name) for job in jobs], dtype=tensor_dtype, device=device)

        block_keys = torch.tensor([noise.block_key(job.seed, job.block) for job in jobs], device=device)
        canvas = noise.initial_tokens(block_keys, canvas_length, vocab_size)
        seed_canvas = torch.zeros((n, canvas_length), dtype=torch.long, device=device)
        pinned = torch.zeros((n, canvas_length), dtype=torch.bool, device=device)
        for i, job in enumerate(jobs):
            if job.seed_canvas is not None:
                canvas[i] = seed_canvas[i] = torch.tensor(job.seed_canvas, device=device)
                pinned[i, list(job.pinned)] = True
        return cls(
            rows=torch.arange(first_row, first_row + n, device=device), block_keys=block_keys,
            canvas=canvas,
            argmax=torch.full((n, canvas_length), -1, dtype=torch.long, device=device),
            soft=torch.zeros((n, canvas_length, hidden_size), dtype=dtype, device=device),
            hidden=torch.zeros((n, canvas_length, hidden_size), dtype=dtype, device=device),
            unchanged=torch.zeros(n, dtype=torch.long, device=device),
            steps=torch.zeros(n, dtype=torch.long, device=device),
            halted=torch.zeros(n, dtype=torch.bool, device=device),
            entropy_bound=per_job("entropy_bound", torch.float32),
            stability_threshold=per_job("stability_threshold", torch.long),
            confidence_threshold=per_job("confidence_threshold", torch.float32),
            max_steps=per_job("max_denoising_steps", torch.long),
            pass_cap=torch.tensor([min(job.max_passes or job.sampler.max_denoising_steps,
                                       job.sampler.max_denoising_steps) for job in jobs], device=device),
            seed_canvas=seed_canvas, pinned=pinned,
            t_min=per_job("t_min", torch.float64), t_max=per_job("t_max", torch.float64))

    def __len__(self) -> int:
        return self.rows.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def take(self, index: torch.Tensor) -> "CanvasBatch":
        """The canvases at `index` [m], as a new batch."""
        return CanvasBatch(**{name: t[index] for name, t in self.tensors().items()})

    def copy_(self, source: "CanvasBatch", count: int | None = None) -> None:
        """Overwrite the first `count` (default: all) canvases with `source`'s, in place."""
        count = len(source) if count is None else count
        for name, t in self.tensors().items():
            t[:count].copy_(getattr(source, name)[:count])

    def put_(self, index: int, source: "CanvasBatch") -> None:
        """Overwrite canvas `index` with `source`'s only canvas, keeping its row (resuming a
        canvas that an earlier step left unfinished, in this step's request order)."""
        for name, t in self.tensors().items():
            if name != "rows":
                t[index] = getattr(source, name)[0]

    def pad_(self, count: int) -> None:
        """Make every canvas from `count` on a halted copy of the first: valid inputs for a
        pass, frozen by it, never read back (the padding of a graph's static batch)."""
        for t in self.tensors().values():
            t[count:] = t[0]
        self.halted[count:] = True

    def temperature(self) -> torch.Tensor:
        """[n] fp32 temperature of each canvas's next pass (config.SamplerConfig.temperature)."""
        remaining = (self.max_steps - self.steps).double()
        return (self.t_min + (self.t_max - self.t_min) * remaining / self.max_steps).float()


def row_stats_for(device: torch.device, batch_invariant: bool = False) -> RowStatsFn:
    """The sampler statistics for `device`: the GEMM sampler on CUDA (cuBLAS products, Triton
    statistics; kernels/gemm_sampler.py), else the vocab-tiled torch path (fixed chunks, so
    batch-invariant as it is). `batch_invariant` fixes the GEMM sampler's vocabulary chunk and
    takes its products from a fixed-order Triton GEMM instead of cuBLAS."""
    if device.type == "cuda":
        from diffusiongemma_vllm.kernels.fixed_order_gemm import fixed_order_mm
        from diffusiongemma_vllm.kernels.gemm_sampler import INVARIANT_VOCAB_CHUNK, gemm_row_stats, triton

        if triton is not None:
            return functools.partial(gemm_row_stats, vocab_chunk=INVARIANT_VOCAB_CHUNK, matmul=fixed_order_mm) \
                if batch_invariant else gemm_row_stats
    return vocab_tiled_row_stats


def denoise_pass(batch: CanvasBatch, run_pass: RunPass, unembedding: Unembedding,
                 row_stats: RowStatsFn, biases: CanvasBiases | None = None) -> PassResult:
    """One pass over every canvas of `batch`, in place; halted canvases keep their state.
    No host synchronisation without `biases`: safe to capture in a CUDA graph."""
    hidden = run_pass(batch.rows, batch.canvas, batch.soft)  # [n, C, H]
    n, length, width = hidden.shape
    temperature = batch.temperature().repeat_interleave(length)
    keys = noise.gumbel_row_keys(batch.block_keys, batch.steps, length).flatten()
    bias = biases.for_pass(batch.rows, length) if biases is not None else None
    stats = unembedding.row_stats(row_stats, hidden.reshape(n * length, width), temperature, keys, bias)
    renoise = noise.renoise_tokens(batch.block_keys, batch.steps, length, unembedding.vocab)
    result = decide(stats.argmax.view(n, length), stats.sample.view(n, length), stats.entropy.view(n, length),
                    renoise, batch.entropy_bound)
    # Pinned positions hold their seed ids: as the next input, in the argmax a halted canvas
    # commits, and without a self-conditioning signal of the model's own guess there.
    argmax = torch.where(batch.pinned, batch.seed_canvas, result.argmax)
    unchanged = unchanged_passes(batch.argmax, argmax, batch.unchanged)
    halts = ((unchanged >= batch.stability_threshold) & (result.mean_entropy < batch.confidence_threshold)) \
        | (batch.steps + 1 >= batch.pass_cap)
    live = ~batch.halted
    soft = (stats.soft * unembedding.scale).view(n, length, width).to(batch.soft.dtype)
    next_canvas = torch.where(batch.pinned, batch.seed_canvas, result.next_canvas)
    batch.canvas.copy_(torch.where(live[:, None], next_canvas, batch.canvas))
    batch.argmax.copy_(torch.where(live[:, None], argmax, batch.argmax))
    batch.soft.copy_(torch.where((live[:, None] & ~batch.pinned)[:, :, None], soft, batch.soft))  # pins stay 0
    batch.hidden.copy_(torch.where(live[:, None, None], hidden.to(batch.hidden.dtype), batch.hidden))
    batch.unchanged.copy_(torch.where(live, unchanged, batch.unchanged))
    batch.steps.add_(live.long())
    batch.halted.logical_or_(live & halts)
    return result


@dataclass
class PassRecord:
    """What one pass decided for the canvases in it (all canvases of a step start together)."""

    step: int
    rows: list[int]
    argmax: torch.Tensor  # [m, C]
    accepted: torch.Tensor  # [m, C]
    halted: torch.Tensor  # [m]


@dataclass
class DenoiseResult:
    tokens: torch.Tensor  # [n, C] committed argmax canvases (on the host); -1 rows for pending jobs
    passes: torch.Tensor  # [n] passes each canvas ran in all (-1 for pending jobs)
    records: list[PassRecord] = field(default_factory=list)
    # Canvases still running after max_passes: job index -> a one-canvas batch (a copy), the
    # form `resumed` takes.
    pending: dict[int, CanvasBatch] = field(default_factory=dict)
    pass_sizes: list[int] = field(default_factory=list)  # canvases in each batched pass this call ran
    hidden: torch.Tensor | None = None  # [n, C, H] on the device, with keep_hidden: each finished canvas's halting pass


def denoise_canvases(jobs: list[CanvasJob], canvas_length: int, run_pass: RunPass, unembedding: Unembedding,
                     device: torch.device | str = "cpu", record: bool = False, graphs=None,
                     first_row: int = 0, resumed: dict[int, CanvasBatch] | None = None,
                     max_passes: int | None = None, keep_hidden: bool = False,
                     on_pass: OnPass | None = None, row_stats: RowStatsFn | None = None) -> DenoiseResult:
    """Denoise one canvas per job until each halts, or for at most `max_passes` passes: the
    canvases still running then come back as `pending`, and a later call continues them
    exactly through `resumed` (job index -> a one-canvas batch; draws are keyed by the
    canvas's own pass counter, not by the call). `graphs` (a `denoise_graphs.DenoiseGraphs`
    built around a `run_pass` that reads only static inputs) replays captured passes; without
    it, for batches beyond its ladder, or when a job has logit biases, passes run eagerly. Job
    i's request inputs are row `first_row + i` of what run_pass reads. `keep_hidden` also
    returns each finished canvas's halting-pass hidden states, from which its logprobs come
    (kernels/top_logprobs.py).
    `on_pass(batch, slots)`, if given, sees the batch after each pass (or replay) and before
    halted canvases leave it, `slots` [n] being each canvas's job index (live drafts,
    drafts/publisher.py); it must only read. `row_stats` defaults to `row_stats_for(device)`."""
    device = torch.device(device)
    weight = unembedding.weight
    row_stats = row_stats or row_stats_for(device)
    batch = CanvasBatch.start(jobs, canvas_length, unembedding.vocab, weight.shape[1], weight.dtype, device, first_row)
    biases = CanvasBiases.of([job.biases for job in jobs], canvas_length, first_row, device)
    graphs = graphs if biases is None else None
    for index, state in (resumed or {}).items():
        batch.put_(index, state)
    tokens = torch.full((len(jobs), canvas_length), -1, dtype=torch.long)
    passes = torch.full((len(jobs),), -1, dtype=torch.long)
    hidden = batch.hidden.new_zeros((len(jobs), *batch.hidden.shape[1:])) if keep_hidden else None
    slots = torch.arange(len(jobs))  # job index of each canvas still in the batch
    records, sizes, step = [], [], 0
    while len(slots) and (max_passes is None or step < max_passes):
        sizes.append(len(slots))
        if graphs is not None and not record and graphs.ready_for(batch):
            batch = graphs.advance(batch)
        else:
            result = denoise_pass(batch, run_pass, unembedding, row_stats, biases)
            if record:
                records.append(PassRecord(step, slots.tolist(), result.argmax.cpu(), result.accepted.cpu(),
                                          batch.halted.cpu()))
        step += 1
        if on_pass is not None:
            on_pass(batch, slots)
        halted = batch.halted.cpu()
        if halted.any():
            done = halted.nonzero().squeeze(-1)
            tokens[slots[done]] = batch.argmax[done.to(device)].cpu()
            passes[slots[done]] = batch.steps[done.to(device)].cpu()
            if keep_hidden:
                hidden[slots[done].to(device)] = batch.hidden[done.to(device)]
            keep = (~halted).nonzero().squeeze(-1)
            batch, slots = batch.take(keep.to(device)), slots[keep]
    # take() copies: after a replay, batch is a view of the graph's static batch.
    pending = {int(job): batch.take(torch.tensor([index], device=device)) for index, job in enumerate(slots)}
    return DenoiseResult(tokens, passes, records, pending, sizes, hidden)
