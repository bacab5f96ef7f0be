"""The plugin's worker step: after vLLM's causal pass, denoise one canvas per ready request.

A scheduler step on the V1 runner already ran vLLM's paged-attention forward over the
scheduled tokens: a prompt (or a chunk of one) or the previous canvas being committed. Both
are causal and write KV. A request is *ready* when that pass reached the end of its known
tokens (vLLM's `discard_request_mask` is False for it). For every ready request this step:
1. locates its committed prefix K/V in the paged cache (step_prefixes.py): on GPU the Triton
   kernel reads the cache in place through the block table (copied, with the context
   lengths, into static `PagedStepInputs`); on CPU it is gathered once per layer and step;
   sliding layers read only the last window-1 tokens, the only ones vLLM keeps;
2. denoises a fresh canvas at positions [L, L + C) with all other ready canvases in the
   same passes (at most max_num_batched_tokens // C canvases per pass, the activation size
   vLLM reserved memory for; more take turns), until each halts (denoise/loop.py), without
   returning to the scheduler; on GPU the passes replay CUDA graphs (denoise/graphs.py)
   unless the engine runs without CUDA graphs (`enforce_eager`, `cudagraph_mode` NONE);
3. emits the argmax canvas (trimmed at max_model_len) as the request's sampled tokens; a
   request with structured outputs commits its canvas under its grammar instead
   (structured_commit.py). A canvas that halts before its grammar has compiled on every
   tensor-parallel rank emits nothing: it waits, halted, in `awaiting`, its request is
   scheduled again as for `passes_per_step` below, and a later step commits it once the
   grammar is ready, so a slow compile holds its own request only.
The scheduler appends them, applies EOS / stop ids / max_tokens (trimming inside the
canvas), and next step schedules the emitted tokens again: that pass is the commit.

With `passes_per_step` (vLLM's `additional_config`, e.g. `--additional-config
'{"passes_per_step": 8}'`) a canvas runs at most that many passes per step. A canvas still
running then emits nothing and keeps its device state here, keyed by request; scheduler.py
schedules its request again (one token, its last) and the next step resumes the canvas where
it stopped, with the same draws, so the output does not depend on the setting. Requests that
arrive meanwhile get their prefill within a few passes instead of after whole blocks. The exception: a first
canvas whose request asked for prompt logprobs finishes in its step, since vLLM returns those
with the step that ends the prompt and requires a token with them.

Per-request settings: the checkpoint's generation_config.json, overridden by the request's
`extra_args` (validated at admission by request_validator.py); the seed is the request's
`seed`, or a random one kept for its lifetime; its canvas options (its canvas length, a
seeded, pinned first canvas, a pass cap, a constrained read: canvas_options.py) come from
`extra_args` too, and each pass denoises canvases of one length and one read (the whole
vocabulary, or the allowed ids of a constrained read or of vLLM's `allowed_token_ids`). A
request's `logit_bias`, `bad_words` and `min_tokens` bias its canvases (request_biases.py);
while the denoise graphs serve the other canvases, biased ones denoise in passes of their
own. A request that asked for live drafts has its canvas's argmax published every
`draft_every` passes (drafts/publisher.py); the others add no work.

Under vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`, which makes vLLM's own layers'
results independent of the batch) the plugin's own kernels follow: the denoise attention
runs one key split and the GEMM sampler fixed vocabulary chunks, so a seeded request's
arithmetic does not depend on the canvases beside it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from vllm import envs
from vllm.config import CUDAGraphMode
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

from diffusiongemma_vllm.model.canvas_context import CanvasPass, PagedPrefix, PrefixKV, canvas_forward_context
from diffusiongemma_vllm.model.config import SamplerConfig, passes_per_step
from diffusiongemma_vllm.denoise.loop import (CanvasBatch, CanvasJob, DenoiseResult, Unembedding, denoise_canvases,
                                              row_stats_for)
from diffusiongemma_vllm.denoise.graphs import DenoiseGraphs, ladder_for
from diffusiongemma_vllm.drafts.publisher import DraftPublisher
from diffusiongemma_vllm.kernels.top_logprobs import TopLogprobs, top_logprobs
from diffusiongemma_vllm.engine.step_prefixes import PagedStepInputs, gather_prefixes
from diffusiongemma_vllm.engine.canvas_options import CanvasOptions
from diffusiongemma_vllm.engine.lora_adapters import CanvasAdapters
from diffusiongemma_vllm.engine.request_biases import request_biases
from diffusiongemma_vllm.engine.step_metrics import StepMetrics
from diffusiongemma_vllm.engine.structured_commit import CanvasGrammars

GRAMMAR_POLL_S = 0.05  # a step with only canvases awaiting their grammars waits this long for one


@dataclass
class DiffusionStats:
    """Cumulative counters of this worker, readable through `collective_rpc("diffusion_stats")`;
    bounded in size for the life of a server (a histogram, not a list per canvas)."""

    steps: int = 0  # scheduler steps that denoised at least one canvas
    passes: int = 0  # batched denoise passes
    canvases: int = 0
    canvas_passes: Counter[int] = field(default_factory=Counter)  # passes -> canvases that took that many
    largest_pass: int = 0  # most canvases denoised together in one pass
    awaited_grammars: int = 0  # canvases that halted before their grammar compiled, and waited for it

    def record_step(self, canvas_passes: list[int], pass_sizes: list[int]) -> None:
        self.steps += bool(pass_sizes)  # not a step that only committed canvases held for their grammars
        self.passes += len(pass_sizes)
        self.canvases += len(canvas_passes)
        self.canvas_passes.update(canvas_passes)
        self.largest_pass = max(self.largest_pass, *pass_sizes, 0)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "passes": self.passes, "canvases": self.canvases,
                "passes_per_step": self.passes / max(self.steps, 1), "canvas_passes": dict(self.canvas_passes),
                "largest_pass": self.largest_pass, "awaited_grammars": self.awaited_grammars}


@dataclass
class StepOutput:
    tokens: torch.Tensor  # [num_reqs, C] int64, -1 where nothing is emitted
    logprobs: dict[int, TopLogprobs]  # batch row -> its emitted canvas's logprobs ([C] rows, on the host)


@dataclass(frozen=True)
class _ReadyRequest:
    """A request whose causal pass reached the end of its tokens this step."""

    row: int  # in the runner's batch
    req_id: str
    context: int  # its tokens so far: the canvas starts there
    structured: bool  # commits under a grammar (structured_commit.py)
    logprobs: bool  # asked for logprobs: top-k, or of chosen ids
    logprob_ids: tuple[int, ...] | None  # vLLM's `logprob_token_ids`: these ids instead of the top-k
    must_emit: bool  # its first canvas, and it asked for prompt logprobs: vLLM wants a token this step


@dataclass
class AwaitingGrammar:
    """A structured request's canvas that halted before its grammar compiled: what committing
    it needs, kept until a later step finds the grammar ready."""

    context: int
    tokens: torch.Tensor  # [C] the halting pass's argmax, on the host
    passes: int
    hidden: torch.Tensor  # [C, H] the halting pass's hidden states, on the device

    @staticmethod
    def turn(held: list["AwaitingGrammar"]) -> DenoiseResult:
        """The held canvases as one finished turn of the denoise loop."""
        return DenoiseResult(torch.stack([h.tokens for h in held]), torch.tensor([h.passes for h in held]),
                             hidden=torch.stack([h.hidden for h in held]))


@dataclass(frozen=True)
class _RequestSettings:
    seed: int
    sampler: SamplerConfig
    canvas: CanvasOptions
    params: object  # the SamplingParams these came from

    @property
    def allowed(self) -> tuple[int, ...]:
        """The ids its canvases are drawn from (() the whole vocabulary): a constrained read's
        (its logprobs renormalised over them), or vLLM's `allowed_token_ids` (logprobs raw)."""
        return self.canvas.allowed or tuple(sorted(set(self.params.allowed_token_ids or ())))

    def job(self, generated: int, width: int) -> CanvasJob:
        """The request's canvas after its `generated` output tokens, in canvases of `width`: a
        seeded and pinned start shapes the first only; its logit biases (request_biases.py)."""
        block = generated // width
        first = block == 0
        return CanvasJob(block, self.sampler, self.seed, self.canvas.seed_canvas if first else None,
                         self.canvas.pinned if first else (), self.canvas.max_steps,
                         request_biases(self.params, generated))


class DenoiseStep:
    def __init__(self, model, vllm_config, device: torch.device, adapters: CanvasAdapters | None = None):
        self.model = model
        self.adapters = adapters  # LoRA adapters served (lora_adapters.py), or None
        self.vllm_config = vllm_config
        self.device = device
        self.canvas_length = model.cfg.canvas_length
        self.default_sampler = SamplerConfig.served_by(vllm_config.model_config)
        self.settings: dict[str, _RequestSettings] = {}
        self.passes_per_step = passes_per_step(vllm_config.additional_config)
        self.pending: dict[str, tuple[int, CanvasBatch]] = {}  # request -> (context length, unfinished canvas)
        self.awaiting: dict[str, AwaitingGrammar] = {}  # request -> its halted canvas, grammar not yet compiled
        self.stats = DiffusionStats()
        self.metrics = StepMetrics()  # what /metrics has not seen yet (step_metrics.py)
        # A pass over m canvases runs m * C tokens through the layers; vLLM sized its memory for
        # max_num_batched_tokens, so more ready canvases than that are denoised in turns.
        self.canvases_per_pass = max(1, vllm_config.scheduler_config.max_num_batched_tokens // self.canvas_length)
        self.largest_pass = min(vllm_config.scheduler_config.max_num_seqs, self.canvases_per_pass)
        self.unembedding = model.unembedding()
        # vLLM's batch-invariant mode: one key split in the denoise attention, fixed sampler chunks.
        invariant = envs.VLLM_BATCH_INVARIANT
        self.key_splits = 1 if invariant else None
        self.row_stats = row_stats_for(device, batch_invariant=invariant)
        self.paged_inputs: PagedStepInputs | None = None  # GPU: built at the first step
        self.paged_run_pass = None  # GPU: the run_pass over paged_inputs
        self.graphs: DenoiseGraphs | None = None
        self.capture_context = graph_capture_context(device)
        # Live drafts (drafts/publisher.py), bound now, before any request.
        self.drafts = DraftPublisher.from_env(get_tensor_model_parallel_rank())
        self.grammars = CanvasGrammars(vllm_config, self.unembedding.vocab)  # structured outputs

    def _settings(self, req_id: str, sampling_params) -> _RequestSettings:
        """The request's settings, rebuilt when its sampling parameters change (a streaming
        input session's next turn brings its own)."""
        held = self.settings.get(req_id)
        if held is None or held.params is not sampling_params:
            seed = sampling_params.seed if sampling_params.seed is not None else unseeded_seed(req_id)
            sampler = self.default_sampler.with_request_overrides(sampling_params.extra_args)
            canvas = CanvasOptions.from_extra_args(sampling_params.extra_args, self.canvas_length,
                                                   self.model.cfg.vocab_size, sampling_params.logprob_token_ids)
            self.settings[req_id] = _RequestSettings(seed, sampler, canvas, sampling_params)
        return self.settings[req_id]

    def run(self, runner) -> StepOutput:
        """Sampled token ids `[num_reqs, C]` for the runner's batch, -1 where nothing is emitted,
        and the logprobs of the canvases emitted for requests that asked for them."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        out = StepOutput(torch.full((num_reqs, self.canvas_length), -1, dtype=torch.int64), {})
        ready = [self._ready_request(runner, row) for row in np.nonzero(~runner.discard_request_mask.np[:num_reqs])[0]]
        if not ready:
            return out
        started = time.perf_counter()
        # Structured requests the scheduler did not send ahead (a streaming session that turned
        # structured, a scheduler other than the plugin's) start compiling here.
        self.grammars.prepare((r.req_id, runner.requests[r.req_id].sampling_params, None)
                              for r in ready if r.structured)
        held = {r.req_id: self.awaiting.pop(r.req_id) for r in ready if r.req_id in self.awaiting}
        fresh = [r for r in ready if r.req_id not in held or held[r.req_id].context != r.context]
        waiting = [r for r in ready if r.req_id in held and held[r.req_id].context == r.context]
        reads = {r.req_id: self._read(runner, r) for r in fresh}
        adapters = self.adapters.denoising([runner.requests[r.req_id].lora_request for r in fresh]) \
            if self.adapters is not None else contextlib.nullcontext()
        with torch.inference_mode(), adapters:
            turns = [turn for read in sorted(set(reads.values()))  # one canvas length and read per pass
                     for turn in self._denoise(runner, [r for r in fresh if reads[r.req_id] == read], *read)]
            if waiting:
                turns.append((AwaitingGrammar.turn([held[r.req_id] for r in waiting]), waiting, self.unembedding))
            # Nothing else to run: wait a little for a grammar rather than spin through empty steps.
            wait = GRAMMAR_POLL_S if len(waiting) == num_reqs else 0.0
            for turn, requests, unembedding in turns:
                self._constrain(runner, turn, requests, wait)
                self._logprobs(turn, requests, batch.max_num_logprobs, out, unembedding)
        self.stats.awaited_grammars += sum(req_id not in held for req_id in self.awaiting)  # held for the first time
        for turn, requests, _ in turns:
            for job, request in enumerate(requests):
                emit = min(turn.tokens.shape[1], runner.max_model_len - request.context)
                out.tokens[request.row, :emit] = turn.tokens[job, :emit]
        finished = [p for turn, _, _ in turns for p in turn.passes.tolist() if p >= 0]
        sizes = [size for turn, _, _ in turns for size in turn.pass_sizes]
        if finished or sizes:  # not a step that only waited for grammars
            self.stats.record_step(finished, sizes)
            self.metrics.record_step(finished, sizes, self.held_canvases(), time.perf_counter() - started)
        return out

    def _ready_request(self, runner, row: int) -> _ReadyRequest:
        req_id = runner.input_batch.req_ids[row]
        state = runner.requests[req_id]
        params = state.sampling_params
        context = int(runner.optimistic_seq_lens_cpu[row])
        first_canvas = context == state.num_prompt_tokens
        ids = None if params.logprob_token_ids is None else tuple(params.logprob_token_ids)
        return _ReadyRequest(int(row), req_id, context, params.structured_outputs is not None,
                             params.logprobs is not None or ids is not None, ids,
                             first_canvas and params.prompt_logprobs is not None)

    def _read(self, runner, request: _ReadyRequest) -> tuple[int, tuple[int, ...], bool]:
        """What the request's canvas is denoised with, which its pass mates must share: its
        canvas length (`diffusion_canvas_length`, else the checkpoint's), the ids it is drawn
        from (`diffusion_constrained` or `allowed_token_ids`; (): the whole vocabulary), and, while the
        denoise graphs serve the others, whether it has logit biases (its passes run eagerly)."""
        state = runner.requests[request.req_id]
        settings = self._settings(request.req_id, state.sampling_params)
        width = settings.canvas.width or self.canvas_length
        biased = self.graphs is not None and bool(request_biases(state.sampling_params,
                                                                 request.context - state.num_prompt_tokens))
        return width, settings.allowed, biased

    def _denoise(self, runner, requests: list[_ReadyRequest], width: int, allowed: tuple[int, ...],
                 biased: bool) -> list[tuple[DenoiseResult, list[_ReadyRequest], Unembedding]]:
        """A fresh or resumed canvas of `width` tokens for each of `requests`, read over the
        `allowed` ids (() the whole vocabulary) and denoised together (in turns of at most
        `canvases_per_pass`): each turn's result with its requests and the unembedding it read;
        canvases still running at the pass limit are held in `pending`. The denoise graphs
        serve the checkpoint's canvas length and whole vocabulary without logit biases
        (`biased` only groups the requests: the loop sees each canvas's biases); other passes
        run eagerly."""
        jobs, resumed, drafts = [], {}, []
        for slot, request in enumerate(requests):
            state = runner.requests[request.req_id]
            settings = self._settings(request.req_id, state.sampling_params)
            generated = request.context - state.num_prompt_tokens
            jobs.append(settings.job(generated, width))
            if self.drafts is not None:
                drafts.append(self.drafts.canvas(state.sampling_params, jobs[-1].block, request.context, generated,
                                                 runner.max_model_len))
            held = self.pending.pop(request.req_id, None)
            if held is not None and held[0] == request.context:
                resumed[slot] = held[1]
        rows, context = [r.row for r in requests], [r.context for r in requests]
        adapters = [runner.requests[r.req_id].lora_request for r in requests] if self.adapters is not None else None
        if self.device.type == "cuda":
            run_pass = self._load_paged_inputs(runner, rows, context)
            if width != self.canvas_length or adapters is not None:
                run_pass = self.pass_runner(self.paged_inputs.context_lens, self.paged_inputs.prefixes, width,
                                            adapters)
        else:
            run_pass = self.pass_runner(torch.tensor(context), gather_prefixes(runner, rows, context, self.device),
                                        width, adapters)
        unembedding = self.unembedding.restricted(allowed) if allowed else self.unembedding
        graphs = self.graphs if width == self.canvas_length and not allowed else None
        turns = []
        for first in range(0, len(jobs), self.canvases_per_pass):
            last = min(len(jobs), first + self.canvases_per_pass)
            limit = None if any(r.must_emit for r in requests[first:last]) else self.passes_per_step
            turn = denoise_canvases(
                jobs[first:last], width, run_pass, unembedding, device=self.device,
                row_stats=self.row_stats, graphs=graphs, first_row=first, max_passes=limit,
                keep_hidden=any(r.logprobs or r.structured for r in requests[first:last]),
                resumed={slot - first: resumed[slot] for slot in range(first, last) if slot in resumed},
                on_pass=self.drafts.watch(drafts[first:last]) if self.drafts is not None else None)
            for job, canvas in turn.pending.items():
                self.pending[requests[first + job].req_id] = (context[first + job], canvas)
            turns.append((turn, requests[first:last], unembedding))
        return turns

    def held_canvases(self) -> int:
        """Canvases held between steps: still denoising, or halted and awaiting their grammar."""
        return len(self.pending) + len(self.awaiting)

    def forget(self, finished) -> None:
        """Drop the settings, held canvases and grammars of the `finished` request ids (vLLM's
        `finished_req_ids`: a preempted request is not among them and keeps its canvas), and
        report the pending gauge when that frees a held canvas."""
        held = self.held_canvases()
        for req_id in finished:
            self.settings.pop(req_id, None)
            self.pending.pop(req_id, None)
            self.awaiting.pop(req_id, None)
        self.grammars.forget(finished)
        if self.held_canvases() != held:
            self.metrics.record_pending(self.held_canvases())

    def _constrain(self, runner, turn: DenoiseResult, requests: list[_ReadyRequest], wait: float) -> None:
        """Structured requests' finished canvases, committed under their grammars
        (structured_commit.py), in place of the argmax in `turn.tokens`; before `_logprobs`,
        which then reports the tokens committed. A canvas whose grammar is not ready on every
        rank (after `wait` seconds at most) is held in `awaiting` and emits nothing this step,
        unless its request must have a token now (prompt logprobs): that one waits."""
        jobs = [job for job, r in enumerate(requests) if r.structured and turn.passes[job] >= 0]
        if not jobs:
            return
        ready = self.grammars.ready([requests[job].req_id for job in jobs], wait)
        ready = ranks_agree([ok or requests[job].must_emit for ok, job in zip(ready, jobs)])
        for job, ok in zip(jobs, ready):
            request = requests[job]
            if ok:
                state = runner.requests[request.req_id]
                tokens = runner.input_batch.token_ids_cpu[request.row, :request.context].tolist()
                turn.tokens[job] = self.grammars.commit(request.req_id, turn.hidden[job], turn.tokens[job],
                                                        self.unembedding, state.prompt_token_ids or [], tokens)
            else:
                self.awaiting[request.req_id] = AwaitingGrammar(request.context, turn.tokens[job].clone(),
                                                                int(turn.passes[job]), turn.hidden[job].clone())
                turn.tokens[job] = -1
                turn.passes[job] = -1

    def _logprobs(self, turn: DenoiseResult, requests: list[_ReadyRequest], k: int | None, out: StepOutput,
                  unembedding: Unembedding) -> None:
        """Logprobs of the canvases this turn finished for requests that asked, from their
        halting pass (kernels/top_logprobs.py), into `out.logprobs` by batch row: the top `k`,
        or for a request with `logprob_token_ids` those ids' (as vLLM's sampler prefers them).
        A constrained read's are over the vocabulary the turn read (its allowed ids:
        renormalised over them); the others' over the whole vocabulary (vLLM's raw logprobs,
        also under `allowed_token_ids`)."""
        jobs = [job for job, r in enumerate(requests) if r.logprobs and turn.passes[job] >= 0]
        renormalised = [job for job in jobs if self.settings[requests[job].req_id].canvas.allowed]
        raw = [job for job in jobs if job not in renormalised]
        for group, read in ((renormalised, unembedding), (raw, self.unembedding)):
            if group:
                self._read_logprobs(turn, requests, group, k, out, read)

    def _read_logprobs(self, turn: DenoiseResult, requests: list[_ReadyRequest], jobs: list[int], k: int | None,
                       out: StepOutput, unembedding: Unembedding) -> None:
        """`_logprobs` of the turn's `jobs`, over `unembedding`'s vocabulary."""
        length = turn.tokens.shape[1]
        index = torch.tensor(jobs, device=self.device)
        hidden = turn.hidden[index].flatten(0, 1)  # [jobs * C, H]
        tokens = unembedding.read_ids(turn.tokens[jobs].flatten().to(self.device))
        asked = [requests[job].logprob_ids or () for job in jobs]
        k = 0 if all(asked) else k or 0  # the batch's top-k, unless every request here asked for ids
        chosen = None
        if any(asked):
            chosen = torch.full((len(jobs), length, max(map(len, asked))), -1, dtype=torch.long)
            for n, ids in enumerate(asked):
                chosen[n, :, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            chosen = unembedding.read_ids(chosen.flatten(0, 1).to(self.device))
        result = top_logprobs(hidden, unembedding.weight, unembedding.softcap, tokens, k,
                              first_id=unembedding.first_id, shards=unembedding.shards, chosen_ids=chosen)
        on_host = TopLogprobs(*(getattr(result, f.name).cpu() for f in fields(result)))
        for n, (job, ids) in enumerate(zip(jobs, asked)):
            span = slice(n * length, (n + 1) * length)
            row = TopLogprobs(*(getattr(on_host, f.name)[span] for f in fields(on_host)))
            if requests[job].logprob_ids is not None:
                row = replace(row, top_ids=torch.tensor(ids, dtype=torch.long).expand(length, len(ids)),
                              top_logprobs=row.chosen_logprobs[:, :len(ids)])
            out.logprobs[requests[job].row] = row

    def pass_runner(self, context_lens: torch.Tensor, prefixes: dict[str, PrefixKV | PagedPrefix],
                    canvas_length: int | None = None, adapters: list | None = None):
        """run_pass over canvases of `canvas_length` (default: the checkpoint's) whose request
        inputs sit at `rows` of `context_lens` and of each prefix, and whose LoRA adapters (when
        the engine serves them) are at `rows` of `adapters` (vLLM's LoRARequest or None; default
        none). Only device work, unless adapters are served: on GPU the same function is
        captured in graphs."""
        canvas_length = canvas_length or self.canvas_length
        layer_names = self.model.attention_layer_names()
        offsets = torch.arange(canvas_length, device=self.device)
        context_lens = context_lens.to(self.device)

        def run_pass(rows: torch.Tensor, canvas: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
            if self.adapters is not None:
                self.adapters.map_pass([adapters[r] if adapters else None for r in rows.tolist()], canvas_length)
            lens = context_lens[rows]
            positions = (lens[:, None] + offsets).flatten()
            embeds = self.model.embed_canvas(canvas.flatten(), soft.flatten(0, 1))

            def prefix(name: str) -> PrefixKV | PagedPrefix:
                full = prefixes[name]
                if isinstance(full, PagedPrefix):
                    return replace(full, block_table=full.block_table[rows])
                return PrefixKV(full.key[rows], full.value[rows], full.lens[rows])

            spec = CanvasPass(lens, canvas_length, prefix)
            with canvas_forward_context(spec, self.vllm_config, layer_names):
                hidden = self.model(None, positions, inputs_embeds=embeds)
            return hidden.view(len(rows), canvas_length, -1)

        return run_pass

    def capture_graphs(self, runner) -> None:
        """GPU, engine start-up (after vLLM's own capture): capture the denoise graph ladder on
        dummy canvases (no committed prefix), so no request waits for a capture. A failed
        capture leaves the graphs off (logged) and the passes eager."""
        self._build_paged_inputs(runner)
        if self.graphs is None:
            return
        cfg = self.model.cfg
        dummy = [CanvasJob(0, self.default_sampler, seed=0)]
        with torch.inference_mode(), self.capture_context():
            like = CanvasBatch.start(dummy, self.canvas_length, cfg.vocab_size, cfg.hidden_size,
                                     self.unembedding.weight.dtype, self.device)
            self.graphs.capture_ladder(like)

    def _build_paged_inputs(self, runner) -> None:
        if self.paged_inputs is not None:
            return
        max_num_seqs = self.vllm_config.scheduler_config.max_num_seqs
        self.paged_inputs = PagedStepInputs.build(runner, max_num_seqs, self.key_splits)
        self.paged_run_pass = self.pass_runner(self.paged_inputs.context_lens, self.paged_inputs.prefixes)
        # Off under enforce_eager, and while LoRA adapters are served (each pass maps its canvases to theirs).
        if self.vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE and self.adapters is None:
            self.graphs = DenoiseGraphs(self.paged_run_pass, self.unembedding, self.row_stats,
                                        ladder=ladder_for(self.largest_pass), agree=all_ranks_agree)

    def _load_paged_inputs(self, runner, ready: list[int], context: list[int]):
        """GPU: copy this step's context lengths and block-table rows into the static inputs
        the passes (and their graphs) read; built once with the run_pass over them and, unless
        the engine runs eagerly, the graph ladder."""
        self._build_paged_inputs(runner)
        self.paged_inputs.load(runner, ready, context)
        return self.paged_run_pass



def graph_capture_context(device: torch.device) -> Callable[[], AbstractContextManager]:
    """What the denoise graphs are captured inside: vLLM's `graph_capture` under tensor
    parallelism on a GPU (its custom all-reduce registers the buffers a captured collective
    reads, as for vLLM's own graphs), else nothing."""
    if device.type == "cuda" and get_tensor_model_parallel_world_size() > 1:
        from vllm.distributed.parallel_state import graph_capture

        return functools.partial(graph_capture, device)
    return contextlib.nullcontext


def ranks_agree(flags: list[bool]) -> list[bool]:
    """Whether each of `flags` holds on every tensor-parallel rank (each passes its own): a
    grammar ready on one rank only must wait for the others, whose canvases must stay identical."""
    group = get_tp_group()
    if group.world_size == 1:
        return flags
    agreed = torch.tensor(flags, dtype=torch.int32)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=group.cpu_group)
    return agreed.bool().tolist()


def all_ranks_agree(ok: bool) -> bool:
    """Whether `ok` holds on every rank: a graph capture that failed on one rank turns the
    graphs off on all of them."""
    return ranks_agree([ok])[0]


def unseeded_seed(req_id: str) -> int:
    """The seed of a request that set none: a hash of vLLM's request id, which ends in a random
    suffix, so it differs from request to request and run to run, and every tensor-parallel
    rank derives the same one (their canvases must stay identical)."""
    return int.from_bytes(hashlib.blake2b(req_id.encode(), digest_size=8).digest(), "little") >> 2
