"""The RPCs both platform workers add (cpu_worker.py, gpu_worker.py).

- `diffusion_stats()`: the worker step's counters (passes per scheduler step, passes per
  canvas, canvases held between steps, structured requests' grammars held, canvases that
  waited for their grammar, grammars shared with the engine core or compiled here), for
  `LLM.collective_rpc("diffusion_stats")` and the benchmarks;
- `profile_denoise_pass(canvases, repeats, fused_kernels)`: one denoise pass timed on the
  device, against the bandwidth floor of its weights (pass_profile.py).

It also wraps vLLM's weight-transfer session (an RL weight update sent in chunks:
`start_weight_update`, `update_weights` per chunk, `finish_weight_update`): the model checks
the session's tensors together (none twice; every tensor of each module it touches, at the
end), and a chunk or a session that fails leaves every layer serving, old or new
(weight_updates.py). Those steps, as the runner's `reload_weights`, report a failure from one
rank only under tensor parallelism (`reported_by_last_rank`: vLLM's executor would otherwise
leave the other ranks' replies to answer its next call).
"""

from __future__ import annotations

from diffusiongemma_vllm.engine.pass_profile import profile_denoise_pass
from diffusiongemma_vllm.model.config import CheckpointError
from diffusiongemma_vllm.engine.weight_updates import (reported_by_last_rank, restore_unfinished_layers,
                                                         restored_on_failure)


class DiffusionWorkerRPCs:
    def diffusion_stats(self) -> dict:
        step = self.model_runner.denoise_step
        return {**step.stats.as_dict(), "pending_canvases": step.held_canvases(),
                "held_grammars": len(step.grammars.grammars), "grammar_sources": dict(step.grammars.sources)}

    def profile_denoise_pass(self, canvases: int = 1, repeats: int = 20, fused_kernels: bool | None = None) -> dict:
        return profile_denoise_pass(self.model_runner, canvases, repeats, fused_kernels)

    def start_weight_update(self) -> None:
        with reported_by_last_rank():
            super().start_weight_update()
        self.model_runner.get_model().begin_update(whole=False, in_one_load=False)

    def update_weights(self, update_info) -> None:
        """vLLM's: one chunk of a weight-transfer update. vLLM ends the update session when a
        chunk fails, with its layers still on the meta device; here they are restored first."""
        with reported_by_last_rank(), restored_on_failure(self.model_runner.get_model(), self.vllm_config.model_config):
            super().update_weights(update_info)

    def finish_weight_update(self) -> None:
        """vLLM's, after the session's check: a module it sent only some tensors of keeps its
        previous weights, and the error names it once the session has ended."""
        with reported_by_last_rank():
            model = self.model_runner.get_model()
            try:
                model.end_update()
            except CheckpointError:
                restore_unfinished_layers(model, self.vllm_config.model_config)
                super().finish_weight_update()
                raise
            super().finish_weight_update()
