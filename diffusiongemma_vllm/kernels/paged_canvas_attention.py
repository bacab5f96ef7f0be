"""Triton kernel: canvas attention reading the committed prefix straight from vLLM's paged cache.

Same semantics as `canvas_attention.naive_canvas_attention` (read that docstring first), for
the GPU: the prefix is never gathered or copied. One program owns (request, query head,
block of canvas queries) and streams keys in two phases through one online softmax:
1. the committed prefix, walked through the request's block table: positions
   [start, context_len), start = context_len - (window - 1) on sliding layers, else 0;
2. the canvas's own K/V (dense; bidirectional, or causal with the window for a commit).
Many requests with different prefix lengths share one launch; GQA maps query head h to KV
head h // (heads / kv_heads). The dots take the cache dtype (bf16 tensor cores on GPU) and
accumulate in fp32; the softmax is fp32; Gemma 4's scale is 1.0.

The caches are passed as `[num_blocks, block_size, kv_heads, head_dim]` views with any
strides (the engine builds them from the backend's layout), so nothing is copied. The block
table may count in larger blocks than the cache tensor (vLLM's scheduler blocks vs the
attention kernel's blocks): `table_block_size` says how many tokens one entry covers.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None


if triton is not None:

    @triton.jit
    def _online_update(scores, values, m_i, l_i, acc):
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        # P @ V in the cache dtype (bf16 tensor cores on GPU), accumulated in fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _paged_canvas_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, table_ptr, ctx_ptr,
        sq_n, sq_c, sq_h,  # query / output strides; head_dim is contiguous
        sk_n, sk_c, sk_h,  # canvas key / value strides
        skc_b, skc_t, skc_h,  # key cache strides: block, token in block, head
        svc_b, svc_t, svc_h,  # value cache strides
        st_n,  # block table row stride
        heads, group, canvas, table_block_size, cache_block_size, window, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, SLIDING: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_nh = tl.program_id(0)
        r = pid_nh // heads
        h = pid_nh % heads
        kvh = h // group
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # canvas query index
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < canvas
        q = tl.load(q_ptr + r * sq_n + offs_m[:, None] * sq_c + h * sq_h + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        context = tl.load(ctx_ptr + r)
        start = 0
        if SLIDING:
            start = tl.maximum(context - (window - 1), 0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

        for s in range(start, context, BLOCK_N):  # phase 1: the paged prefix
            pos = s + tl.arange(0, BLOCK_N)
            p_mask = pos < context
            # The scheduler's blocks may span several kernel blocks of the cache tensor.
            table_blk = tl.load(table_ptr + r * st_n + pos // table_block_size, mask=p_mask, other=0).to(tl.int64)
            flat = table_blk * table_block_size + pos % table_block_size
            blk = flat // cache_block_size
            slot = flat % cache_block_size
            kv_mask = p_mask[:, None] & d_mask[None, :]
            keys = tl.load(kc_ptr + blk[:, None] * skc_b + slot[:, None] * skc_t + kvh * skc_h + offs_d[None, :],
                           mask=kv_mask, other=0.0)
            values = tl.load(vc_ptr + blk[:, None] * svc_b + slot[:, None] * svc_t + kvh * svc_h + offs_d[None, :],
                             mask=kv_mask, other=0.0)
            if UPCAST:
                keys, values = keys.to(tl.float32), values.to(tl.float32)
            visible = p_mask[None, :] & m_mask[:, None]
            if CAUSAL and SLIDING:
                visible = visible & ((context + offs_m)[:, None] - pos[None, :] < window)
            scores = tl.where(visible, tl.dot(q, tl.trans(keys)) * scale, float("-inf"))
            m_i, l_i, acc = _online_update(scores, values, m_i, l_i, acc)

        for s in range(0, canvas, BLOCK_N):  # phase 2: the canvas itself
            j = s + tl.arange(0, BLOCK_N)
            j_mask = j < canvas
            kv_mask = j_mask[:, None] & d_mask[None, :]
            keys = tl.load(k_ptr + r * sk_n + j[:, None] * sk_c + kvh * sk_h + offs_d[None, :],
                           mask=kv_mask, other=0.0)
            values = tl.load(v_ptr + r * sk_n + j[:, None] * sk_c + kvh * sk_h + offs_d[None, :],
                             mask=kv_mask, other=0.0)
            if UPCAST:
                keys, values = keys.to(tl.float32), values.to(tl.float32)
            visible = j_mask[None, :] & m_mask[:, None]
            if CAUSAL:
                visible = visible & (j[None, :] <= offs_m[:, None])
                if SLIDING:
                    visible = visible & (offs_m[:, None] - j[None, :] < window)
            scores = tl.where(visible, tl.dot(q, tl.trans(keys)) * scale, float("-inf"))
            m_i, l_i, acc = _online_update(scores, values, m_i, l_i, acc)

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + r * sq_n + offs_m[:, None] * sq_c + h * sq_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_canvas_attention(
    query: torch.Tensor,  # [n, C, heads, head_dim]
    key: torch.Tensor,  # [n, C, kv_heads, head_dim]
    value: torch.Tensor,  # [n, C, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], any strides
    value_cache: torch.Tensor,  # same shape as key_cache
    block_table: torch.Tensor,  # [n, max_blocks] int32
    context_lens: torch.Tensor,  # [n] int32: committed tokens = position of the first canvas token
    sliding_window: int | None,
    causal: bool,
    scale: float = 1.0,
    table_block_size: int | None = None,  # tokens per block-table entry; default: the cache's block size
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """Returns [n, C, heads, head_dim] in the query dtype."""
    n, canvas, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    assert heads % kv_heads == 0, (heads, kv_heads)
    assert key.shape == value.shape == (n, canvas, kv_heads, head_dim)
    assert key_cache.shape == value_cache.shape and key_cache.shape[2:] == (kv_heads, head_dim)
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    assert key_cache.stride(-1) == value_cache.stride(-1) == 1
    assert key.stride() == value.stride()
    assert block_table.shape[0] == context_lens.shape[0] == n
    out = torch.empty_like(query)
    grid = (n * heads, triton.cdiv(canvas, block_m))
    _paged_canvas_attention_kernel[grid](
        query, key, value, key_cache, value_cache, out, block_table, context_lens,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        heads, heads // kv_heads, canvas, table_block_size or key_cache.shape[1], key_cache.shape[1],
        sliding_window or 0, scale,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, SLIDING=sliding_window is not None,
        # Triton 3.9's interpreter multiplies bf16 dot operands as raw integers: upcast on CPU.
        UPCAST=query.device.type == "cpu" and query.dtype != torch.float32,
    )
    return out
