"""The release's tensor layout, checked while the weights stream into the model.

`expected_text_tensors(cfg)` lists every text tensor `google/diffusiongemma-26B-A4B-it`
stores (research/hf_reference.md section 4) with its shape. `checked_text_weights` passes
the text stack through with `model.decoder.` stripped, drops the encoder's duplicate
`layer_scalar`s and the vision tower (vision.py loads it), and raises `CheckpointError`
naming the tensor for an unexpected name, a wrong shape or dtype, or (once the stream ends,
for a `whole` checkpoint) a missing tensor, instead of the bare shape assertion or silent
zero-initialised parameter a broken file would otherwise give. A weight update after
start-up (vLLM's `reload_weights`, its weight-transfer engines, an RL trainer's
`load_weights`) brings some tensors only: each is
still checked, and none is missing; a tensor twice in one update is named (`seen` spans an
update's calls). vLLM's layer-wise reload completes a module once all its tensors arrived
(q, k and v into one qkv projection, a layer's experts, the router's two scales) and fills a
half-sent module with uninitialised memory, so `partial_modules` names the modules an update
sent only some tensors of (`receiving_module` groups the tensors by the module they load into).

Quantized checkpoints. `quantized_format(hf_config)` reads config.json's
`quantization_config` and names the format its quantized linears are stored in
(`QuantizedFormat`), or refuses, naming the field, a format the plugin does not load. The
published ones (research notes in tiny_quantized.py, which writes tiny copies of each):
- compressed-tensors FP8 (`RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic`): per quantized
  linear `weight` float8_e4m3fn [out, in] and `weight_scale` [out, 1] (channel strategy;
  one value for tensor strategy, one per block for block strategy), plus `input_scale` when
  activations are static;
- compressed-tensors NVFP4 (`RedHatAI/...-NVFP4`): `weight_packed` uint8 [out, in/2],
  `weight_scale` float8_e4m3fn [out, in/16], `weight_global_scale` and
  `input_global_scale` (one value each);
- ModelOpt NVFP4 (`nvidia/...-NVFP4`): `weight` uint8 [out, in/2], `weight_scale`
  float8_e4m3fn [out, in/16], `weight_scale_2` and `input_scale` (one value each).
Quantized experts are stored one linear per expert and projection
(`experts.{e}.{gate,up,down}_proj`), not as the fused banks. Which linears are quantized is
not re-derived from the config's targets and ignore list here: the caller passes the modules
vLLM built with a quantization method (model/diffusion_gemma.py), so this check and vLLM's loaders agree by
construction, and a scale tensor for a module the config leaves in bf16 (the tied
embedding, routers, self-conditioning, or attention in the NVFP4 releases) is an unexpected
tensor, named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from diffusiongemma_vllm.model.config import BackboneConfig, CheckpointError

TEXT_PREFIX = "model.decoder."
ENCODER_SCALAR = "model.encoder.language_model.layers."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # vision.py loads them
SCALAR = ()  # a one-value tensor: shape [] or [1]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...] | None  # None: any shape (SCALAR: one value)
    dtypes: tuple[torch.dtype, ...]

    def matches_shape(self, tensor: torch.Tensor) -> bool:
        if self.shape == SCALAR:
            return tensor.numel() == 1 and tensor.dim() <= 1
        return self.shape is None or tuple(tensor.shape) == self.shape


@dataclass(frozen=True)
class QuantizedFormat:
    """How a checkpoint stores one quantized linear of weight shape [out, in]."""

    name: str
    tensors: Callable[[int, int], dict[str, TensorSpec]]


def _fp8(weight_scale: Callable[[int, int], tuple[int, ...]], static_input: bool) -> Callable:
    def tensors(out: int, inp: int) -> dict[str, TensorSpec]:
        specs = {"weight": TensorSpec((out, inp), (torch.float8_e4m3fn,)),
                 "weight_scale": TensorSpec(weight_scale(out, inp), FLOATS)}
        if static_input:
            specs["input_scale"] = TensorSpec(SCALAR, FLOATS)
        return specs
    return tensors


def _nvfp4(weight: str, global_scales: tuple[str, ...]) -> Callable:
    def tensors(out: int, inp: int) -> dict[str, TensorSpec]:
        return {weight: TensorSpec((out, inp // 2), (torch.uint8,)),
                "weight_scale": TensorSpec((out, inp // 16), (torch.float8_e4m3fn,)),
                **{name: TensorSpec(SCALAR, (torch.float32,)) for name in global_scales}}
    return tensors


def quantized_format(hf_config) -> QuantizedFormat | None:
    """The stored format of the checkpoint's quantized linears; None for a bf16 checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    for field in ("kv_cache_scheme", "kv_cache_quant_algo"):
        if qc.get(field) or (qc.get("quantization") or {}).get(field):
            raise CheckpointError(f"config.json quantization_config.{field} is set: diffusiongemma-vllm keeps "
                                  "the KV cache in the model dtype (its denoise attention reads it so)")
    if method == "compressed-tensors":
        return _compressed_tensors_format(qc)
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")).upper()
        if algo == "NVFP4":
            return QuantizedFormat("modelopt NVFP4", _nvfp4("weight", ("weight_scale_2", "input_scale")))
        raise CheckpointError(f"config.json quantization_config.quant_algo {algo!r} (modelopt) is not a layout "
                              "diffusiongemma-vllm loads; it loads ModelOpt NVFP4")
    raise CheckpointError(f"config.json quantization_config.quant_method {method!r} is not a layout "
                          "diffusiongemma-vllm loads; it loads compressed-tensors FP8 and NVFP4 and ModelOpt NVFP4")


def _compressed_tensors_format(qc: dict) -> QuantizedFormat:
    groups = list((qc.get("config_groups") or {}).values())
    schemes = {(g.get("format") or qc.get("format"), repr(g.get("weights")), repr(g.get("input_activations")))
               for g in groups}
    if len(schemes) != 1:
        raise CheckpointError(f"config.json quantization_config.config_groups has {len(schemes)} schemes; "
                              "diffusiongemma-vllm loads checkpoints with one")
    group = groups[0]
    fmt, weights = group.get("format") or qc.get("format"), group.get("weights") or {}
    inputs = group.get("input_activations")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if fmt == "float-quantized" and bits == 8 and kind == "float" and strategy in ("channel", "tensor", "block"):
        block = weights.get("block_structure") or [1, 1]
        scale = {"channel": lambda out, inp: (out, 1), "tensor": lambda out, inp: SCALAR,
                 "block": lambda out, inp: (math.ceil(out / block[0]), math.ceil(inp / block[1]))}[strategy]
        static_input = inputs is not None and not inputs.get("dynamic")
        return QuantizedFormat(f"compressed-tensors FP8 ({strategy})", _fp8(scale, static_input))
    if fmt == "nvfp4-pack-quantized" and bits == 4 and kind == "float" and weights.get("group_size") == 16:
        scales = ("weight_global_scale",) + (("input_global_scale",) if inputs is not None else ())
        return QuantizedFormat("compressed-tensors NVFP4", _nvfp4("weight_packed", scales))
    raise CheckpointError(f"config.json quantization_config format {fmt!r} with {bits}-bit {kind} weights "
                          f"({strategy}) is not a layout diffusiongemma-vllm loads; it loads compressed-tensors "
                          "FP8 (float-quantized) and NVFP4 (nvfp4-pack-quantized)")


def expected_text_tensors(cfg: BackboneConfig, fmt: QuantizedFormat | None = None,
                          quantized: frozenset[str] = frozenset()) -> dict[str, TensorSpec]:
    """Every text tensor the checkpoint stores (names without `model.decoder.`). `quantized`
    names the linears stored in `fmt` (`layers.{i}.self_attn.q_proj`, ...; `layers.{i}.experts`
    for a layer's experts, then stored one linear per expert)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes = {
        "embed_tokens.weight": (v, h),
        "norm.weight": (h,),
        "self_conditioning.pre_norm.weight": (h,),
        "self_conditioning.gate_proj.weight": (cfg.self_conditioning_size, h),
        "self_conditioning.up_proj.weight": (cfg.self_conditioning_size, h),
        "self_conditioning.down_proj.weight": (h, cfg.self_conditioning_size),
    }
    for i, layer in enumerate(cfg.layers):
        p, d, kv = f"layers.{i}.", layer.head_dim, layer.num_kv_heads
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            p + "router.proj.weight": (cfg.num_experts, h),
            p + "router.scale": (h,),
            p + "router.per_expert_scale": (cfg.num_experts,),
            p + "experts.gate_up_proj": (cfg.num_experts, 2 * cfg.moe_intermediate_size, h),
            p + "experts.down_proj": (cfg.num_experts, h, cfg.moe_intermediate_size),
            p + "layer_scalar": (1,),
        }
        if not layer.k_eq_v:
            shapes[p + "self_attn.v_proj.weight"] = (kv * d, h)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            shapes[f"{p}{norm}.weight"] = (h,)
    specs = {name: TensorSpec(shape, FLOATS) for name, shape in shapes.items()}  # the model casts among these
    if fmt is None:
        return specs
    for module in sorted(quantized):
        if module.endswith(".experts"):
            width, inner = cfg.hidden_size, cfg.moe_intermediate_size
            del specs[module + ".gate_up_proj"], specs[module + ".down_proj"]
            for e in range(cfg.num_experts):
                for proj, (out, inp) in (("gate_proj", (inner, width)), ("up_proj", (inner, width)),
                                         ("down_proj", (width, inner))):
                    specs |= {f"{module}.{e}.{proj}.{t}": s for t, s in fmt.tensors(out, inp).items()}
        else:
            out, inp = specs.pop(module + ".weight").shape
            specs |= {f"{module}.{t}": s for t, s in fmt.tensors(out, inp).items()}
    return specs


def checked_text_weights(
    cfg: BackboneConfig, weights: Iterable[tuple[str, torch.Tensor]], fmt: QuantizedFormat | None = None,
    quantized: frozenset[str] = frozenset(), whole: bool = True, seen: set[str] | None = None,
    expected: dict[str, TensorSpec] | None = None,  # expected_text_tensors(cfg, fmt, quantized), if known
) -> Iterator[tuple[str, torch.Tensor]]:
    expected = expected_text_tensors(cfg, fmt, quantized) if expected is None else expected
    layout = f" ({fmt.name} checkpoint)" if fmt else ""
    seen = set() if seen is None else seen  # names without model.decoder., added to as they pass
    for name, tensor in weights:
        if name.startswith(VISION_PREFIXES):
            continue
        if name.startswith(ENCODER_SCALAR) and name.endswith(".layer_scalar"):
            continue
        if not name.startswith(TEXT_PREFIX) or name[len(TEXT_PREFIX):] not in expected:
            raise CheckpointError(f"checkpoint has unexpected tensor {name!r} for this config{layout}")
        short = name[len(TEXT_PREFIX):]
        spec = expected[short]
        if not spec.matches_shape(tensor):
            want = "one value" if spec.shape == SCALAR else list(spec.shape)
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, expected {want}{layout}")
        if tensor.dtype not in spec.dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
            raise CheckpointError(f"checkpoint tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                  f"expected {want}{layout}")
        if short in seen:
            raise CheckpointError(f"checkpoint tensor {name!r} appears twice{layout}")
        seen.add(short)
        yield short, tensor
    missing = sorted(set(expected) - seen) if whole else []
    if missing:
        listed = ", ".join(TEXT_PREFIX + m for m in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s){layout}: {listed}")


@dataclass
class WeightUpdate:
    """An in-place weight update in progress (model/diffusion_gemma.py `begin_update`)."""

    tensors: set[str]  # the update's tensors so far, names without model.decoder.
    in_one_load: bool  # the whole update is one load_weights call (vLLM's reload_weights)


# The checkpoint's linears that vLLM loads into one fused module (the model class's
# `packed_modules_mapping`): fused module -> the stored ones.
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_FUSED_INTO = {stored: fused for fused, parts in PACKED_MODULES.items() for stored in parts}


def receiving_module(name: str) -> str:
    """The module a checkpoint tensor (name without `model.decoder.`) loads into: its fused
    projection for q/k/v and gate/up (with their scales), `layers.{i}.experts` for every expert
    tensor, else the name without its last part."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "experts":
        return ".".join(parts[:3])
    module = parts[:-1]
    module[-1] = _FUSED_INTO.get(module[-1], module[-1])
    return ".".join(module)


def partial_modules(expected: Iterable[str], seen: set[str]) -> list[str]:
    """The modules of which `seen` (an update's tensors) holds some of the `expected` tensors
    (expected_text_tensors) but not all."""
    groups: dict[str, set[str]] = {}
    for name in expected:
        groups.setdefault(receiving_module(name), set()).add(name)
    return sorted(module for module, names in groups.items() if names & seen and not names <= seen)
