"""How vLLM is configured for DiffusionGemma: its per-architecture config hook.

vLLM 0.32 keys its own diffusion path on `hf_config.canvas_length` (`model_config.is_diffusion`):
Model Runner V2 only, the `DiffusionScheduler`, one denoise pass per scheduler step, and
diffusion-specific request validation. This plugin replaces that path with its own worker
step on the ordinary scheduler (see model_runner.py), so the hook, registered under the
architecture name in place of vLLM's in-tree one:
- marks the model as not-diffusion for vLLM (the cached `is_diffusion` is set to False;
  `canvas_length` stays in the HF config, where the plugin reads it);
- keeps vLLM's Gemma 4 attention-backend choice for the two head dims (GPU);
- turns off async scheduling, which assumes one sampled token per request and step, and
  installs the plugin's scheduler (scheduler.py), which keeps a request whose canvas spans
  several steps scheduled;
- selects the V1 model runner (the only runner whose sampler the plugin replaces), through
  `VLLM_USE_V2_MODEL_RUNNER=0`, the only switch vLLM 0.32 has; spawned engine processes
  inherit it;
- installs the plugin's worker and its request validator;
- lifts the checkpoint's `max_new_tokens=256` default so `max_tokens` alone bounds a reply;
- rejects tensor, pipeline and data parallelism: every rank would run its own denoise loop;
  the sampler reads the whole tied embedding, which tensor parallelism shards by vocabulary,
  and vLLM's data-parallel MoE runs its ranks' forwards in lockstep, which the loop's
  extra passes would break.
"""

from __future__ import annotations

import os

from vllm.model_executor.models.config import Gemma4Config, VerifyAndUpdateConfig

from .config import passes_per_step

WORKERS = {
    "cpu": "diffusiongemma_vllm.cpu_worker.DiffusionGemmaCPUWorker",
    "gpu": "diffusiongemma_vllm.gpu_worker.DiffusionGemmaGPUWorker",
}
VALIDATOR = "diffusiongemma_vllm.request_validator:DiffusionRequestValidator"
SCHEDULER = "diffusiongemma_vllm.scheduler.CanvasScheduler"  # a string: the config is pickled to the engine


class DiffusionGemmaEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        model_config.__dict__["is_diffusion"] = False

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        parallel = vllm_config.parallel_config
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(parallel, name) != 1:
                raise ValueError(f"DiffusionGemma (diffusiongemma-vllm) runs on one device per engine: {name} must be 1, "
                                 f"got {getattr(parallel, name)}; serve more GPUs with one engine each")
        model_config = vllm_config.model_config
        model_config.__dict__["is_diffusion"] = False
        vllm_config.diffusion_config = None
        if not current_platform.is_cpu():
            Gemma4Config.verify_and_update_config(vllm_config)
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        vllm_config.scheduler_config.async_scheduling = False
        passes_per_step(vllm_config.additional_config)  # a bad value fails here, naming the setting
        if vllm_config.scheduler_config.scheduler_cls is None:
            vllm_config.scheduler_config.scheduler_cls = SCHEDULER
        if vllm_config.parallel_config.worker_cls == "auto":
            vllm_config.parallel_config.worker_cls = WORKERS["cpu" if current_platform.is_cpu() else "gpu"]
        processors = list(model_config.logits_processors or [])
        if VALIDATOR not in processors:
            model_config.logits_processors = [*processors, VALIDATOR]
        overrides = dict(model_config.override_generation_config or {})
        overrides.setdefault("max_new_tokens", None)
        model_config.override_generation_config = overrides
