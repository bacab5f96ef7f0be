"""vLLM's V1 GPU model runner with the plugin's worker step (model_runner.py).

At start-up it also puts the denoise loop into vLLM's memory plan (denoise_memory.py):
`profile_run` runs one denoise pass at the largest canvas batch after vLLM's forward, and
`profile_cudagraph_memory` adds what the denoise graphs will hold. `capture_model` (skipped by
vLLM under enforce_eager) also captures the denoise passes' CUDA graphs. vLLM's own sampler,
which the denoise step replaces, is never warmed (`_dummy_sampler_run`). This module never
imports vLLM's CPU runner or worker (see model_runner.py for why).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from diffusiongemma_vllm.engine.denoise_memory import graph_memory, run_largest_pass
from diffusiongemma_vllm.engine.model_runner import DenoiseStepRunnerMixin

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures


class DiffusionGemmaGPURunner(DenoiseStepRunnerMixin, GPUModelRunner):
    def profile_run(self, *args, **kwargs) -> None:
        """vLLM's profiling forward, then a denoise pass at the largest canvas batch, inside
        vLLM's memory profiling: the peak it measures covers both."""
        super().profile_run(*args, **kwargs)
        run_largest_pass(self.denoise_step, self)

    @torch.inference_mode()
    def _dummy_sampler_run(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """vLLM's profiling run of its own sampler, without the sampler: the denoise step replaces
        it, and run_largest_pass profiles the denoise sampler. With CUDA graphs on, vLLM JIT-warms
        its Triton top-k/top-p kernels here, which took minutes on an H200. The logits stay, so
        the profiled peak still holds a [max_num_reqs, vocab] block."""
        return self.model.compute_logits(hidden_states)

    def profile_cudagraph_memory(self) -> int:
        """vLLM's graph estimate plus the denoise graphs' (their pool and static batches)."""
        estimate = super().profile_cudagraph_memory()  # vLLM calls this only when graphs are on
        denoise = graph_memory(self.denoise_step, self)
        logger.info("DiffusionGemma denoise graphs: %.2f GiB estimated (one pass over %d canvases %.2f GiB, "
                    "static batches %.2f GiB)", (denoise.peak_bytes + denoise.static_bytes) / 2**30,
                    denoise.canvases, denoise.peak_bytes / 2**30, denoise.static_bytes / 2**30)
        return estimate + denoise.peak_bytes + denoise.static_bytes

    def capture_model(self) -> int:
        """vLLM's graphs of the causal pass, then the denoise graph ladder; returns the graph
        memory, as vLLM's does."""
        free_before = torch.cuda.mem_get_info()[0]
        memory = super().capture_model()
        self.denoise_step.capture_graphs(self)
        return max(memory, free_before - torch.cuda.mem_get_info()[0])
