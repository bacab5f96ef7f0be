"""Random weights (`load_format="dummy"`) that route like a model's, in the plugin's engine and
in vLLM's autoregressive Gemma 4 (testing/dummy_weights.py).

vLLM's dummy loader draws every tensor, Gemma 4's per-layer output scalar included, from
U(-1e-3, 1e-3). The residual then shrinks ~1000x per layer: every token routes to the same
experts and the logits are 0, so a release-shape benchmark with dummy weights would time an
MoE that reads 8 of its 128 experts per layer (and the plugin would commit token 0 everywhere).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from diffusiongemma_vllm.testing.dummy_weights import WORKER_EXTENSION
from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, write_release_config

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def rpc_functions(monkeypatch):
    """collective_rpc runs `layer_scalars` (a function, pickled) in the workers."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

SPEC = TinySpec(layer_types=("sliding_attention",) * 3 + ("full_attention",), canvas_length=32)


def layer_scalars(worker) -> list[float]:
    return [float(m.layer_scalar) for m in worker.model_runner.get_model().modules() if hasattr(m, "layer_scalar")]


def test_plugin_model_keeps_unit_layer_scalars_under_dummy_weights(tmp_path):
    """Catches the plugin's model taking vLLM's U(-1e-3, 1e-3) draw for its layer scalars under
    dummy weights: every canvas would route to the same experts and commit token 0."""
    from vllm import LLM, SamplingParams

    model = write_release_config(tmp_path / "plugin", replace(SPEC, generation={"max_denoising_steps": 2}))
    llm = LLM(model=str(model), load_format="dummy", dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    try:
        assert llm.collective_rpc(layer_scalars)[0] == [1.0] * len(SPEC.layer_types)
        tokens = llm.generate(["Write a story"], SamplingParams(max_tokens=32, ignore_eos=True, seed=0),
                              use_tqdm=False)[0].outputs[0].token_ids
        assert len(set(tokens)) > 4, tokens  # collapsed logits give the same id everywhere
    finally:
        del llm


def test_worker_extension_sets_vllms_gemma4_layer_scalars_to_one(tmp_path):
    """Catches the benchmarks' autoregressive baseline (vLLM's own Gemma 4, also the backbone of
    vLLM's in-tree DiffusionGemma) timed with collapsed routing: its scalars are vLLM's draw
    until the extension's RPC sets them, in place, to 1."""
    from vllm import LLM

    model = write_release_config(tmp_path / "ar", SPEC, ar_twin=True)
    llm = LLM(model=str(model), load_format="dummy", dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              worker_extension_cls=WORKER_EXTENSION)
    try:
        before = llm.collective_rpc(layer_scalars)[0]
        assert len(before) == len(SPEC.layer_types) and all(abs(s) <= 1e-3 for s in before), before
        assert llm.collective_rpc("unit_layer_scalars") == [len(SPEC.layer_types)]
        assert llm.collective_rpc(layer_scalars)[0] == [1.0] * len(SPEC.layer_types)
    finally:
        del llm
