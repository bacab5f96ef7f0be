"""The Triton paged canvas attention against the pure-torch reference, on CPU in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1).

The caches are paged through a shuffled block table; every cache cell the kernel must not
read (unused blocks, prefix positions older than the sliding window, stale table entries
past the window) holds NaN, so a stray read poisons the output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.canvas_context import CanvasPass, PagedPrefix  # noqa: E402
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


def test_block_table_in_larger_blocks_than_the_cache():
    """Catches a kernel that assumes vLLM's scheduler blocks equal the attention kernel's blocks."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((30, 45), 10, 2, 1, 32, 16, torch.float32, seed=3)
    # Re-express the table in blocks of 2 * BLOCK_SIZE: relocate each pair of cache blocks
    # to two adjacent blocks of a fresh cache, as vLLM lays scheduler blocks out.
    pairs = table.shape[1] // 2 + 1
    big_kc = torch.full((2 * pairs * len(ctx) + 2, BLOCK_SIZE, *kc.shape[2:]), float("nan"))
    big_vc = big_kc.clone()
    big_table = torch.zeros(len(ctx), pairs, dtype=torch.int32)
    for r in range(len(ctx)):
        for j in range(pairs):
            big = 1 + r * pairs + j
            big_table[r, j] = big
            for half in range(2):
                if 2 * j + half < table.shape[1]:
                    big_kc[2 * big + half] = kc[table[r, 2 * j + half]]
                    big_vc[2 * big + half] = vc[table[r, 2 * j + half]]
    got = paged_canvas_attention(q, k, v, big_kc, big_vc, big_table, ctx, 16, False, table_block_size=2 * BLOCK_SIZE)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, 16, False)
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


def test_model_denoise_through_the_paged_kernel_matches_the_dense_path(tiny_dir):
    """Catches wiring errors between the model and the kernel (dtype of context lengths,
    per-layer window, block-table slicing) that kernel-only tests cannot see."""
    from diffusiongemma_vllm.standalone import load_standalone

    model = load_standalone(tiny_dir)
    cfg = model.model.cfg
    gen = torch.Generator().manual_seed(4)
    contexts = [cfg.sliding_window + 9, 3]
    model.allocate(2, 128)
    rows = torch.arange(2)
    for r, n in enumerate(contexts):
        model.prefill(rows[r:r + 1], torch.randint(3, 500, (1, n), generator=gen), torch.tensor([0]))
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen)
    context = torch.tensor(contexts)
    dense = model.logits(model.denoise(rows, canvas, context, None))

    blocks = 128 // BLOCK_SIZE
    table = (rows[:, None] * blocks + torch.arange(blocks)).int()

    def paged(name):
        key, value = model.kv.tensors[name]
        shape = (-1, BLOCK_SIZE, *key.shape[2:])
        return PagedPrefix(key.reshape(shape), value.reshape(shape), table, BLOCK_SIZE)

    positions = (context[:, None] + torch.arange(cfg.canvas_length)).flatten()
    with torch.inference_mode():
        embeds = model.model.embed_canvas(canvas.flatten(), None)
    hidden = model._run(embeds, positions, CanvasPass(context, cfg.canvas_length, paged))
    torch.testing.assert_close(model.logits(hidden.view(2, cfg.canvas_length, -1)), dense, rtol=1e-4, atol=1e-4)
