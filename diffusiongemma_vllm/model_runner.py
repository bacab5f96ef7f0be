"""vLLM's V1 model runners with the plugin's worker step in place of token sampling.

The main override is `_sample`: vLLM has just run the causal forward of the scheduled
tokens; instead of sampling one token per request from the last logits, the runner hands
over to `DenoiseStep` (denoise_step.py), which returns up to one canvas of tokens per
request (`[num_reqs, C]`, -1 padded). vLLM's own bookkeeping then records them exactly as it
records multi-token speculative output. On GPU, `capture_model` (worker start-up) also
captures the denoise passes' CUDA graphs. Everything diffusion-specific lives in
denoise_step.py; this file only wires it into the CPU and GPU runner classes.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from .denoise_step import DenoiseStep


class DenoiseStepRunnerMixin:
    denoise_step: DenoiseStep | None = None

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self.denoise_step = DenoiseStep(self.get_model(), self.vllm_config, self.device)

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        if spec_decode_metadata is not None:
            raise NotImplementedError("speculative decoding is not supported with DiffusionGemma")
        # The plugin draws from its own keyed noise, never from vLLM's per-request generators.
        # vLLM rewinds those for requests whose prefill chunk sampled nothing, and a CPU
        # generator cannot rewind ("CPU Generator does not use offset"): drop them.
        self.input_batch.generators.clear()
        return SamplerOutput(sampled_token_ids=self.denoise_step.run(self).to(self.device),
                             logprobs_tensors=None)


class DiffusionGemmaCPURunner(DenoiseStepRunnerMixin, CPUModelRunner):
    pass


class DiffusionGemmaGPURunner(DenoiseStepRunnerMixin, GPUModelRunner):
    def capture_model(self) -> int:
        """vLLM's graphs of the causal pass, then the denoise graph ladder (worker start-up,
        skipped by vLLM under enforce_eager); returns the graph memory, as vLLM's does."""
        free_before = torch.cuda.mem_get_info()[0]
        memory = super().capture_model()
        self.denoise_step.capture_graphs(self)
        return max(memory, free_before - torch.cuda.mem_get_info()[0])
