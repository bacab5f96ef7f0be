"""vLLM's CPU worker building the plugin's CPU runner (engine/config_hook.py selects it on CPU).

Only CPU processes may import this module: vLLM's CPU worker replaces `torch.cuda` stream
and memory functions for the whole process when imported.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from diffusiongemma_vllm.engine.cpu_runner import DiffusionGemmaCPURunner
from diffusiongemma_vllm.engine.worker_rpcs import DiffusionWorkerRPCs


class DiffusionGemmaCPUWorker(DiffusionWorkerRPCs, CPUWorker):
    def init_device(self):
        super().init_device()
        # CPUWorker builds vLLM's runner inline (no factory method); replace it before the
        # model is loaded. The discarded runner holds only small host buffers.
        self.model_runner = DiffusionGemmaCPURunner(self.vllm_config, self.device)
