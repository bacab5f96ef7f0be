"""Tiny checkpoints in the layouts of the released quantized DiffusionGemma checkpoints.

`build_quantized_checkpoint(src, out, layout)` turns a tiny checkpoint written by
`tiny_checkpoint.build_tiny_checkpoint` into a copy laid out like one of the quantized
releases, with the same `quantization_config`, tensor names, scale tensors and dtypes:

| layout | release (`.../diffusiongemma-26B-A4B-it-*`) | format | quantized modules |
|---|---|---|---|
| `fp8-dynamic` | `RedHatAI/...-FP8-dynamic` | compressed-tensors FP8_DYNAMIC | attention, dense MLP, experts |
| `nvfp4` | `RedHatAI/...-NVFP4` | compressed-tensors NVFP4 | dense MLP, experts |
| `nvfp4-modelopt` | `nvidia/...-NVFP4` | ModelOpt NVFP4 (`quant_method: modelopt`) | experts |

Sources (research notes, not downloads; none of these weights are on our machines):
- The RedHatAI model cards publish their LLM Compressor recipes: `targets="Linear"`, scheme
  `FP8_DYNAMIC` / `NVFP4`, ignore `["lm_head", "re:.*embed.*", "re:.*router",
  "re:.*vision_tower.*", "re:.*self_conditioning.*"]` (NVFP4 adds `"re:.*self_attn"`), and
  `CalibrationDiffusionGemmaTextExperts`, which linearises the fused expert tensors into one
  `nn.Linear` per expert and projection, so the files store `experts.{e}.{gate,up,down}_proj`.
- A public safetensors-header audit of the three repositories (tensor counts 24,232 for the
  FP8 file and 47,067 for the NVFP4 one) fits exactly: per-expert linears, 2 tensors per
  FP8 linear (`weight`, `weight_scale`), 4 per NVFP4 expert linear (`weight`,
  `weight_scale`, `weight_scale_2`, `input_scale`), BF16 self-conditioning in both, and a
  255-entry FP8 ignore list (lm_head, the decoder's and the encoder's 30 routers each, 189
  vision linears, the two vision embedders, the 3 self-conditioning projections).
- compressed-tensors 0.17 (installed beside vLLM) for the config's field set, the scale
  maths (`calculate_qparams`, `generate_gparam`) and FP4 packing; vLLM's compressed-tensors
  and ModelOpt loaders for which tensors each scheme loads.

Assumptions where no public file says more (each changes only a dtype or a shape of 1):
- FP8 `weight_scale` is stored in the weights' dtype (BF16, compressed-tensors' default when
  `scale_dtype` is null), shape `[out, 1]`; activations are dynamic, so no `input_scale`.
- compressed-tensors NVFP4 stores `weight_global_scale` and `input_global_scale` as float32
  `[1]`; gate and up of one expert (or MLP) share their global scales (LLM Compressor fuses
  them, vLLM warns when they differ). ModelOpt stores the reciprocal convention:
  `weight_scale_2 = 1 / global scale` and `input_scale` as float32 scalars of shape `[]`.
- ModelOpt's config.json block is the compressed-tensors-style form ModelOpt writes
  (`quant_method: modelopt`, `quant_algo: NVFP4`, wildcard `ignore`), with the ignore list
  the audit names: lm_head, embed_vision, `*mlp*`, `*router*`, `*self_attn*`,
  `*self_conditioning*`, `*vision_tower*`.
- Activation scales are calibrated as LLM Compressor's calibration module does (every token
  through every expert): the amax of each quantized linear's input over encoder and decoder
  passes of random token ids.
Tensors the layouts leave unquantized are cast to BF16 and config.json says `bfloat16`, as in
the releases; `bf16_reference(src, out)` writes the same checkpoint without quantization, the
baseline that parity is measured against, and `dequantized_checkpoint(src, out)` turns a
quantized copy back into the bf16 release layout with its rounded weights (what the
quantized model computes with its weights alone, for the parity check's CPU rehearsal).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_GROUP = 16


@dataclass(frozen=True)
class QuantizedLayout:
    name: str
    release: str
    scheme: str  # "fp8-channel", "nvfp4", "nvfp4-modelopt"
    ignore: tuple[str, ...]  # the recipe's patterns: `re:` regexes (re.match) or fnmatch wildcards

    def quantizes(self, module: str) -> bool:
        """Whether the recipe quantizes this Linear module (an HF module name)."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return False
            elif module == pattern or fnmatch(module, pattern):
                return False
        return True


_CT_IGNORE = ("lm_head", "re:.*embed.*", "re:.*router", "re:.*vision_tower.*", "re:.*self_conditioning.*")
LAYOUTS = {
    "fp8-dynamic": QuantizedLayout("fp8-dynamic", "RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic",
                                   "fp8-channel", _CT_IGNORE),
    "nvfp4": QuantizedLayout("nvfp4", "RedHatAI/diffusiongemma-26B-A4B-it-NVFP4", "nvfp4",
                             _CT_IGNORE + ("re:.*self_attn",)),
    "nvfp4-modelopt": QuantizedLayout(
        "nvfp4-modelopt", "nvidia/diffusiongemma-26B-A4B-it-NVFP4", "nvfp4-modelopt",
        ("lm_head", "model.encoder.embed_vision*", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*",
         "*vision_tower*")),
}


def linear_modules(weights: list[str]) -> list[str]:
    """Every nn.Linear of the HF model after expert linearisation, as LLM Compressor walks them,
    from the names of the stored 2-D `.weight`s (one per expert and projection once
    linearised), plus the modules that exist but store nothing (`lm_head` and the encoder's
    copies of the text stack are tied)."""
    names = [n[: -len(".weight")] for n in weights if "embed_tokens" not in n]
    text = [n for n in names if n.startswith("model.decoder.layers.")]
    names += [n.replace("model.decoder.", "model.encoder.language_model.", 1) for n in text]
    return ["lm_head", *names]


def release_quantization_config(layout: str) -> dict:
    """The `quantization_config` of the named release at google/diffusiongemma-26B-A4B-it's
    shapes (30 layers, 128 experts, the 27-layer vision tower): for vLLM's dummy weights at
    the release shapes, where no tensor is read but every layer's method must match."""
    from compressed_tensors import __version__ as ct_version

    from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_SPEC, RELEASE_VISION_CONFIG

    spec, weights = LAYOUTS[layout], []
    for i, kind in enumerate(RELEASE_SPEC.layer_types):
        p = f"model.decoder.layers.{i}."
        attn = ("q", "k", "o") if kind == "full_attention" else ("q", "k", "v", "o")
        weights += [f"{p}self_attn.{a}_proj.weight" for a in attn] + [p + "router.proj.weight"]
        weights += [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        weights += [f"{p}experts.{e}.{m}_proj.weight" for e in range(RELEASE_SPEC.num_experts)
                    for m in ("gate", "up", "down")]
    weights += [f"model.decoder.self_conditioning.{m}_proj.weight" for m in ("gate", "up", "down")]
    vision = "model.encoder.vision_tower."
    for i in range(RELEASE_VISION_CONFIG["num_hidden_layers"]):
        weights += [f"{vision}encoder.layers.{i}.self_attn.{a}_proj.linear.weight" for a in "qkvo"]
        weights += [f"{vision}encoder.layers.{i}.mlp.{m}_proj.linear.weight" for m in ("gate", "up", "down")]
    weights += [vision + "patch_embedder.input_proj.weight", "model.encoder.embed_vision.embedding_projection.weight"]
    if spec.scheme == "nvfp4-modelopt":
        return _modelopt_config(spec)
    return _compressed_tensors_config(spec, [m for m in linear_modules(weights) if not spec.quantizes(m)], ct_version)


def build_quantized_checkpoint(src: str | Path, out: str | Path, layout: str, seed: int = 0) -> Path:
    """Write `src` (a tiny checkpoint) in the layout of the named quantized release."""
    from compressed_tensors import __version__ as ct_version

    spec = LAYOUTS[layout]
    src, out = Path(src), Path(out)
    tensors, config = _bf16_copy(src, out)
    text = config["text_config"]
    tensors = _linearise_experts(tensors, len(text["layer_types"]))
    amax = _calibrate(src, spec, seed) if spec.scheme != "fp8-channel" else {}
    modules = linear_modules([n for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2])
    quantized = [m for m in modules if m + ".weight" in tensors and spec.quantizes(m)]
    global_scales = _nvfp4_global_scales(tensors, quantized) if spec.scheme != "fp8-channel" else {}
    for module in quantized:
        tensors |= _QUANTIZERS[spec.scheme](module, tensors.pop(module + ".weight"), amax, global_scales.get(module))
    if spec.scheme == "nvfp4-modelopt":
        config["quantization_config"] = _modelopt_config(spec)
    else:
        ignored = [m for m in modules if not spec.quantizes(m)]
        config["quantization_config"] = _compressed_tensors_config(spec, ignored, ct_version)
    _write(out, tensors, config)
    return out


def bf16_reference(src: str | Path, out: str | Path) -> Path:
    """The same tiny checkpoint cast to BF16 (the dtype of the unquantized release)."""
    tensors, config = _bf16_copy(Path(src), Path(out))
    _write(Path(out), tensors, config)
    return Path(out)


def dequantized_checkpoint(src: str | Path, out: str | Path) -> Path:
    """A quantized tiny checkpoint back in the bf16 release layout (fused expert banks, no
    quantization_config), each quantized weight replaced by its dequantised value."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    src, out = Path(src), Path(out)
    tensors, config = _bf16_copy(src, out)
    config.pop("quantization_config")
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        module, scale = name[: -len(".weight_scale")], tensors.pop(name).float()
        if module + ".weight_packed" in tensors or tensors[module + ".weight"].dtype == torch.uint8:
            packed = tensors.pop(module + ".weight_packed", None)
            if packed is None:
                packed, second = tensors.pop(module + ".weight"), tensors.pop(module + ".weight_scale_2").float()
                tensors.pop(module + ".input_scale")
            else:
                second = 1.0 / tensors.pop(module + ".weight_global_scale").float()
                tensors.pop(module + ".input_global_scale", None)
            values = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)
            weight = values.unflatten(1, (-1, NVFP4_GROUP)) * (scale * second).unsqueeze(-1)
            tensors[module + ".weight"] = weight.flatten(1).to(torch.bfloat16)
        else:
            tensors[module + ".weight"] = (tensors[module + ".weight"].float() * scale).to(torch.bfloat16)
    for bank in sorted({n.split(".experts.")[0] for n in tensors if ".experts." in n}):
        count = 1 + max(int(n.split(".experts.")[1].split(".")[0]) for n in tensors if n.startswith(bank + ".experts."))
        per = {proj: torch.stack([tensors.pop(f"{bank}.experts.{e}.{proj}.weight") for e in range(count)])
               for proj in ("gate_proj", "up_proj", "down_proj")}
        tensors[bank + ".experts.gate_up_proj"] = torch.cat([per["gate_proj"], per["up_proj"]], dim=1)
        tensors[bank + ".experts.down_proj"] = per["down_proj"]
    _write(out, tensors, config)
    return out


def _bf16_copy(src: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name not in ("model.safetensors", "config.json") and path.is_file():
            shutil.copy(path, out / path.name)
    tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() else t
               for n, t in load_file(src / "model.safetensors").items()}
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    return tensors, config


def _write(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in sorted(tensors.items())}, out / "model.safetensors",
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _linearise_experts(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """experts.gate_up_proj [E, 2I, H] (gate rows first) and experts.down_proj [E, H, I] become
    one [out, in] weight per expert and projection, as the calibration module stores them."""
    for i in range(num_layers):
        p = f"model.decoder.layers.{i}.experts."
        gate_up, down = tensors.pop(p + "gate_up_proj"), tensors.pop(p + "down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(gate_up.shape[0]):
            tensors[f"{p}{e}.gate_proj.weight"] = gate[e].clone()
            tensors[f"{p}{e}.up_proj.weight"] = up[e].clone()
            tensors[f"{p}{e}.down_proj.weight"] = down[e].clone()
    return tensors


def _quantize_fp8_channel(module, weight, amax, global_scale):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    scale, zero = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), args)
    q = quantize(weight, scale, zero, args, dtype=torch.float8_e4m3fn)
    return {module + ".weight": q, module + ".weight_scale": scale.to(weight.dtype)}


def _nvfp4_global_scales(tensors: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """Each weight's NVFP4 global scale (FP8_MAX * FP4_MAX / amax); gate and up of one MLP or
    expert share the smaller one (LLM Compressor's fused-layer rule: vLLM runs them as one
    GEMM and warns when they differ)."""
    from compressed_tensors.quantization.utils import generate_gparam

    scales = {m: generate_gparam(tensors[m + ".weight"].float().amin(), tensors[m + ".weight"].float().amax())
              for m in modules}
    for gate in [m for m in modules if m.endswith(".gate_proj")]:
        up = gate[: -len("gate_proj")] + "up_proj"
        if up in scales:
            scales[gate] = scales[up] = torch.minimum(scales[gate], scales[up])
    return scales


def _nvfp4_parts(weight: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' NVFP4 weight quantisation: (packed uint8 [out, in/2], fp8 group scales)."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    w = weight.float()
    groups = w.unflatten(1, (-1, NVFP4_GROUP))
    scale, zero = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args, global_scale=global_scale)
    q = quantize(w, scale, zero, args, global_scale=global_scale)
    return pack_fp4_to_uint8(q), scale.to(torch.float8_e4m3fn)


def _input_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.tensor([FP8_MAX * FP4_MAX], dtype=torch.float32) / amax.float().clamp(min=1e-12).reshape(1)


def _quantize_nvfp4(module, weight, amax, global_scale):
    packed, scale = _nvfp4_parts(weight, global_scale)
    return {module + ".weight_packed": packed, module + ".weight_scale": scale,
            module + ".weight_global_scale": global_scale.clone(),
            module + ".input_global_scale": _input_global_scale(amax[module])}


def _quantize_nvfp4_modelopt(module, weight, amax, global_scale):
    packed, scale = _nvfp4_parts(weight, global_scale)
    return {module + ".weight": packed, module + ".weight_scale": scale,
            module + ".weight_scale_2": (1.0 / global_scale).reshape(()),
            module + ".input_scale": (1.0 / _input_global_scale(amax[module])).reshape(())}


_QUANTIZERS = {"fp8-channel": _quantize_fp8_channel, "nvfp4": _quantize_nvfp4,
               "nvfp4-modelopt": _quantize_nvfp4_modelopt}


@torch.no_grad()
def _calibrate(src: Path, spec: QuantizedLayout, seed: int) -> dict[str, torch.Tensor]:
    """Input amax of every quantized linear of the text stack, every token through every
    expert, over one encoder (prefill) and one decoder (denoise) pass of random ids."""
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(src), dtype=torch.float32).eval()
    text = model.config.text_config
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        value = x.detach().abs().amax().float()
        amax[name] = torch.maximum(amax[name], value) if name in amax else value

    hooks = []
    for stack in (model.model.decoder.layers, model.model.encoder.language_model.layers):
        for i, layer in enumerate(stack):
            p = f"model.decoder.layers.{i}."
            for proj in ("gate_proj", "up_proj", "down_proj"):
                hooks.append(getattr(layer.mlp, proj).register_forward_pre_hook(
                    lambda mod, args, name=p + "mlp." + proj: record(name, args[0])))
            hooks.append(layer.experts.register_forward_pre_hook(
                lambda mod, args, p=p: _record_experts(mod, args[0], p, record)))
    gen = torch.Generator().manual_seed(seed)
    canvas = model.config.canvas_length
    ids = torch.randint(0, text.vocab_size, (2, 3 * canvas), generator=gen)
    cache = DynamicCache(config=text)
    model.model.encoder(input_ids=ids, past_key_values=cache, use_cache=True)
    model(past_key_values=cache, decoder_input_ids=torch.randint(0, text.vocab_size, (2, canvas), generator=gen))
    for hook in hooks:
        hook.remove()
    return amax


def _record_experts(experts, hidden: torch.Tensor, prefix: str, record) -> None:
    x = hidden.reshape(-1, hidden.shape[-1])
    for e in range(experts.gate_up_proj.shape[0]):
        for proj in ("gate_proj", "up_proj"):
            record(f"{prefix}experts.{e}.{proj}", x)
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        record(f"{prefix}experts.{e}.down_proj", experts.act_fn(gate) * up)


def _compressed_tensors_config(spec: QuantizedLayout, ignored: list[str], version: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    fp8 = spec.scheme == "fp8-channel"
    preset, fmt = ("FP8_DYNAMIC", "float-quantized") if fp8 else ("NVFP4", "nvfp4-pack-quantized")
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = fmt
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignored,
                                quantization_status="compressed").model_dump(mode="json")
    return {**config, "sparsity_config": {}, "transform_config": {}, "version": version}


def _modelopt_config(spec: QuantizedLayout) -> dict:
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP}
    return {"config_groups": {"group_0": {"input_activations": dict(fp4), "weights": dict(fp4),
                                          "targets": ["Linear"]}},
            "ignore": list(spec.ignore), "quant_algo": "NVFP4", "kv_cache_scheme": None,
            "producer": {"name": "modelopt", "version": "0.37.0"}, "quant_method": "modelopt"}
