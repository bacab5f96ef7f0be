"""The plugin's worker step in place of vLLM's token sampling, for either V1 model runner.

The main override is `_sample`: vLLM has just run the causal forward of the scheduled
tokens; instead of sampling one token per request from the last logits, the runner hands
over to `DenoiseStep` (denoise_step.py), which returns up to one canvas of tokens per
request (`[num_reqs, C]`, -1 padded). vLLM's own bookkeeping then records them exactly as it
records multi-token speculative output. Everything diffusion-specific lives in
denoise_step.py; this mixin only wires it in.

Platform runners live in their own modules (cpu_runner.py, gpu_runner.py) and import only
their platform's vLLM runner: importing vLLM's CPU worker replaces `torch.cuda` stream and
memory functions for the whole process, which breaks CUDA-graph capture in a GPU worker.
"""

from __future__ import annotations

from vllm.v1.outputs import SamplerOutput

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
