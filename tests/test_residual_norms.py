"""The fused residual norms against their torch reference and against the model's own vLLM
layers, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.residual_norms import (layer_output, naive_layer_output,  # noqa: E402
                                                         naive_post_attention_norms, post_attention_norms)
from diffusiongemma_vllm.testing.standalone import load_standalone  # noqa: E402

EPS = 1e-6


def rows(tokens: int, width: int, count: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(tokens, width, generator=gen) * (1 + 3 * i)).to(dtype) for i in range(count)]


def weights(width: int, count: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    return [(1 + 0.5 * torch.randn(width, generator=gen)).to(dtype) for _ in range(count)]


def tolerance(want: torch.Tensor) -> dict:
    """fp32: summation order; bf16: one rounding step at the largest value (a norm's fp32 sum
    that rounds the other way moves a sum by an ulp of its terms, not of its result)."""
    if want.dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=1.6e-2, atol=2**-7 * float(want.float().abs().max()))


@pytest.mark.parametrize("tokens, width", [(6, 2816), (9, 64), (5, 96), (1, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_attention_norms_like_the_reference(tokens, width, dtype):
    """Catches a residual add before the norm instead of after it, a feed-forward input normed
    with the other's weight, a router input without its scale or 1/sqrt(hidden), or a hidden
    size that is no power of two (the release's 2816) read or written past its end."""
    gen = torch.Generator().manual_seed(width + tokens)
    args = (*rows(tokens, width, 2, dtype, gen), *weights(width, 4, dtype, gen))
    got = post_attention_norms(*args, EPS)
    for name, a, b in zip(("residual", "ff", "ff2", "router"), got, naive_post_attention_norms(*args, EPS)):
        assert a.dtype == dtype and a.shape == (tokens, width), name
        torch.testing.assert_close(a, b, **tolerance(b), msg=name)


@pytest.mark.parametrize("tokens, width", [(6, 2816), (9, 64), (1, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_like_the_reference(tokens, width, dtype):
    """Catches the two branch norms swapped, the outer norm or the residual skipped, or the
    layer scalar not applied."""
    gen = torch.Generator().manual_seed(width * 3 + tokens)
    scalar = torch.tensor([0.7]).to(dtype)
    args = (*rows(tokens, width, 3, dtype, gen), *weights(width, 3, dtype, gen), scalar)
    got = layer_output(*args, EPS)
    assert got.dtype == dtype
    want = naive_layer_output(*args, EPS)
    torch.testing.assert_close(got, want, **tolerance(want))


def test_empty_input_is_an_empty_result():
    """Catches a zero-size launch grid (an error in Triton)."""
    empty = torch.zeros(0, 64)
    assert post_attention_norms(empty, empty, *[torch.ones(64)] * 4, EPS)[0].shape == (0, 64)
    assert layer_output(empty, empty, empty, *[torch.ones(64)] * 3, torch.ones(1), EPS).shape == (0, 64)


@pytest.mark.parametrize("spec", ["sf", "sssf"])
def test_fused_path_matches_the_models_vllm_layers(tiny_dirs, spec):
    """Catches the CUDA path of DecoderLayer.post_attention / output drifting from the vLLM
    norms that serve on CPU and under torch.compile: a weight passed to the wrong slot, the
    eps, the router's scale, the layer scalar."""
    model = load_standalone(tiny_dirs[spec]).model
    gen = torch.Generator().manual_seed(1)
    width = model.cfg.hidden_size
    for layer in model.model.layers:
        for module in (layer.post_attention_layernorm, layer.router.scale, layer.layer_scalar):
            weight = module if isinstance(module, torch.Tensor) else module.weight
            weight.data.copy_(1 + 0.3 * torch.randn(weight.shape, generator=gen))  # trained layers' are not 1
        attn, hidden, dense, routed = rows(7, width, 4, torch.float32, gen)
        with torch.no_grad():
            want = layer.post_attention(attn, hidden, fused=False)
            got = layer.post_attention(attn, hidden, fused=True)
            for name, a, b in zip(("residual", "ff", "ff2", "router"), got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(layer.output(dense, routed, hidden, fused=True),
                                       layer.output(dense, routed, hidden, fused=False), rtol=1e-5, atol=1e-5)
