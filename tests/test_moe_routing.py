"""The fused routing kernel against its torch reference, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.moe_routing import BLOCK_T, moe_routing, naive_moe_routing  # noqa: E402


def router_inputs(tokens: int, experts: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, experts, generator=gen) * 4).to(dtype)
    scale = (0.5 + torch.rand(experts, generator=gen)).to(dtype)
    return logits, scale


@pytest.mark.parametrize("tokens, experts, top_k", [
    (256, 128, 8),  # one release canvas
    (1, 128, 8),
    (BLOCK_T + 3, 128, 8),  # a partial last block
    (37, 16, 3),  # the tiny checkpoints' shapes: top-k not a power of two
    (20, 5, 2),  # experts not a power of two
    (9, 8, 8),  # every expert picked
    (5, 128, 1),
])
def test_kernel_routes_like_the_reference(tokens, experts, top_k):
    """Catches a CUDA routing that picks other experts, orders them differently, or weighs
    them otherwise than the torch routing the CPU engine and the reference replay use (a
    softmax over the top k only, a missing renormalisation or per-expert scale, a padded
    expert column picked, a partial last block of tokens mixed up)."""
    logits, scale = router_inputs(tokens, experts, seed=tokens + experts)
    want_weights, want_ids = naive_moe_routing(logits, scale, top_k)
    weights, ids = moe_routing(logits, scale, top_k)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=1e-7)


def test_kernel_reads_a_strided_logits_view_and_a_bf16_scale():
    """Catches a kernel assuming contiguous rows (a router output sliced from a wider buffer)
    or fp32 scales (the release's per_expert_scale is bf16)."""
    wide, scale = router_inputs(40, 160, seed=3)
    logits = wide[:, :128]
    scale = scale[:128].bfloat16().contiguous()
    want_weights, want_ids = naive_moe_routing(logits, scale, 8)
    weights, ids = moe_routing(logits, scale, 8)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=1e-7)


def test_equal_logits_pick_the_lower_expert_first():
    """Catches an undefined choice among equal logits (the kernel documents lowest index first)."""
    logits = torch.zeros(3, 8)
    logits[:, 5] = 1.0
    weights, ids = moe_routing(logits, torch.ones(8), 3)
    assert ids.tolist() == [[5, 0, 1]] * 3
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_nan_logits_still_pick_distinct_real_experts():
    """Catches NaN router logits (a broken activation upstream) turning into expert ids past
    the last expert, which the fused MoE would index out of bounds."""
    logits, scale = router_inputs(3, 6, seed=5)
    logits[0] = float("nan")
    logits[1, 2] = float("nan")
    weights, ids = moe_routing(logits, scale, 4)
    assert int(ids.min()) >= 0 and int(ids.max()) < 6
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert 2 not in ids[1].tolist() and torch.isfinite(weights[1:]).all()


def test_no_tokens_is_an_empty_result():
    """Catches a zero-size launch grid (an error in Triton), e.g. an empty chunk."""
    weights, ids = moe_routing(torch.zeros(0, 128), torch.ones(128), 8)
    assert weights.shape == ids.shape == (0, 8)
