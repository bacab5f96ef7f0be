"""Tiny random checkpoints in the exact layout of `google/diffusiongemma-26B-A4B-it`.

The real weights cannot be downloaded on our machines, so tests build small copies of the
release: `config.json` in the release's field structure (`global_head_dim` and
`num_global_key_value_heads`, not transformers' `per_layer_config`), `generation_config.json`
with the release's sampler defaults, `model.safetensors` with the release's tensor names
(text stack under `model.decoder.*`, encoder `layer_scalar` duplicates, a vision tower, no
`v_proj` on full-attention layers) and a Gemma-shaped tokenizer (see `tiny_tokenizer.py`).

The weights come from transformers' own `DiffusionGemmaForBlockDiffusion`, so the tensor
names and shapes are transformers' by construction. Every 1-D weight and every
`layer_scalar` is then randomized around 1 so that no norm or scale is trivially identity.

The same builder writes an autoregressive twin (`Gemma4ForCausalLM`, the text stack of
`google/gemma-4-26B-A4B-it`) with identical backbone dimensions, for AR comparisons.

`write_release_config` writes the release itself without weights (for vLLM's
`load_format="dummy"`): `config.json` of `google/diffusiongemma-26B-A4B-it` field for field
(research/hf_reference.md s.1.2-1.4 and the ports' copies of it), or of its AR twin, with a
tokenizer padded to the full 262144-token vocabulary so that every id detokenizes.

Quantized copies in the layouts of the published FP8 and NVFP4 releases: tiny_quantized.py
(`--quantized fp8-dynamic|nvfp4|nvfp4-modelopt` here).

CLI: `python -m diffusiongemma_vllm.testing.tiny_checkpoint OUT_DIR [--seed N] [--ar-twin] [--release] [--quantized L]
[--images] ...`
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.testing.tiny_tokenizer import IMAGE_SPECIAL_IDS, save_tokenizer

# The released generation_config.json of google/diffusiongemma-26B-A4B-it.
RELEASE_IMAGE_TOKEN_IDS = (255999, 258880, 258882)  # boi, image (soft token), eoi
TINY_IMAGE_TOKEN_IDS = tuple(IMAGE_SPECIAL_IDS)  # the tiny tokenizer's
# TinySpec settings of a tiny checkpoint that serves images (`--images`; testing/tiny_images.py).
TINY_IMAGES = {"image_token_ids": TINY_IMAGE_TOKEN_IDS, "soft_tokens_per_image": 70}
RELEASE_GENERATION_CONFIG = {
    **SamplerConfig().to_generation_config(),
    "eos_token_id": [1, 106, 50],
    "max_new_tokens": 256,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class TinySpec:
    """Backbone sizes of a tiny checkpoint; the defaults run in seconds on a CPU."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 96
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    global_head_dim: int = 64
    num_global_key_value_heads: int = 1
    # Release pattern is ["sliding"]*5 + ["full"], repeated.
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention")
    sliding_window: int = 16
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 32
    max_position_embeddings: int = 4096
    canvas_length: int = 32
    vision_hidden_size: int = 16
    # The release's ids lie outside a tiny vocabulary, so a tiny checkpoint serves text only
    # unless it takes the tiny tokenizer's (TINY_IMAGE_TOKEN_IDS): then it serves images.
    image_token_ids: tuple[int, int, int] = RELEASE_IMAGE_TOKEN_IDS
    soft_tokens_per_image: int = 280
    generation: dict = field(default_factory=dict)
    answer_tokens: bool = False  # "yes" and "no" single tokens (tiny_tokenizer.ANSWER_LINES)

    def text_config(self) -> dict:
        return {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": len(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "final_logit_softcapping": 30.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "use_bidirectional_attention": "vision",
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        }

    def vision_config(self) -> dict:
        return {
            "model_type": "gemma4_vision",
            "hidden_size": self.vision_hidden_size,
            "intermediate_size": 2 * self.vision_hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": self.vision_hidden_size // 2,
            "patch_size": 4,
            "pooling_kernel_size": 2,
        }

    def release_config(self) -> dict:
        """config.json exactly as the release structures it."""
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "boi_token_id": self.image_token_ids[0],
            "eoi_token_id": self.image_token_ids[2],
            "image_token_id": self.image_token_ids[1],
            "eos_token_id": [1, 106, 50],
            "initializer_range": 0.02,
            "tie_word_embeddings": True,
            "dtype": "float32",
            "vision_soft_tokens_per_image": self.soft_tokens_per_image,
            "text_config": self.text_config(),
            "vision_config": self.vision_config(),
        }

    def generation_config(self) -> dict:
        return {**RELEASE_GENERATION_CONFIG, **self.generation}

    def ar_twin_text_config(self) -> dict:
        """Gemma 4's text config for the same backbone: the flags the release omits (every
        layer has the MoE block, full layers take V from K) set, no diffusion fields."""
        text = {**self.text_config(), "attention_k_eq_v": True, "enable_moe_block": True,
                "hidden_size_per_layer_input": 0}
        for key in ("model_type", "use_bidirectional_attention"):
            text.pop(key)
        return text


# google/diffusiongemma-26B-A4B-it's text backbone (research/hf_reference.md s.1.2).
RELEASE_SPEC = TinySpec(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 5, sliding_window=1024,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144,
    canvas_length=256)
# Its vision tower's config (s.1.3); the plugin checks and skips the tower, vLLM's dummy
# loader never builds it, but the config travels as released.
RELEASE_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "global_head_dim": 72,
    "hidden_activation": "gelu_pytorch_tanh", "patch_size": 16, "pooling_kernel_size": 3,
    "position_embedding_size": 10240, "rms_norm_eps": 1e-06, "standardize": True, "use_clipped_linears": False,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "default_output_length": 280,
}


def release_checkpoint_config(spec: TinySpec = RELEASE_SPEC) -> dict:
    """config.json of google/diffusiongemma-26B-A4B-it (bf16; `spec` defaults to its backbone)."""
    config = spec.release_config()
    return {**config, "dtype": "bfloat16", "transformers_version": "5.12.1",
            "text_config": {**config["text_config"], "dtype": "bfloat16", "initializer_range": 0.02},
            "vision_config": dict(RELEASE_VISION_CONFIG)}


def _randomize_scales(model, generator) -> None:
    """Move every 1-D weight and layer_scalar off 1 so parity tests exercise them."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        # The encoder's layer_scalar buffers duplicate the decoder's (AR twin: one stack).
        scalars = {}
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("layer_scalar"):
                layer = name.split(".layers.")[1]
                if layer not in scalars:
                    scalars[layer] = 0.6 + 0.8 * torch.rand(buf.shape, generator=generator)
                buf.copy_(scalars[layer])


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write a random DiffusionGemma checkpoint in the release layout; returns its path."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(**spec.release_config())
    model = DiffusionGemmaForBlockDiffusion(config).to(torch.float32)
    _randomize_scales(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(str(out), safe_serialization=True)
    # transformers rewrites the text config with `per_layer_config`; restore the release form.
    (out / "config.json").write_text(json.dumps(spec.release_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(spec.generation_config(), indent=2) + "\n")
    save_tokenizer(out, spec.vocab_size, spec.answer_tokens)
    return out


def build_ar_twin(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write the autoregressive Gemma 4 twin of the same backbone, text-only (`Gemma4ForCausalLM`).

    Same layers, heads, experts, window and vocabulary as the diffusion checkpoint, so both
    cost the same per token; only the generation procedure differs. Text-only because the
    multimodal Gemma 4 class needs torchvision, which the CPU setup removes."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Gemma4TextConfig(**spec.ar_twin_text_config(), architectures=["Gemma4ForCausalLM"])
    model = Gemma4ForCausalLM(config).to(torch.float32)
    _randomize_scales(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(AR_GENERATION_CONFIG, indent=2) + "\n")
    save_tokenizer(out, spec.vocab_size)
    return out


AR_GENERATION_CONFIG = {"eos_token_id": [1, 106, 50], "pad_token_id": 0, "bos_token_id": 2}


def write_release_config(out_dir: str | Path, spec: TinySpec = RELEASE_SPEC, ar_twin: bool = False) -> Path:
    """A weightless model folder of the release (or of its AR twin) for vLLM's
    `load_format="dummy"`: config.json, generation_config.json (the release's, updated by
    `spec.generation`) and a tokenizer whose vocabulary covers every id of the model."""
    from transformers import Gemma4TextConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ar_twin:
        config = Gemma4TextConfig(**spec.ar_twin_text_config(), architectures=["Gemma4ForCausalLM"]).to_dict()
        config["dtype"] = "bfloat16"
        generation = AR_GENERATION_CONFIG
    else:
        config, generation = release_checkpoint_config(spec), spec.generation_config()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(out, spec.vocab_size)
    _pad_vocabulary(out / "tokenizer.json", spec.vocab_size)
    return out


def _pad_vocabulary(path: Path, vocab_size: int) -> None:
    """Give every id the BPE training left unused a token (`<unusedN>`, never produced by
    encoding), as the real 262144-entry vocabulary does: random weights emit any id, and
    benchmarks should detokenize text, not skip unknown ids."""
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    taken = set(vocab.values()) | {token["id"] for token in tokenizer["added_tokens"]}
    vocab.update({f"<unused{i}>": i for i in range(vocab_size) if i not in taken})
    path.write_text(json.dumps(tokenizer))


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ar-twin", action="store_true", help="write the autoregressive Gemma 4 twin instead")
    parser.add_argument("--release", action="store_true",
                        help="write the release's config (26B-A4B, no weights, for load_format=dummy); "
                             "size options are ignored")
    defaults = asdict(TinySpec())
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                 "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size",
                 "canvas_length"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    parser.add_argument("--quantized", choices=("fp8-dynamic", "nvfp4", "nvfp4-modelopt"),
                        help="write the checkpoint in that quantized release's layout (tiny_quantized.py)")
    parser.add_argument("--layer-pattern", default="SF",
                        help="one letter per layer: S sliding, F full (release: SSSSSF x5)")
    parser.add_argument("--max-denoising-steps", type=int, default=RELEASE_GENERATION_CONFIG["max_denoising_steps"])
    parser.add_argument("--images", action="store_true",
                        help="serve images: the tiny tokenizer's image tokens (the release's ids lie outside a tiny "
                             "vocabulary, so a tiny checkpoint serves text only) and 70 soft tokens per image")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    kinds = {"S": "sliding_attention", "F": "full_attention"}
    sizes = {k: v for k, v in vars(args).items() if k in TinySpec.__dataclass_fields__}
    images = TINY_IMAGES if args.images else {}
    spec = TinySpec(**sizes, layer_types=tuple(kinds[c] for c in args.layer_pattern.upper()),
                    generation={"max_denoising_steps": args.max_denoising_steps}, **images)
    if args.release:
        release = replace(RELEASE_SPEC, generation=spec.generation)
        print(write_release_config(args.out_dir, release, ar_twin=args.ar_twin))
        return
    if args.quantized:
        import tempfile

        from diffusiongemma_vllm.testing.tiny_quantized import build_quantized_checkpoint

        with tempfile.TemporaryDirectory() as source:
            build_tiny_checkpoint(source, spec, seed=args.seed)
            print(build_quantized_checkpoint(source, args.out_dir, args.quantized, seed=args.seed))
        return
    build = build_ar_twin if args.ar_twin else build_tiny_checkpoint
    print(build(args.out_dir, spec, seed=args.seed))


if __name__ == "__main__":
    main()
