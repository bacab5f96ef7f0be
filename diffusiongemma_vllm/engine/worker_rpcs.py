"""The RPCs both platform workers add (cpu_worker.py, gpu_worker.py).

- `diffusion_stats()`: the worker step's counters (passes per scheduler step, passes per
  canvas, canvases held between steps, structured requests' grammars held, canvases that
  waited for their grammar, grammars shared with the engine core or compiled here), for
  `LLM.collective_rpc("diffusion_stats")` and the benchmarks;
- `profile_denoise_pass(canvases, repeats, fused_kernels)`: one denoise pass timed on the
  device, against the bandwidth floor of its weights (pass_profile.py).

It also wraps vLLM's `update_weights` (a weight-transfer engine's chunk of an RL weight
update): a chunk that fails leaves every layer serving, old or new (weight_updates.py).
"""

from __future__ import annotations

from diffusiongemma_vllm.engine.pass_profile import profile_denoise_pass
from diffusiongemma_vllm.engine.weight_updates import restore_unfinished_layers


class DiffusionWorkerRPCs:
    def diffusion_stats(self) -> dict:
        step = self.model_runner.denoise_step
        return {**step.stats.as_dict(), "pending_canvases": step.held_canvases(),
                "held_grammars": len(step.grammars.grammars), "grammar_sources": dict(step.grammars.sources)}

    def profile_denoise_pass(self, canvases: int = 1, repeats: int = 20, fused_kernels: bool | None = None) -> dict:
        return profile_denoise_pass(self.model_runner, canvases, repeats, fused_kernels)

    def update_weights(self, update_info) -> None:
        """vLLM's: one chunk of a weight-transfer update. vLLM ends the update session when a
        chunk fails, with its layers still on the meta device; here they are restored first."""
        try:
            super().update_weights(update_info)
        except Exception:
            restore_unfinished_layers(self.model_runner.get_model(), self.vllm_config.model_config)
            raise
