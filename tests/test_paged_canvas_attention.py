"""The Triton paged canvas attention against the pure-torch reference, on CPU in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1).

The caches are paged through a shuffled block table; every cache cell the kernel must not
read (unused blocks, prefix positions older than the sliding window, stale table entries
past the window) holds NaN, so a stray read poisons the output. Besides the default launch
settings, each launch option (small row blocks that split a GQA group's rows, a split output
head dim, a split key sequence) runs at small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.model.canvas_context import CanvasPass, PagedPrefix  # noqa: E402
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


# (contexts, canvas, heads, kv_heads, head_dim, window): GQA groups 1, 2 and 8. Group 1 has a
# canvas wider than its window and 16-row blocks, so a commit's later blocks skip the prefix;
# head_dim 48 leaves the second 32-wide output slice half masked.
GROUPS = [
    ((0, 21), 40, 2, 2, 32, 5),
    ((37, 5), 13, 4, 2, 64, 16),
    ((50,), 7, 8, 1, 48, None),
]
LAUNCHES = [
    dict(block_m=16, block_n=16),  # row blocks that end inside a canvas position's group
    dict(block_m=32, block_n=16, block_dv=32),  # output head dim split across programs
    dict(block_m=64, block_n=32, num_splits=3),  # key splits; empty ones where a request is short
    dict(block_m=16, block_n=16, block_dv=16, num_splits=2),
]


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("contexts, canvas, heads, kv_heads, head_dim, window", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
def test_launch_options_match_reference(contexts, canvas, heads, kv_heads, head_dim, window, causal, launch):
    """Catches a wrong (canvas position, head) row packing, a causal or window bound taken from
    the wrong row of a block, an output slice written to the wrong columns, a key split that
    drops or repeats a tile, and a combine that mishandles an empty split."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case(contexts, canvas, heads, kv_heads, head_dim, window,
                                                            torch.float32, seed=5)
    got = paged_canvas_attention(q, k, v, kc, vc, table, ctx, window, causal, **launch)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, window, causal)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("contexts, canvas, heads, kv_heads, head_dim, window", [
    ((40, 3), 9, 4, 2, 256, 16),  # sliding: the release's head dim and GQA group
    ((33,), 5, 8, 1, 512, None),  # full: the release's head dim and GQA group, two output slices
])
@pytest.mark.parametrize("causal", [False, True])
def test_key_splits_at_release_head_dims(contexts, canvas, heads, kv_heads, head_dim, window, causal):
    """Catches split-key partials or their log-sum-exp indexed wrongly at the release's head
    dims (the default launch settings, with the splits a one-canvas launch gets on a GPU)."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case(contexts, canvas, heads, kv_heads, head_dim, window,
                                                            torch.float32, seed=6)
    got = paged_canvas_attention(q, k, v, kc, vc, table, ctx, window, causal, num_splits=4)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, window, causal)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_fixed_split_count_makes_a_canvas_independent_of_its_batch(num_splits):
    """Catches split boundaries or a reduction that depend on the other canvases of the launch
    (for example on the longest context): with the split count fixed, as vLLM's batch-invariant
    mode makes it (PagedPrefix.num_splits), a canvas's output must be bit-identical alone and
    batched with shorter and longer prefixes."""
    q, k, v, kc, vc, table, ctx, _ = make_case((40, 3, 77), 9, 4, 2, 256, None, torch.float32, seed=8)
    batched = paged_canvas_attention(q, k, v, kc, vc, table, ctx, None, False, num_splits=num_splits)
    alone = paged_canvas_attention(q[:1], k[:1], v[:1], kc, vc, table[:1], ctx[:1], None, False, num_splits=num_splits)
    assert torch.equal(alone, batched[:1])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_output_written_into_a_given_tensor(num_splits):
    """Catches `out=` ignored or partly written (the split combine writing elsewhere): under
    vLLM's piecewise CUDA graphs the attention op writes into the buffer the next captured
    piece reads (model/phase_attention.py), so an output left in a fresh tensor is lost."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((40, 3), 9, 4, 2, 256, 16, torch.float32, seed=9)
    out = torch.full_like(q, float("nan"))
    got = paged_canvas_attention(q, k, v, kc, vc, table, ctx, 16, False, num_splits=num_splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, naive_canvas_attention(q, k, v, pk, pv, lens, ctx, 16, False), rtol=1e-4, atol=5e-5)


def test_launch_that_runs_out_of_resources_falls_back_to_the_compact_settings(monkeypatch):
    """Catches a model call that dies when the head dim's table entry (chosen from offline
    compiles, not a GPU run) does not fit the card: it must retry with COMPACT_LAUNCH and
    remember that, while explicitly requested settings still raise."""
    from triton.runtime.errors import OutOfResources

    from diffusiongemma_vllm.kernels import paged_canvas_attention as module

    real = module._paged_canvas_attention_kernel
    launched = []

    class TooBigForTheTable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["BLOCK_N"])
                if kwargs["BLOCK_N"] == module.GENERIC_LAUNCH["block_n"]:
                    raise OutOfResources(240000, 232448, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "_paged_canvas_attention_kernel", TooBigForTheTable())
    monkeypatch.setattr(module, "_OVERSIZED", set())
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((21, 4), 6, 4, 2, 64, 16, torch.float32, seed=8)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, 16, False)
    for _ in range(2):
        torch.testing.assert_close(paged_canvas_attention(q, k, v, kc, vc, table, ctx, 16, False), want,
                                   rtol=1e-4, atol=5e-5)
    compact = module.COMPACT_LAUNCH["block_n"]
    assert launched == [module.GENERIC_LAUNCH["block_n"], compact, compact]  # the second call goes straight there
    with pytest.raises(OutOfResources):
        paged_canvas_attention(q, k, v, kc, vc, table, ctx, 16, False, block_n=module.GENERIC_LAUNCH["block_n"])


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


def test_bf16_with_split_keys_and_output_slices():
    """Catches fp32 partials cast to bf16 before the combine, or a bf16 final store that
    loses the split path's output."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((21, 9), 12, 8, 2, 32, 16, torch.bfloat16, seed=7)
    got = paged_canvas_attention(q, k, v, kc, vc, table, ctx, 16, True, block_m=16, block_n=16, block_dv=16,
                                 num_splits=2)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, 16, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_query_viewed_from_a_fused_qkv_buffer():
    """Catches an output written with the query's strides: a query sliced out of a fused qkv
    projection is not dense, and the output the launcher allocates is."""
    q, k, v, kc, vc, table, ctx, (pk, pv, lens) = make_case((14, 30), 6, 4, 2, 32, None, torch.float32, seed=8)
    n, canvas, heads, head_dim = q.shape
    fused = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
    q_view = fused[..., :heads * head_dim].unflatten(-1, (heads, head_dim))
    got = paged_canvas_attention(q_view, k, v, kc, vc, table, ctx, None, False)
    want = naive_canvas_attention(q, k, v, pk, pv, lens, ctx, None, False)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_model_denoise_through_the_paged_kernel_matches_the_dense_path(tiny_dir):
    """Catches wiring errors between the model and the kernel (dtype of context lengths,
    per-layer window, block-table slicing) that kernel-only tests cannot see."""
    from diffusiongemma_vllm.testing.standalone import load_standalone

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
