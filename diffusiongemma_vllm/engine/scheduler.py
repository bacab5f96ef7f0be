"""vLLM's V1 scheduler, taught that a request may spend several steps on one canvas.

With `passes_per_step` set (engine/worker_step.py), the worker runs at most that many denoise
passes per scheduler step, so a request that arrives mid-block gets its prefill scheduled within a
few passes instead of after the whole block. A canvas still denoising at the end of a step
emits nothing for its request. The stock scheduler would then never schedule that request
again: it counted the step's token as computed when it scheduled it, and with no new token
there is nothing left to compute.

So after each step's bookkeeping, a running request that reached the end of its tokens yet
received none (not a partial prompt chunk) has its last token marked as not computed. The
next step schedules that one token again: no new KV slot (its block is already allocated),
and the worker sees the request ready with the same context length and resumes its canvas.
Without `passes_per_step` every ready request emits a canvas each step, except a structured one
whose grammar the worker is still compiling (structured_commit.py), which waits the same way.

Structured requests reach the worker with the first step after they arrive (the step's
`diffusion_grammars`, a list of (request id, sampling parameters, reasoning): the engine core's
`reasoning_ended` and `reasoning_parser_kwargs`, which say where its grammar starts,
reasoning_bounds.py), not when first scheduled:
vLLM's engine core holds such a request until its own copy of the grammar compiles, and the
worker gets its copy meanwhile instead of after: in the engine core's process (vLLM's
uniprocess executor) it shares the engine core's compile through `ENGINE_GRAMMARS`, elsewhere it
compiles its own (structured_commit.py). The step's `finished_req_ids` tell the worker when to
drop one. It ends a request at the token that completes a stop string as the canvas arrives
(stop_strings.py), and forwards the worker step's counters into the step's stats
(step_metrics.py). A streaming-input session's next turn keeps the last turn's canvas, which
vLLM's own rule (keep the computed tokens) would drop.
Requires synchronous scheduling (engine/config_hook.py turns async scheduling off) and no
speculative decoding (the config hook refuses it).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from diffusiongemma_vllm.engine.step_metrics import attach_to_stats
from diffusiongemma_vllm.engine.stop_strings import StopStrings
from diffusiongemma_vllm.engine.structured_commit import ENGINE_GRAMMARS


class CanvasScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grammars_to_send: list[str] = []  # structured requests the worker has not been sent
        self.stop_strings = StopStrings(self.vllm_config.model_config)
        self.kv_cache_manager.get_computed_blocks = cache_hits_outside_images(self.kv_cache_manager)

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if request.use_structured_output and request.request_id not in self.grammars_to_send:
            self.grammars_to_send.append(request.request_id)

    def schedule(self, *args, **kwargs):
        """vLLM's, with the structured requests that arrived since the last step attached
        (`diffusion_grammars`; one finished meanwhile is dropped)."""
        output = super().schedule(*args, **kwargs)
        arrived = [r for r in map(self.requests.get, self.grammars_to_send) if r is not None and not r.is_finished()]
        output.diffusion_grammars = [(r.request_id, r.sampling_params, reasoning(r)) for r in arrived]
        ENGINE_GRAMMARS.update(((id(self.vllm_config), r.request_id), r.structured_output_request) for r in arrived
                               if r.structured_output_request is not None)  # None: a session whose update is queued
        self.grammars_to_send = []
        return output

    def _try_schedule_encoder_inputs(self, request: Request, num_computed_tokens: int, num_new_tokens: int,
                                     *args, **kwargs):
        """vLLM's, for a chunk first cut before an image it would split (`whole_images`)."""
        num_new_tokens = whole_images(request, num_computed_tokens, num_new_tokens)
        return super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens, *args, **kwargs)

    def get_grammar_bitmask(self, scheduler_output):
        """None: vLLM's next-token grammar bitmask would mask logits the denoise step never
        samples from (the worker constrains whole canvases, structured_commit.py). vLLM still
        advances each request's grammar with its committed canvas and checks it there."""
        return None

    def _update_request_with_output(self, request: Request, new_token_ids: list[int], *args, **kwargs):
        """vLLM's, ending the request at the token that completes a stop string
        (stop_strings.py). Its status is not FINISHED_STOPPED: vLLM's detokenizer takes the
        last token of a request stopped so for a stop token and leaves its text out; it reads
        all of them and, finding the stop string, reports `finish_reason` stop with it, as for
        a stop string it finds itself."""
        stop = self.stop_strings.first_stop(request, new_token_ids)
        if stop is not None:
            del new_token_ids[stop[0]:]
        new_token_ids, stopped = super()._update_request_with_output(request, new_token_ids, *args, **kwargs)
        if stop is not None and not stopped:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            request.stop_reason = stop[1]
            stopped = True
        return new_token_ids, stopped

    def _update_request_as_session(self, session: Request, update) -> None:
        """vLLM's next turn of a streaming-input session, keeping what the last turn said.
        vLLM keeps the turn's computed output tokens, which for an autoregressive model are all
        but the last sampled one; a canvas is computed only by the causal pass of the step
        after it, so vLLM would drop the turn's whole last canvas. Every output token but the
        last is kept here, as vLLM keeps an autoregressive model's; the uncomputed ones are
        prefilled with the new chunk."""
        computed = session.num_computed_tokens
        if session.num_output_tokens:
            session.num_computed_tokens = max(computed, session.num_tokens - 1)
        try:
            super()._update_request_as_session(session, update)
        finally:
            session.num_computed_tokens = computed

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)  # None once finished or aborted
            if request is None or request.status != RequestStatus.RUNNING or request.is_prefill_chunk:
                continue
            if request.num_computed_tokens == request.num_tokens:  # at its end, nothing emitted: canvas pending
                request.num_computed_tokens -= 1
        attach_to_stats(outputs, getattr(model_runner_output, "diffusion_metrics", None))
        return outputs


def reasoning(request: Request) -> tuple[bool | None, dict | None] | None:
    """What the engine core knows of where the request's grammar starts: (`reasoning_ended`,
    `reasoning_parser_kwargs`) of its structured-outputs state, as the API server set them."""
    state = request.structured_output_request
    return None if state is None else (state.reasoning_ended, state.reasoning_parser_kwargs)


def cache_hits_outside_images(manager):
    """`manager.get_computed_blocks`, for a prefix-cache hit that never ends inside an image's
    soft tokens: it is shortened to end before them. The image's queries read all of its K/V,
    and a hit keeps, on sliding-window layers, only the blocks of the window before its end
    (vLLM gives the earlier ones the null block), so the rest of an image cut by a hit would
    read another block's K/V. A hit that holds a whole image is kept."""
    find_longest, blocks_of = manager.coordinator.find_longest_cache_hit, manager.create_kv_cache_blocks
    longest = manager.get_computed_blocks

    def get_computed_blocks(request: Request):
        blocks, hit, shared_boundary = longest(request)
        while (cut := _image_cut_by(request, hit)) is not None:
            computed, hit, uncached = find_longest(request.block_hashes, cut)
            blocks, shared_boundary = blocks_of(computed), hit + uncached if uncached else 0
        return blocks, hit, shared_boundary

    return get_computed_blocks


def _image_cut_by(request: Request, num_tokens: int) -> int | None:
    """The first soft token of an image the request's first `num_tokens` tokens end inside, or None."""
    for feature in request.mm_features:
        for first, last in feature.mm_position.extract_embeds_range():
            if first < num_tokens <= last:
                return first
    return None


def whole_images(request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
    """The prefill chunk's length, cut so that it ends before an image's soft tokens rather
    than inside them: an image attends to itself both ways, so its soft tokens are computed in
    one forward (model/image_attention.py). vLLM's `disable_chunked_mm_input` alone lets a chunk
    that starts at an image's `boi` end inside it. A chunk that starts inside the soft tokens
    (none should: prefix-cache hits end outside images, `cache_hits_outside_images`) and cannot
    reach their end is 0: it waits for a step with the token budget to finish them (at most
    one image, which vLLM checks max_num_batched_tokens holds)."""
    cut = _image_cut_by(request, num_computed_tokens + num_new_tokens)
    return num_new_tokens if cut is None else max(0, cut - num_computed_tokens)
