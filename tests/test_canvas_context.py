"""The phase of a forward pass travels in vLLM's forward context (canvas_context.py)."""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context

from diffusiongemma_vllm.model.canvas_context import CanvasPass, canvas_forward_context, canvas_pass_for


def spec() -> CanvasPass:
    return CanvasPass(torch.tensor([3]), 4, prefix=lambda name: None)


def test_canvas_pass_reaches_only_the_named_layers_and_only_inside():
    """Catches a phase that leaks past its pass (the next vLLM prefill would run as a canvas
    pass and never write KV) or reaches layers it was not meant for."""
    config = VllmConfig()
    pass_spec = spec()
    assert canvas_pass_for("layers.0.attn") is None  # no forward at all
    with set_current_vllm_config(config):
        with canvas_forward_context(pass_spec, config, ["layers.0.attn", "layers.1.attn"]):
            assert canvas_pass_for("layers.1.attn") is pass_spec
            assert canvas_pass_for("layers.2.attn") is None
        assert canvas_pass_for("layers.0.attn") is None


def test_vllm_forwards_are_prefill():
    """Catches vLLM's own forwards (profiling with no metadata, or a backend's per-layer
    metadata) being mistaken for canvas passes."""
    config = VllmConfig()
    with set_current_vllm_config(config):
        with set_forward_context(None, config):
            assert canvas_pass_for("layers.0.attn") is None
        with set_forward_context({"layers.0.attn": object()}, config):
            assert canvas_pass_for("layers.0.attn") is None
