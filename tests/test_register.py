"""The `vllm.general_plugins` entry point and `register()`."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import diffusiongemma_vllm
from diffusiongemma_vllm import ARCHITECTURE, register


def test_entry_point_is_installed():
    """Catches a packaging change that drops the entry point: vLLM would silently serve its
    in-tree DiffusionGemma instead of the plugin."""
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("diffusiongemma") == "diffusiongemma_vllm:register"


def test_import_is_cheap():
    """Catches heavy imports at package import: vLLM imports every general plugin in every
    process, before CUDA may be touched."""
    code = "import sys, diffusiongemma_vllm; print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_register_twice_resolves_to_plugin_class():
    """Catches a register() that is not idempotent or that leaves vLLM's in-tree class in place."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from diffusiongemma_vllm.engine.config_hook import DiffusionGemmaEngineConfig
    from diffusiongemma_vllm.model.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    register()
    register()
    assert ModelRegistry.models[ARCHITECTURE].load_model_cls() is DiffusionGemmaForBlockDiffusion
    assert MODELS_CONFIG_MAP[ARCHITECTURE] is DiffusionGemmaEngineConfig
    assert diffusiongemma_vllm.MODEL_CLASS.endswith(":DiffusionGemmaForBlockDiffusion")


def test_plugin_logs_print_as_vllms_do():
    """Catches the plugin's INFO lines (the engine settings it forces at start-up) being
    dropped: vLLM configures only its own `vllm` logger (at engine start), and a logger outside
    it falls through to Python's last-resort handler, which prints warnings only."""
    code = ("from vllm.config.logging import LoggingConfig; from vllm.logger import configure_logging; "
            "configure_logging(LoggingConfig()); from diffusiongemma_vllm.engine import config_hook; "
            "config_hook.logger.info('forced settings')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert any("INFO" in line and line.endswith("forced settings") for line in (out.stdout + out.stderr).splitlines())
