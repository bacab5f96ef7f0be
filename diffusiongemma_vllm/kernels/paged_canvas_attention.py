"""Triton kernel: canvas attention reading the committed prefix straight from vLLM's paged cache.

Same semantics as `canvas_attention.naive_canvas_attention` (read that docstring first), for
the GPU: the prefix is never gathered or copied. Many requests with different prefix lengths
share one launch. Each request's keys form one sequence streamed through one online softmax:
1. the committed prefix, walked through the request's block table: positions
   [start, context_len), start = context_len - (window - 1) on sliding layers, else 0;
2. the canvas's own K/V (dense; bidirectional, or causal with the window for a commit).

One program owns (request, KV head, block of `block_m` rows, slice of the output head dim,
split of the keys). Rows enumerate (canvas position, query head of the GQA group) as
`row = position * group + head_in_group`, so every K/V tile loaded serves the whole group
(8 query heads on full layers) and the dots get tall tiles for the tensor cores; the masks
take each row's canvas position, and a commit's row block skips the keys none of its rows
see. Two options trade work for parallelism or registers:
- `block_dv` < head_dim splits the output head dim across programs: each computes QK^T over
  the whole head dim but accumulates only its slice of V (an fp32 [128, 512] accumulator
  does not fit in registers; two slices cost 1.5x the minimal FLOPs);
- `num_splits` > 1 splits the key sequence across programs (flash-decoding) when the grid is
  too small to fill the GPU (one canvas on a full layer is 2 KV heads); each split writes an
  fp32 partial output and its log-sum-exp, and `_combine_splits_kernel` merges them.
The dots take the cache dtype (bf16 tensor cores on GPU) and accumulate in fp32; the softmax
is fp32 in base 2 (the scale carries log2(e)); Gemma 4's scale is 1.0.

The caches are passed as `[num_blocks, block_size, kv_heads, head_dim]` views with any
strides (the engine builds them from the backend's layout), so nothing is copied. The block
table may count in larger blocks than the cache tensor (vLLM's scheduler blocks vs the
attention kernel's blocks): `table_block_size` says how many tokens one entry covers.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None

# Launch settings by head dim, for a GPU that gives a block an H100's 227 KB of shared memory:
# the fastest of 8 candidates per head dim on an H100 (gpu_check block_sweep, 16 canvases,
# benchmarks/results/2026-11-27-h100-gpu_check.md). Compiled offline for sm_90 with Triton 3.9
# and ptxas 13.4 (tests/test_kernels_compile_offline.py) they take 128 KB and 176 KB of shared
# memory and spill registers (4.8 KB and 2.6 KB of spill stores), as did all 16 other tile
# shapes tried: the fp32 accumulator and the Q tile of 128 rows x 256 fill the registers.
# GPUs with less shared memory get COMPACT_LAUNCH (70 KB at head dim 512 for sm_89).
HOPPER_SHARED_MEM = 232448
LAUNCH = {
    256: dict(block_m=128, block_n=64, block_dv=256, num_warps=8, num_stages=2),
    512: dict(block_m=128, block_n=32, block_dv=256, num_warps=8, num_stages=2),
}
GENERIC_LAUNCH = dict(block_m=64, block_n=32, block_dv=None, num_warps=4, num_stages=2)
COMPACT_LAUNCH = dict(block_m=64, block_n=16, block_dv=128, num_warps=4, num_stages=2)
MAX_SPLITS = 8  # bounds the fp32 partials and the combine's loop


if triton is not None:

    @triton.jit
    def _online_update(scores, values, m_i, l_i, acc):  # scores in base 2 (log2(e) in the scale)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        # P @ V in the cache dtype (bf16 tensor cores on GPU), accumulated in fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _paged_canvas_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, table_ptr, ctx_ptr,
        sq_n, sq_c, sq_h,  # query strides; head_dim is contiguous
        sk_n, sk_c, sk_h,  # canvas key / value strides
        skc_b, skc_t, skc_h,  # key cache strides: block, token in block, head
        svc_b, svc_t, svc_h,  # value cache strides
        st_n,  # block table row stride
        n, heads, group, canvas, table_block_size, cache_block_size, window, qk_scale, splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        CAUSAL: tl.constexpr, SLIDING: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Grid (row blocks, dv slices * splits, requests * kv heads): the programs sharing one
        # request's K/V stream launch next to each other, so the tiles they all read meet in L2.
        row0 = tl.program_id(0) * BLOCK_M
        dv_blocks = (HEAD_DIM + BLOCK_DV - 1) // BLOCK_DV
        dv, split = tl.program_id(1) % dv_blocks, tl.program_id(1) // dv_blocks
        r = tl.program_id(2) // (heads // group)
        kvh = tl.program_id(2) % (heads // group)
        rows = row0 + tl.arange(0, BLOCK_M)
        pos = rows // group  # canvas position of each row
        head = kvh * group + rows % group
        row_mask = pos < canvas
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_v = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_mask = offs_v < HEAD_DIM
        q = tl.load(q_ptr + r.to(tl.int64) * sq_n + pos[:, None] * sq_c + head[:, None] * sq_h + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        # The keys this row block can see: prefix [p_lo, context), canvas [c_lo, c_hi).
        context = tl.load(ctx_ptr + r)
        p_lo = 0
        c_lo = 0
        c_hi = canvas
        if SLIDING:
            p_lo = tl.maximum(context - (window - 1), 0)
        if CAUSAL:  # a commit: keys up to the block's last position, none older than its first's window
            c_hi = tl.minimum((row0 + BLOCK_M - 1) // group, canvas - 1) + 1
            if SLIDING:
                p_lo = tl.maximum(context + row0 // group - (window - 1), 0)
                c_lo = tl.maximum(row0 // group - (window - 1), 0)
        prefix = tl.maximum(context - p_lo, 0)  # 0 once a commit's window has left the prefix
        # This split's share of the sequence (prefix then canvas), whole tiles where possible.
        chunk = tl.cdiv(tl.cdiv(prefix + c_hi - c_lo, splits), BLOCK_N) * BLOCK_N
        lo, hi = split * chunk, (split + 1) * chunk

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)

        p_end = p_lo + tl.minimum(hi, prefix)
        for s in range(p_lo + lo, p_end, BLOCK_N):  # phase 1: the paged prefix
            key_pos = s + tl.arange(0, BLOCK_N)
            p_mask = key_pos < p_end
            # The scheduler's blocks may span several kernel blocks of the cache tensor.
            table_blk = tl.load(table_ptr + r * st_n + key_pos // table_block_size, mask=p_mask, other=0).to(tl.int64)
            flat = table_blk * table_block_size + key_pos % table_block_size
            blk = flat // cache_block_size
            slot = flat % cache_block_size
            keys = tl.load(kc_ptr + blk[:, None] * skc_b + slot[:, None] * skc_t + kvh * skc_h + offs_d[None, :],
                           mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            values = tl.load(vc_ptr + blk[:, None] * svc_b + slot[:, None] * svc_t + kvh * svc_h + offs_v[None, :],
                             mask=p_mask[:, None] & v_mask[None, :], other=0.0)
            if UPCAST:
                keys, values = keys.to(tl.float32), values.to(tl.float32)
            visible = p_mask[None, :]
            if CAUSAL and SLIDING:
                visible = visible & ((context + pos)[:, None] - key_pos[None, :] < window)
            scores = tl.where(visible, tl.dot(q, tl.trans(keys)) * qk_scale, float("-inf"))
            m_i, l_i, acc = _online_update(scores, values, m_i, l_i, acc)

        c_end = c_lo + tl.maximum(tl.minimum(hi, prefix + c_hi - c_lo) - prefix, 0)
        for s in range(c_lo + tl.maximum(lo - prefix, 0), c_end, BLOCK_N):  # phase 2: the canvas itself
            j = s + tl.arange(0, BLOCK_N)
            j_mask = j < c_end
            keys = tl.load(k_ptr + r.to(tl.int64) * sk_n + j[:, None] * sk_c + kvh * sk_h + offs_d[None, :],
                           mask=j_mask[:, None] & d_mask[None, :], other=0.0)
            values = tl.load(v_ptr + r.to(tl.int64) * sk_n + j[:, None] * sk_c + kvh * sk_h + offs_v[None, :],
                             mask=j_mask[:, None] & v_mask[None, :], other=0.0)
            if UPCAST:
                keys, values = keys.to(tl.float32), values.to(tl.float32)
            visible = j_mask[None, :]
            if CAUSAL:
                visible = visible & (j[None, :] <= pos[:, None])
                if SLIDING:
                    visible = visible & (pos[:, None] - j[None, :] < window)
            scores = tl.where(visible, tl.dot(q, tl.trans(keys)) * qk_scale, float("-inf"))
            m_i, l_i, acc = _online_update(scores, values, m_i, l_i, acc)

        # out (and lse) are contiguous [splits, n, canvas, heads, (head_dim)]: fp32 partials with
        # SPLIT, else the final output.
        out_row = ((split * n + r).to(tl.int64) * canvas + pos) * heads + head
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw nothing has acc 0 and m_i -inf
        out = acc / l_safe[:, None]
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + offs_v[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & v_mask[None, :])
        if SPLIT:
            if dv == 0:  # every output slice computed the same softmax statistics
                tl.store(lse_ptr + out_row, m_i + tl.log2(l_safe), mask=row_mask)  # base 2, like the scores

    @triton.jit
    def _combine_splits_kernel(
        part_ptr, lse_ptr, out_ptr, rows, splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        r_mask = offs_r < rows
        mask = r_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        for s in range(splits):
            m = tl.maximum(m, tl.load(lse_ptr + s * rows + offs_r, mask=r_mask, other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw stays zero
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        den = tl.zeros((BLOCK_R,), tl.float32)
        for s in range(splits):
            w = tl.exp2(tl.load(lse_ptr + s * rows + offs_r, mask=r_mask, other=float("-inf")) - m)
            part = tl.load(part_ptr + (s * rows + offs_r.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :],
                           mask=mask, other=0.0)
            acc += w[:, None] * part
            den += w
        out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


# (device index, head dim) whose LAUNCH entry failed to compile for lack of resources: they
# use COMPACT_LAUNCH from then on (the table is chosen from offline compiles, not a GPU run).
_OVERSIZED: set[tuple[int | None, int]] = set()


def _default_launch(device: torch.device, head_dim: int) -> dict:
    shared = _device_limits(device.index)[1] if device.type == "cuda" else HOPPER_SHARED_MEM
    if shared < HOPPER_SHARED_MEM or (device.index, head_dim) in _OVERSIZED:
        return COMPACT_LAUNCH
    return LAUNCH.get(head_dim, GENERIC_LAUNCH)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(SM count, shared memory a block may opt into) of CUDA device `index`."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["multiprocessor_count"], props["max_shared_mem"]


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
    block_m: int | None = None,  # rows (canvas position x query head of the group) per program
    block_n: int | None = None,  # keys per tile
    block_dv: int | None = None,  # output head-dim slice per program; None: the whole head dim
    num_splits: int | None = None,  # key-sequence splits; None: enough to fill the GPU's SMs once
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,  # [n, C, heads, head_dim] contiguous, query dtype: written in place
) -> torch.Tensor:
    """Returns [n, C, heads, head_dim] (contiguous) in the query dtype: `out` when given. Launch settings left
    as None come from LAUNCH[head_dim] (GENERIC_LAUNCH for other head dims; COMPACT_LAUNCH on
    GPUs with less shared memory than an H100, or after the table's entry ran out of resources)."""
    requested, requested_splits = (block_m, block_n, block_dv, num_warps, num_stages), num_splits
    n, canvas, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    assert heads % kv_heads == 0, (heads, kv_heads)
    assert key.shape == value.shape == (n, canvas, kv_heads, head_dim)
    assert key_cache.shape == value_cache.shape and key_cache.shape[2:] == (kv_heads, head_dim)
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    assert key_cache.stride(-1) == value_cache.stride(-1) == 1
    assert key.stride() == value.stride()
    assert block_table.shape[0] == context_lens.shape[0] == n
    on_gpu = query.device.type == "cuda"
    sms = _device_limits(query.device.index)[0] if on_gpu else 0
    launch = _default_launch(query.device, head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = block_m or launch["block_m"]
    block_n = block_n or launch["block_n"]
    block_dv = min(block_dv or launch["block_dv"] or block_d, block_d)
    assert min(block_m, block_n, block_dv) >= 16, "tl.dot needs every tile dim >= 16"
    assert block_dv & (block_dv - 1) == 0, block_dv

    group = heads // kv_heads
    row_blocks = triton.cdiv(group * canvas, block_m)
    dv_blocks = triton.cdiv(head_dim, block_dv)
    if num_splits is None:  # at most one wave: a second, partial wave would cost more than it adds
        num_splits = max(1, min(MAX_SPLITS, sms // (row_blocks * dv_blocks * n * kv_heads)))

    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    assert out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()
    split = num_splits > 1  # then the kernel writes fp32 partials and their log-sum-exp for the combine
    partial = torch.empty((num_splits, *query.shape), dtype=torch.float32, device=query.device) if split else out
    lse = torch.empty((num_splits, n, canvas, heads), dtype=torch.float32, device=query.device) if split else out
    grid = (row_blocks, dv_blocks * num_splits, n * kv_heads)
    try:
        _paged_canvas_attention_kernel[grid](
            query, key, value, key_cache, value_cache, partial, lse, block_table, context_lens,
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_table.stride(0),
            n, heads, group, canvas, table_block_size or key_cache.shape[1], key_cache.shape[1],
            sliding_window or 0, scale * math.log2(math.e), num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_M=block_m, BLOCK_N=block_n,
            SPLIT=split, CAUSAL=causal, SLIDING=sliding_window is not None,
            # Triton 3.9's interpreter multiplies bf16 dot operands as raw integers: upcast on CPU.
            UPCAST=not on_gpu and query.dtype != torch.float32,
            num_warps=num_warps or launch["num_warps"], num_stages=num_stages or launch["num_stages"],
        )
    except OutOfResources:
        if any(requested) or launch is COMPACT_LAUNCH:
            raise
        _OVERSIZED.add((query.device.index, head_dim))
        return paged_canvas_attention(query, key, value, key_cache, value_cache, block_table, context_lens,
                                      sliding_window, causal, scale, table_block_size, num_splits=requested_splits,
                                      out=out)
    if split:
        rows = n * canvas * heads
        block_r = max(1, 4096 // block_d)
        _combine_splits_kernel[(triton.cdiv(rows, block_r),)](
            partial, lse, out, rows, num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r)
    return out

