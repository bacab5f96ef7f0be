"""diffusiongemma_vllm: a vLLM plugin that serves DiffusionGemma.

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process it
starts (API server or `LLM`, engine core, workers). It must stay cheap and idempotent: it
only records lazy `"module:Class"` strings and a config hook, and names the address live
drafts travel on (drafts/publisher.py); nothing here imports torch model code or touches a device.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import uuid

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
MODEL_CLASS = "diffusiongemma_vllm.model.diffusion_gemma:DiffusionGemmaForBlockDiffusion"
# The worker publishes live drafts here and the API server subscribes (drafts/publisher.py).
DRAFTS_ENV = "DIFFUSIONGEMMA_DRAFTS"

__all__ = ["ARCHITECTURE", "DRAFTS_ENV", "MODEL_CLASS", "register"]


def register() -> None:
    """Route the DiffusionGemma architecture to this plugin (replacing vLLM's in-tree class)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from diffusiongemma_vllm.engine.config_hook import DiffusionGemmaEngineConfig

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP[ARCHITECTURE] = DiffusionGemmaEngineConfig
    # The first vLLM process (API server or LLM) runs this before starting the engine, whose
    # processes inherit the address: one per server. That process removes the socket's file
    # (which the worker creates) when it exits.
    if DRAFTS_ENV not in os.environ:
        path = f"{tempfile.gettempdir()}/dg-drafts-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.environ[DRAFTS_ENV] = f"ipc://{path}"
        atexit.register(_remove_file, path)


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
