"""vLLM's V1 CPU model runner with the plugin's worker step (model_runner.py)."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from diffusiongemma_vllm.engine.model_runner import DenoiseStepRunnerMixin


class DiffusionGemmaCPURunner(DenoiseStepRunnerMixin, CPUModelRunner):
    pass
