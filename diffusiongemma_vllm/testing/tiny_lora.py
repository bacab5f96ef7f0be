"""Tiny LoRA adapters for a tiny checkpoint, in PEFT's layout, and the checkpoint they merge into.

An adapter trained with PEFT on transformers' `DiffusionGemmaForBlockDiffusion` (the Sudoku
recipe's "all-linear" LoRA, NeMo's `diffusion_gemma_sft_lora.yaml`) is a directory holding
`adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
`base_model.model.<module>.lora_A.weight` ([rank, in]) and `...lora_B.weight` ([out, rank])
for each linear module it adapts. `build_tiny_adapter` writes one with random factors for
the attention projections and both MLPs' linears (the dense MLP's and the self-conditioning
block's) of a checkpoint. A full-attention layer has no `v_proj` (its V is its K projection),
so an adapter adapts its V through `k_proj`, as in transformers.

`merge_adapter` writes the base checkpoint with W + (alpha / rank) B A in place of each
adapted W: what transformers computes with an adapter of the one text stack applied to every
pass, the reference such a served adapter must reproduce. transformers holds the prompt-side
stack as separate modules over the same weights (`model.encoder.language_model.*`), so PEFT
on transformers trains factors of their own for them (`stacks`); `peft_applied` is the
reference for those: each module with its own factors, as PEFT applies them.
`reference_model` picks the one an adapter is served as.

CLI: `python -m diffusiongemma_vllm.testing.tiny_lora BASE_DIR OUT_DIR [--seed N] [--merged MERGED_DIR]`
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS = "adapter_model.safetensors"
DECODER_LAYERS, ENCODER_LAYERS = "model.decoder.layers.", "model.encoder.language_model.layers."


def build_tiny_adapter(base_dir: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4, alpha: int = 8,
                       scale: float = 0.15, extra: tuple[str, ...] = (),
                       stacks: tuple[str, ...] = ("decoder",)) -> Path:
    """A random adapter of `rank` over every linear module named in ADAPTED (and the modules
    named by their checkpoint names in `extra`, for adapters the server must refuse), for the
    `stacks` named: "decoder" (the text stack as the checkpoint names it) and "encoder"
    (factors of their own for transformers' encoder copy of each layer module, as PEFT on
    transformers trains them)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in sorted(load_file(str(Path(base_dir) / "model.safetensors")).items()):
        module = name.removesuffix(".weight")
        adapted = module.startswith("model.decoder.") and module.rsplit(".", 1)[-1] in ADAPTED
        if weight.dim() != 2 or not (adapted or module in extra):
            continue
        rows, cols = weight.shape
        names = [module] if "decoder" in stacks or module in extra else []
        if "encoder" in stacks and DECODER_LAYERS in module:
            names.append(module.replace(DECODER_LAYERS, ENCODER_LAYERS))
        for name in names:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) * scale
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * scale
    save_file(tensors, str(out / WEIGHTS))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted({*ADAPTED, *(m.rsplit(".", 1)[-1] for m in extra)}),
              "base_model_name_or_path": str(base_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """The base checkpoint with the adapter merged into its weights, beside its config and tokenizer."""
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    shutil.copytree(base, out, dirs_exist_ok=True)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    weights = load_file(str(base / "model.safetensors"))
    factors = load_file(str(Path(adapter_dir) / WEIGHTS))
    for name, a in factors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = factors[name.replace(".lora_A.", ".lora_B.")]
        weight = weights[f"{module}.weight"]
        weights[f"{module}.weight"] = (weight.double() + scaling * (b.double() @ a.double())).to(weight.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def peft_applied(model, adapter_dir: str | Path):
    """transformers' `model` with the adapter's factors added to each module they name, as PEFT
    applies an adapter: an encoder-copy module's own factors serve the prompt side (prefill and
    commits), a decoder module's the denoise passes. Returns the model."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    factors = load_file(str(Path(adapter_dir) / WEIGHTS))
    for name, a in factors.items():
        if name.endswith(".lora_A.weight"):
            module = model.get_submodule(name.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
            weight = module.weight  # the factors go where the module runs (a GPU reference's too)
            a, b = (t.to(weight.device, weight.dtype) for t in (a, factors[name.replace(".lora_A.", ".lora_B.")]))

            def add_delta(_, inputs, output, a=a, b=b):
                return output + scaling * torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b)

            module.register_forward_hook(add_delta)
    return model


def reference_model(base_dir: str | Path, adapter_dir: str | Path | None, merged_dir: str | Path,
                    device: str = "cpu"):
    """transformers' fp32 model with the adapter (None: none) applied as the plugin serves it:
    through `peft_applied` for an adapter with encoder-copy factors, else merged into the
    checkpoint (written to `merged_dir`), on `device`."""
    import torch
    from safetensors import safe_open
    from transformers import DiffusionGemmaForBlockDiffusion

    def load(path):
        return DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval().to(device)

    if adapter_dir is None:
        return load(base_dir)
    with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as f:
        two_stack = any(ENCODER_LAYERS in name for name in f.keys())
    return peft_applied(load(base_dir), adapter_dir) if two_stack \
        else load(merge_adapter(base_dir, adapter_dir, merged_dir))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_dir", help="a tiny checkpoint (testing/tiny_checkpoint.py)")
    parser.add_argument("out_dir", help="where the adapter is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merged", help="also write the base checkpoint with the adapter merged here")
    args = parser.parse_args(argv)
    build_tiny_adapter(args.base_dir, args.out_dir, seed=args.seed)
    if args.merged:
        merge_adapter(args.base_dir, args.out_dir, args.merged)


if __name__ == "__main__":
    main()
