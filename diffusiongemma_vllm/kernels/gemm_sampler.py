"""Sampler statistics from tensor-core GEMMs: one online-softmax sweep over vocabulary chunks.

The same `RowStats` as `fused_sampler.fused_row_stats` (argmax, Gumbel-max draw, entropy and
the self-conditioning signal softmax(z) @ E, z = softcap(h . E_v) / T, same Philox noise), but
the two matrix products run as cuBLAS GEMMs instead of `tl.dot` inside one Triton kernel. On
an H100 (benchmarks/results/2026-11-27-h100-gpu_check.md, 256 rows, V = 262144, H = 2816)
that kernel ran its logits product at ~180 TFLOP/s (2.1 ms) and its soft path, which rewrites
a [rows, H] fp32 accumulator in global memory for every vocabulary tile, took 6 ms more.

Per chunk of `vocab_chunk` ids, for a chunk of rows:
1. logits = h @ E_c^T with fp32 output (`mm_fp32`): [rows, vocab_chunk] fp32;
2. `_chunk_stats_kernel`, one program per row, sweeps the chunk: its max m_c, S_c = sum
   exp(z - m_c), W_c = sum exp(z - m_c) (z - m_c), the first-index argmax and the Gumbel
   argmax, written as the chunk's partials (the vocabulary splits of `merge_partials`). With
   the soft signal it then rescales against the running max M of the row, M' = max(M, m_c):
   writes P = exp(z - M') in the embedding dtype (as flash attention rounds P for P @ V) and
   scale = exp(M - M'), and stores M';
3. soft = soft * scale + P @ E_c (fp32 output): flash attention's running output, chunk-wise.
At the end `merge_partials` combines the chunks' statistics (first chunk wins ties: lowest id)
and soft is divided by the row's normaliser. Rows are chunked too so that rows x vocab_chunk
stays at `block_elements`: peak memory beyond the outputs is one fp32 logits block and one P
block (96 MiB at the default), whatever the number of canvases.

Temperatures must be > 0 (not checked: that would synchronise the device).
"""

from __future__ import annotations

import torch

from .fused_sampler import merge_partials, mm_fp32
from .vocab_tiled_sampler import RowStats

try:
    import triton
    import triton.language as tl

    from .fused_sampler import gumbel_run, stable_tanh
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None

BLOCK_ELEMENTS = 1 << 24  # rows x vocab_chunk of one logits block: 64 MiB fp32
MIN_VOCAB_CHUNK = 4096  # GEMMs narrower than this lose tensor-core efficiency


if triton is not None:

    @triton.jit
    def _chunk_stats_kernel(
        logits_ptr, t_ptr, key_ptr, stats_ptr, ids_ptr, probs_ptr, running_max_ptr, scale_ptr,
        rows, width, first_id, softcap,
        WITH_SOFT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        inv_t = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        key = tl.load(key_ptr + row).to(tl.int64)
        line = logits_ptr + row.to(tl.int64) * width
        m = float("-inf")
        total = 0.0
        weighted = 0.0
        best = 0
        drawn = float("-inf")
        drawn_id = 0
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < width
            z = softcap * stable_tanh(tl.load(line + cols, mask=ok, other=0.0) / softcap) * inv_t
            z = tl.where(ok, z, float("-inf"))
            tile_max = tl.max(z, axis=0)
            best = tl.where(tile_max > m, c0 + tl.argmax(z, axis=0), best)  # strict: first index wins
            m_new = tl.maximum(m, tile_max)
            rescale = tl.exp(m - m_new)
            p = tl.exp(z - m_new)  # 0 at padded columns
            shift = tl.where(total > 0, m - m_new, 0.0)  # W relative to the new max, no 0 * -inf
            centred = tl.where(ok, z - m_new, 0.0)
            weighted = rescale * (weighted + shift * total) + tl.sum(p * centred, axis=0)
            total = total * rescale + tl.sum(p, axis=0)
            m = m_new
            perturbed = tl.where(ok, z + gumbel_run(key, first_id + c0, BLOCK), float("-inf"))
            key_max = tl.max(perturbed, axis=0)
            drawn_id = tl.where(key_max > drawn, c0 + tl.argmax(perturbed, axis=0), drawn_id)
            drawn = tl.maximum(drawn, key_max)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + rows + row, total)
        tl.store(stats_ptr + 2 * rows + row, weighted)
        tl.store(stats_ptr + 3 * rows + row, drawn)
        tl.store(ids_ptr + row, (first_id + best).to(tl.int64))
        tl.store(ids_ptr + rows + row, (first_id + drawn_id).to(tl.int64))
        if WITH_SOFT:
            previous = tl.load(running_max_ptr + row)
            top = tl.maximum(previous, m)
            tl.store(scale_ptr + row, tl.exp(previous - top))  # 0 for the first chunk (-inf)
            tl.store(running_max_ptr + row, top)
            out = probs_ptr + row.to(tl.int64) * width
            for c0 in range(0, width, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                ok = cols < width
                z = softcap * stable_tanh(tl.load(line + cols, mask=ok, other=0.0) / softcap) * inv_t
                tl.store(out + cols, tl.exp(z - top).to(probs_ptr.dtype.element_ty), mask=ok)


def gemm_row_stats(
    hidden: torch.Tensor,  # [N, H] bf16 / fp16 / fp32
    embedding: torch.Tensor,  # [V, H] same dtype (the tied lm_head), rows contiguous
    softcap: float,
    temperature: torch.Tensor,  # [N] > 0
    gumbel_keys: torch.Tensor,  # [N] int64 / int32: the draw of row n is a function of (key n, v)
    with_soft: bool,
    block_elements: int = BLOCK_ELEMENTS,
    min_vocab_chunk: int = MIN_VOCAB_CHUNK,
    block: int = 2048,  # columns per step of the statistics kernel (a power of two >= 4)
    num_warps: int = 8,
) -> RowStats:
    assert triton is not None, "gemm_row_stats needs Triton; vocab_tiled_row_stats is the torch path"
    n, width = hidden.shape
    vocab = embedding.shape[0]
    assert n > 0 and vocab > 0, (n, vocab)
    assert embedding.shape == (vocab, width) and embedding.dtype == hidden.dtype, (embedding.shape, embedding.dtype)
    assert embedding.stride(1) == 1, embedding.stride()
    assert temperature.shape == gumbel_keys.shape == (n,) and temperature.is_floating_point()
    assert gumbel_keys.dtype in (torch.int64, torch.int32), gumbel_keys.dtype
    # A multiple of 4: gumbel_run draws ids from a multiple of 4.
    vocab_chunk = max(4, min(vocab, max(min_vocab_chunk, block_elements // n)) // 4 * 4)
    row_chunk = max(1, block_elements // vocab_chunk)
    parts = [_row_chunk(hidden[r:r + row_chunk], embedding, softcap, temperature[r:r + row_chunk].contiguous(),
                        gumbel_keys[r:r + row_chunk].contiguous(), with_soft, vocab_chunk, block, num_warps)
             for r in range(0, n, row_chunk)]
    if len(parts) == 1:
        return parts[0]
    return RowStats(*(torch.cat(field) if field[0] is not None else None for field in zip(*(
        (p.argmax, p.sample, p.entropy, p.soft) for p in parts))))


def _row_chunk(hidden, embedding, softcap, temperature, keys, with_soft, vocab_chunk, block, num_warps) -> RowStats:
    rows, device = hidden.shape[0], hidden.device
    chunks = triton.cdiv(embedding.shape[0], vocab_chunk)
    stats = torch.empty((chunks, 4, rows), dtype=torch.float32, device=device)  # m, S, W, Gumbel max
    ids = torch.empty((chunks, 2, rows), dtype=torch.int64, device=device)  # argmax, sample
    soft = running_max = scale = None
    if with_soft:
        soft = torch.zeros((rows, hidden.shape[1]), dtype=torch.float32, device=device)
        running_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
        scale = torch.empty((rows,), dtype=torch.float32, device=device)
    for c in range(chunks):
        chunk = embedding[c * vocab_chunk:(c + 1) * vocab_chunk]
        logits = mm_fp32(hidden, chunk.T)  # [rows, chunk width] fp32
        probs = torch.empty(logits.shape, dtype=embedding.dtype, device=device) if with_soft else logits
        _chunk_stats_kernel[(rows,)](
            logits, temperature, keys, stats[c], ids[c], probs,
            running_max if with_soft else stats, scale if with_soft else stats,
            rows, logits.shape[1], c * vocab_chunk, float(softcap),
            WITH_SOFT=with_soft, BLOCK=block, num_warps=num_warps)
        if with_soft:
            soft.mul_(scale[:, None]).add_(mm_fp32(probs, chunk))
    result, log_norm = merge_partials(stats.transpose(0, 1), ids.transpose(0, 1), None)
    if with_soft:
        soft.mul_(torch.exp(running_max - log_norm)[:, None])  # running_max is the row's max
    return RowStats(result.argmax, result.sample, result.entropy, soft)
