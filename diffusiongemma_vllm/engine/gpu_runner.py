"""vLLM's V1 GPU model runner with the plugin's worker step (model_runner.py).

`capture_model` (worker start-up, skipped by vLLM under enforce_eager) also captures the
denoise passes' CUDA graphs. This module never imports vLLM's CPU runner or worker (see
model_runner.py for why).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from diffusiongemma_vllm.engine.model_runner import DenoiseStepRunnerMixin


class DiffusionGemmaGPURunner(DenoiseStepRunnerMixin, GPUModelRunner):
    def capture_model(self) -> int:
        """vLLM's graphs of the causal pass, then the denoise graph ladder; returns the graph
        memory, as vLLM's does."""
        free_before = torch.cuda.mem_get_info()[0]
        memory = super().capture_model()
        self.denoise_step.capture_graphs(self)
        return max(memory, free_before - torch.cuda.mem_get_info()[0])
