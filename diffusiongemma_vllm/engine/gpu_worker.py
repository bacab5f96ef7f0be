"""vLLM's GPU worker building the plugin's GPU runner (engine/config_hook.py selects it on GPU)."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from diffusiongemma_vllm.engine.gpu_runner import DiffusionGemmaGPURunner
from diffusiongemma_vllm.engine.worker_rpcs import DiffusionWorkerRPCs


class DiffusionGemmaGPUWorker(DiffusionWorkerRPCs, Worker):
    def _make_model_runner(self):
        return DiffusionGemmaGPURunner(self.vllm_config, self.device)
