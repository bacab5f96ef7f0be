"""Tiny quantized checkpoints shared by the tests/test_quantized_*.py files, built once per run."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from diffusiongemma_vllm.testing.tiny_quantized import LAYOUTS, bf16_reference, build_quantized_checkpoint


@functools.cache
def quantized_dirs(tiny_dir: str) -> dict[str, str]:
    """The bf16 reference and every quantized layout of `tiny_dir` (layout name -> folder)."""
    root = Path(tempfile.mkdtemp(prefix="tiny-quantized-"))
    dirs = {"bf16": str(bf16_reference(tiny_dir, root / "bf16"))}
    for name in LAYOUTS:
        dirs[name] = str(build_quantized_checkpoint(tiny_dir, root / name, name))
    return dirs


def plugin_quantized_modules(layout: str, cfg) -> frozenset[str]:
    """What model.stored_quantized_modules() reports for a checkpoint of `layout`, from the
    recipe's own rule (used where vLLM cannot build the quantized model on this CPU)."""
    rule = LAYOUTS[layout]
    names = set()
    for i, layer in enumerate(cfg.layers):
        attn = ["q_proj", "k_proj", "o_proj"] + ([] if layer.k_eq_v else ["v_proj"])
        for module in [f"self_attn.{n}" for n in attn] + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            if rule.quantizes(f"model.decoder.layers.{i}.{module}"):
                names.add(f"layers.{i}.{module}")
        if rule.quantizes(f"model.decoder.layers.{i}.experts.0.gate_proj"):
            names.add(f"layers.{i}.experts")
    return frozenset(names)
