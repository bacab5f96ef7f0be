"""Random weights that route like a trained model's, for benchmarks with `load_format="dummy"`.

vLLM's dummy loader draws every parameter and persistent buffer from U(-1e-3, 1e-3). Gemma 4's
per-layer output scalar (`layer_scalar`, 1 before loading) then multiplies the residual by the
same ~1e-3 at every layer: from the third layer on every token of a batch routes to the same
experts, and the logits are 0. A benchmark would then time an MoE that reads 8 of its 128
experts per layer, whatever the batch. The plugin's model marks its scalars for vLLM's loader
(`dummy_weight_value`); vLLM's own Gemma 4 models (the autoregressive baseline and the in-tree
DiffusionGemma) get `UnitLayerScalars` as a worker extension (`worker_extension_cls`), and the
benchmark calls its RPC once the engine is up, before any timed request.
"""

from __future__ import annotations

import torch

WORKER_EXTENSION = "diffusiongemma_vllm.testing.dummy_weights.UnitLayerScalars"


class UnitLayerScalars:
    """Mixed into vLLM's worker class by `worker_extension_cls`."""

    def unit_layer_scalars(self) -> int:
        """Set every `layer_scalar` buffer of the model to 1, in place (captured CUDA graphs
        keep reading the same memory); the number set."""
        scalars = [module.layer_scalar for module in self.model_runner.get_model().modules()
                   if isinstance(getattr(module, "layer_scalar", None), torch.Tensor)]
        for scalar in scalars:
            scalar.fill_(1.0)
        return len(scalars)
