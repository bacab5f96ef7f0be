"""The config hook (engine_config.py) on a real `EngineArgs.create_engine_config()`."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name", ["tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"])
def test_model_parallelism_is_rejected_naming_the_setting(tiny_dir, name):
    """Catches silently wrong text under tensor parallelism (each rank would sample from its own
    vocabulary shard) or a hang under pipeline or data parallelism (ranks out of lockstep): the
    engine must refuse to start and say which setting to change."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    with pytest.raises(ValueError, match=f"{name} must be 1"):
        EngineArgs(model=tiny_dir, max_model_len=256, **{name: 2}).create_engine_config()


def test_single_device_config_marks_the_model_non_diffusion_for_vllm(tiny_dir):
    """Catches vLLM's own one-pass-per-step diffusion path taking over (is_diffusion true), or
    the plugin's worker not being selected."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    config = EngineArgs(model=tiny_dir, max_model_len=256).create_engine_config()
    assert config.model_config.is_diffusion is False
    assert config.parallel_config.worker_cls == "diffusiongemma_vllm.cpu_worker.DiffusionGemmaCPUWorker"
    assert config.scheduler_config.scheduler_cls == "diffusiongemma_vllm.scheduler.CanvasScheduler"
    assert config.scheduler_config.async_scheduling is False


@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_bad_passes_per_step_is_rejected_naming_the_setting(tiny_dir, value):
    """Catches a bad `additional_config` passes_per_step reaching the worker, where it would
    fail at the first step or never stop a canvas."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    with pytest.raises(ValueError, match="passes_per_step"):
        EngineArgs(model=tiny_dir, max_model_len=256,
                   additional_config={"passes_per_step": value}).create_engine_config()
