"""The `diffusion_stats()` RPC both platform workers add (cpu_worker.py, gpu_worker.py).

It reports the worker step's counters (passes per scheduler step, passes per canvas,
canvases held between steps) to `LLM.collective_rpc("diffusion_stats")` and the benchmarks.
"""

from __future__ import annotations


class DiffusionStatsMixin:
    def diffusion_stats(self) -> dict:
        step = self.model_runner.denoise_step
        return {**step.stats.as_dict(), "pending_canvases": len(step.pending)}
