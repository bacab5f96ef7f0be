"""The Triton paged canvas attention against the pure-torch reference, on CPU (TRITON_INTERPRET=1).

The caches are paged through a shuffled block table; every cache cell the kernel must not
read (unused blocks, prefix positions older than the sliding window, stale table entries
past the window) holds NaN, so a stray read poisons the output.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.canvas_attention import naive_canvas_attention  # noqa: E402
from diffusiongemma_vllm.kernels.paged_canvas_attention import paged_canvas_attention  # noqa: E402

BLOCK_SIZE = 8


def make_case(contexts, canvas, heads, kv_heads, head_dim, window, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(contexts)
    per_request = [-(-(c + canvas) // BLOCK_SIZE) for c in contexts]
    num_blocks = sum(per_request) + 3
    key_cache = torch.full((num_blocks, BLOCK_SIZE, kv_heads, head_dim), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays all-NaN
    table = torch.zeros(n, max(per_request), dtype=torch.int32)
    prefix_k, prefix_v, lens = [], [], []
    used = 0
    for r, context in enumerate(contexts):
        table[r, :per_request[r]] = order[used:used + per_request[r]].int()
        used += per_request[r]
        start = 0 if window is None else max(0, context - (window - 1))
        k = torch.randn(context - start, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(context - start, kv_heads, head_dim, generator=gen).to(dtype)
        positions = torch.arange(start, context)
        blocks = table[r, positions // BLOCK_SIZE].long()
        key_cache[blocks, positions % BLOCK_SIZE] = k
        value_cache[blocks, positions % BLOCK_SIZE] = v
        if window is not None:  # blocks wholly before the window were freed: stale ids -> NaN block
            table[r, : start // BLOCK_SIZE] = 0
        prefix_k.append(k)
        prefix_v.append(v)
        lens.append(context - start)
    width = max(1, max(lens))
    pad = lambda rows: torch.stack([torch.cat([x, x.new_zeros(width - len(x), *x.shape[1:])]) for x in rows])  # noqa: E731
    q = torch.randn(n, canvas, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(n, canvas, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, canvas, kv_heads, head_dim, generator=gen).to(dtype)
    dense = (pad(prefix_k), pad(prefix_v), torch.tensor(lens))
    return q, k, v, key_cache, value_cache, table, torch.tensor(contexts, dtype=torch.int32), dense


@pytest.mark.parametrize("contexts, canvas, heads, kv_heads, head_dim, window", [
    ((5, 37, 0), 7, 4, 2, 32, 16),  # sliding, GQA 2:1, an empty prefix, odd canvas
    ((29, 64), 20, 4, 1, 64, None),  # full layer, GQA 4:1, canvas spanning two query blocks
    ((3, 50), 16, 2, 2, 32, 11),  # odd window, no GQA
    ((40,), 9, 2, 1, 256, 16),  # the release's sliding head dim
    ((33,), 5, 2, 1, 512, None),  # the release's full-layer head dim
])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(contexts, canvas, heads, kv_heads, head_dim, window, causal):
    """Catches wrong paging (block table, in-block offsets), a wrong window edge, GQA mapping,
    the causal canvas mask of a commit, and reads of cells the kernel must never touch."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case(contexts, canvas, heads, kv_heads, head_dim, window,
                                                            torch.float32)
    got = paged_canvas_attention(q, k, v, kc, vc, table, ctx, window, causal)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, window, causal)
    assert torch.isfinite(got).all()
    # fp32 with a different summation order; at head_dim 512 random scores reach ~25, so
    # outputs differ by up to ~1.2e-5 (measured).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_bf16_and_strided_cache_views():
    """Catches a kernel that assumes a contiguous cache: vLLM hands over permuted views."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((21, 9), 12, 4, 2, 32, 16, torch.bfloat16)
    # Store the caches head-major ([blocks, heads, block_size, dim]) and view them back.
    kc_strided = kc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    vc_strided = vc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    got = paged_canvas_attention(q, k, v, kc_strided, vc_strided, table, ctx, 16, False)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, 16, False)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
