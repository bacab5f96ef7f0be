"""How vLLM is configured for DiffusionGemma: its per-architecture config hook.

vLLM keys its diffusion machinery (Model Runner V2 only, the `DiffusionScheduler`, one
denoise pass per scheduler step, diffusion-specific request validation) on
`hf_config.canvas_length`. This plugin runs its own multi-pass worker step on the ordinary
scheduler instead, so the hook moves the canvas length to `config.PLUGIN_CANVAS_ATTR`
before vLLM reads it; `BackboneConfig.from_hf` reads it from either place.
Registering this class under the architecture name replaces vLLM's in-tree hook.
"""

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .config import PLUGIN_CANVAS_ATTR


class DiffusionGemmaEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        hf_config = model_config.hf_config
        canvas_length = getattr(hf_config, "canvas_length", None)
        if canvas_length is not None:
            setattr(hf_config, PLUGIN_CANVAS_ATTR, canvas_length)
            hf_config.canvas_length = None
