"""The fused per-head norms and RoPE against its torch reference and against the model's own
vLLM layers, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.qkv_norm_rope import naive_qkv_norm_rope, qkv_norm_rope  # noqa: E402
from diffusiongemma_vllm.testing.standalone import load_standalone  # noqa: E402


def inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int, pad: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width + pad, generator=gen) * 3).to(dtype)[:, :width]
    positions = torch.randint(0, 1000, (tokens,), generator=gen)
    weights = [(1 + 0.5 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2)]
    angles = torch.rand(1000, head_dim // 2, generator=gen) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
    return qkv, positions, *weights, cos_sin


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [
    (7, 4, 2, 32),
    (5, 16, 8, 256),  # the release's sliding layers
    (3, 16, 2, 512),  # and its full layers
    (4, 2, 2, 16),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_normalises_and_rotates_like_the_reference(tokens, heads, kv_heads, head_dim, dtype):
    """Catches a head read from or written to another slot, a norm over the wrong width, a
    missing or swapped q/k weight, a value head that gets a weight or a rotation, or sin and
    cos halves read the wrong way round."""
    args = inputs(tokens, heads, kv_heads, head_dim, dtype, seed=head_dim + tokens)
    want = naive_qkv_norm_rope(*args, heads, kv_heads, head_dim, 1e-6)
    got = qkv_norm_rope(*args, heads, kv_heads, head_dim, 1e-6)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for name, a, b in zip("qkv", got, want):
        assert a.is_contiguous() and a.dtype == dtype, name
        torch.testing.assert_close(a, b, **tolerance, msg=name)


def test_kernel_reads_rows_of_a_wider_buffer():
    """Catches a kernel that assumes the projection's output rows are exactly one QKV wide."""
    args = inputs(6, 4, 2, 32, torch.float32, seed=1, pad=48)
    assert not args[0].is_contiguous()
    for a, b in zip(qkv_norm_rope(*args, 4, 2, 32, 1e-6), naive_qkv_norm_rope(*args, 4, 2, 32, 1e-6)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["sf", "sssf"])
def test_fused_path_matches_the_models_vllm_layers(tiny_dirs, spec):
    """Catches the CUDA path of DiffusionGemmaAttention.norm_and_rotate drifting from the
    vLLM layers that serve on CPU and under torch.compile: the eps, the weights or the cache
    the fused call passes, and RoPE as vLLM builds it for both layer kinds (the full layers'
    "proportional" RoPE rotates a quarter of each head and leaves the rest). Also that
    `fused_kernels(False)`, the pass profile's "before", turns every fused path off and back."""
    model = load_standalone(tiny_dirs[spec]).model
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.fusable_norm_rope
        kinds.add(attn.sliding_window is not None)
        width = attn.q_size + 2 * attn.kv_size
        qkv = torch.randn(9, width, generator=gen)
        positions = torch.randint(0, 300, (9,), generator=gen)
        with torch.no_grad():
            want = attn.norm_and_rotate(positions, qkv, fused=False)
            got = attn.norm_and_rotate(positions, qkv, fused=True)
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert kinds == {True, False}
    switched = [module for layer in model.model.layers for module in (layer, layer.router, layer.self_attn)]
    with model.fused_kernels(False):
        assert not any(m.use_fused_kernel for m in switched)
    assert all(m.use_fused_kernel for m in switched)
