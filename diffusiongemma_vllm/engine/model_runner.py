"""The plugin's worker step in place of vLLM's token sampling, for either V1 model runner.

The main override is `_sample`: vLLM has just run the causal forward of the scheduled
tokens; instead of sampling one token per request from the last logits, the runner hands
over to `DenoiseStep` (engine/worker_step.py), which returns up to one canvas of tokens per
request (`[num_reqs, C]`, -1 padded). vLLM's own bookkeeping then records them exactly as it
records multi-token speculative output. Everything diffusion-specific lives in
engine/worker_step.py; this mixin only wires it in.

Platform runners live in their own modules (cpu_runner.py, gpu_runner.py) and import only
their platform's vLLM runner: importing vLLM's CPU worker replaces `torch.cuda` stream and
memory functions for the whole process, which breaks CUDA-graph capture in a GPU worker.
"""

from __future__ import annotations

import copy

import torch
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from vllm.forward_context import get_forward_context

from diffusiongemma_vllm.engine.worker_step import DenoiseStep, StepOutput
from diffusiongemma_vllm.engine.image_prefill import image_prefill
from diffusiongemma_vllm.model.image_attention import FORWARD_KEY
from diffusiongemma_vllm.engine.kv_layout import check_caches
from diffusiongemma_vllm.engine.lora_adapters import CanvasAdapters, adapter_model_class
from diffusiongemma_vllm.engine.weight_updates import reported_by_last_rank, restored_on_failure
from diffusiongemma_vllm.model.checkpoint import expected_text_tensors


class DenoiseStepRunnerMixin:
    denoise_step: DenoiseStep | None = None

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        adapters = CanvasAdapters(self.lora_manager) if self.lora_config is not None else None
        self.denoise_step = DenoiseStep(self.get_model(), self.vllm_config, self.device, adapters)

    def load_lora_model(self, model, *args, **kwargs):
        """vLLM's, loading adapters as the plugin serves them (lora_adapters.py), never into
        the vision tower."""
        with model.image_encoder_hidden():
            model = super().load_lora_model(model, *args, **kwargs)
        shapes = {name: spec.shape for name, spec in expected_text_tensors(model.cfg).items()}
        self.lora_manager._lora_model_cls = adapter_model_class(
            frozenset(i for i, layer in enumerate(model.cfg.layers) if layer.k_eq_v), shapes,
            self.lora_config.max_lora_rank, self.lora_manager._adapter_manager._create_merged_loras_inplace)
        return model

    def execute_model(self, scheduler_output, *args, **kwargs):
        """vLLM's. First the worker step forgets the requests that finished since the last
        step (their settings, held canvases and grammars; a request resubmitted under a
        finished one's id starts afresh), then the grammars of structured requests that
        reached the engine since the last step start compiling (scheduler.py,
        structured_commit.py). A step that schedules no token still reports the pending gauge
        when that freed a held canvas (an abort of the only request, say)."""
        if self.denoise_step is not None:
            self.denoise_step.forget(scheduler_output.finished_req_ids)
            # A scheduler other than the plugin's (a user's scheduler_cls) sends none.
            self.denoise_step.grammars.prepare(getattr(scheduler_output, "diffusion_grammars", ()))
        output = super().execute_model(scheduler_output, *args, **kwargs)
        if output is not None and not scheduler_output.total_num_scheduled_tokens and self.denoise_step is not None:
            metrics = self.denoise_step.metrics.take()
            if metrics:
                output = copy.copy(output)  # vLLM's empty output is one shared object
                output.diffusion_metrics = metrics
        return output

    def _model_forward(self, *args, **kwargs):
        """vLLM's forward of the scheduled tokens, told where images' soft tokens are, whose
        attention is bidirectional within each image (model/image_attention.py)."""
        if self.supports_mm_inputs:
            images = image_prefill(self)
            if images is not None:
                get_forward_context().additional_kwargs[FORWARD_KEY] = images
        return super()._model_forward(*args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        """vLLM's, with the step's counters for /metrics attached (step_metrics.py)."""
        output = super().sample_tokens(*args, **kwargs)
        metrics = self.denoise_step.metrics.take() if self.denoise_step is not None else {}
        if metrics:  # only steps that denoised, whose output is their own (never a shared empty one)
            output.diffusion_metrics = metrics
        return output

    def reload_weights(self, weights_iterator=None, weights_path: str | None = None,
                       is_checkpoint_format: bool = True) -> None:
        """vLLM's in-place weight update: from a path (the whole checkpoint), or from an iterator
        of checkpoint tensors (every tensor of each module it touches). One that fails leaves
        every layer serving, old or new (weight_updates.py), and raises (under tensor
        parallelism on the last rank only, `reported_by_last_rank`)."""
        model = self.get_model()
        model.begin_update(whole=weights_iterator is None, in_one_load=True)
        with reported_by_last_rank(), restored_on_failure(model, self.vllm_config.model_config):
            super().reload_weights(weights_iterator=weights_iterator, weights_path=weights_path,
                                   is_checkpoint_format=is_checkpoint_format)
        model.drop_update()

    def initialize_kv_cache(self, *args, **kwargs) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        check_caches(self)  # start-up, not the first step: a cache the denoise cannot read

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        assert spec_decode_metadata is None, "engine/config_hook.py refuses speculative decoding"
        # The plugin draws from its own keyed noise, never from vLLM's per-request generators.
        # vLLM rewinds those for requests whose prefill chunk sampled nothing, and a CPU
        # generator cannot rewind ("CPU Generator does not use offset"): drop them.
        self.input_batch.generators.clear()
        step = self.denoise_step.run(self)
        return SamplerOutput(sampled_token_ids=step.tokens.to(self.device),
                             logprobs_tensors=logprobs_tensors(step, self.input_batch.max_num_logprobs))


def logprobs_tensors(step: StepOutput, k: int | None) -> LogprobsTensors | None:
    """vLLM's logprobs of a multi-token step: one row per cell of the `[num_reqs, C]` token
    grid, row-major (vLLM keeps the rows of emitted tokens, as for speculative output, and
    trims each request's at EOS, stop or max_tokens with its tokens); column 0 is the
    emitted token, then the request's top k, or the ids it asked for with
    `logprob_token_ids` (padded with -inf: vLLM reads as many columns as the request asked
    for). Rows of requests that did not ask are never read."""
    widths = [result.top_ids.shape[1] for result in step.logprobs.values()]
    if k is None and not widths:
        return None
    width = max([k or 0, *widths])
    num_reqs, canvas = step.tokens.shape
    ids = torch.zeros((num_reqs, canvas, width + 1), dtype=torch.int64)
    values = torch.full((num_reqs, canvas, width + 1), float("-inf"), dtype=torch.float32)
    ranks = torch.ones((num_reqs, canvas), dtype=torch.int64)
    for row, result in step.logprobs.items():
        length, asked = result.top_ids.shape  # the request's canvas, which may be narrower
        ids[row, :length, 0] = step.tokens[row, :length].clamp_min(0)
        ids[row, :length, 1:asked + 1] = result.top_ids
        values[row, :length, 0] = result.token_logprob
        values[row, :length, 1:asked + 1] = result.top_logprobs
        ranks[row, :length] = result.rank
    return LogprobsTensors(ids.flatten(0, 1), values.flatten(0, 1), ranks.flatten())
