"""Workers that build the plugin's model runner (engine_config.py selects them).

Both keep vLLM's worker unchanged except for the runner they construct, and add one RPC,
`diffusion_stats()`, that reports the worker step's counters (passes per scheduler step,
passes per canvas) to `LLM.collective_rpc` and the benchmark.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from .model_runner import DiffusionGemmaCPURunner, DiffusionGemmaGPURunner


class DiffusionStatsMixin:
    def diffusion_stats(self) -> dict:
        step = self.model_runner.denoise_step
        return {**step.stats.as_dict(), "pending_canvases": len(step.pending)}


class DiffusionGemmaCPUWorker(DiffusionStatsMixin, CPUWorker):
    def init_device(self):
        super().init_device()
        # CPUWorker builds vLLM's runner inline (no factory method); replace it before the
        # model is loaded. The discarded runner holds only small host buffers.
        self.model_runner = DiffusionGemmaCPURunner(self.vllm_config, self.device)


class DiffusionGemmaGPUWorker(DiffusionStatsMixin, Worker):
    def _make_model_runner(self):
        return DiffusionGemmaGPURunner(self.vllm_config, self.device)
