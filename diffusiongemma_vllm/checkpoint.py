"""The release's tensor layout, checked while the weights stream into the model.

`expected_text_tensors(cfg)` lists every text tensor `google/diffusiongemma-26B-A4B-it`
stores (research/hf_reference.md section 4) with its shape. `checked_text_weights` passes
the text stack through with `model.decoder.` stripped, drops the encoder's duplicate
`layer_scalar`s and the vision tower, and raises `CheckpointError` naming the tensor for an
unexpected name, a wrong shape, or (once the stream ends) a missing tensor, instead of the
bare shape assertion or silent zero-initialised parameter a broken file would otherwise give.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .config import BackboneConfig, CheckpointError

TEXT_PREFIX = "model.decoder."
ENCODER_SCALAR = "model.encoder.language_model.layers."
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def expected_text_tensors(cfg: BackboneConfig) -> dict[str, tuple[int, ...]]:
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
    return shapes


def checked_text_weights(
    cfg: BackboneConfig, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    expected = expected_text_tensors(cfg)
    seen: set[str] = set()
    for name, tensor in weights:
        if name.startswith(SKIPPED_PREFIXES):
            continue
        if name.startswith(ENCODER_SCALAR) and name.endswith(".layer_scalar"):
            continue
        if not name.startswith(TEXT_PREFIX) or name[len(TEXT_PREFIX):] not in expected:
            raise CheckpointError(f"checkpoint has unexpected tensor {name!r} for this config")
        short = name[len(TEXT_PREFIX):]
        if tuple(tensor.shape) != expected[short]:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, expected {list(expected[short])}"
            )
        seen.add(short)
        yield short, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        listed = ", ".join(TEXT_PREFIX + m for m in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {listed}")
