"""The CUDA sampler: per-position statistics from tensor-core GEMMs and one Triton kernel.

For every canvas row h [H] against the tied embedding E [V, H], z_v = softcap(h . E_v) / T
with softcap(x) = cap * tanh(x / cap); from softmax(z) the pass needs argmax(z), a Gumbel-max
draw, the entropy and the self-conditioning signal softmax(z) @ E: the `RowStats` that
`vocab_tiled_sampler.py` computes in torch, with the same Philox noise (noise.py), so both
draw the same tokens. The upstream sampler materialises fp32 logits [n * 256, 262144], 268 MB
per canvas, and runs out of memory at 8 requests (research/vllm_intree.md 4.5 items 2-3).

Measured on an H100 (benchmarks/results/2026-11-27-h100-gemm-sampler-gpu_check.md, V = 262144,
H = 2816, with the soft signal): 2.3 ms for one canvas (256 rows) and 2.0 ms per canvas at 64,
peak memory 163 / 353 MiB. The single fused Triton kernel it replaced (tl.dot for both products,
the soft accumulator rewritten in global memory per vocabulary tile) took 8.4 and 7.2 ms, and
materialised fp32 logits 4.9 ms and 1.3 GB for one canvas
(benchmarks/results/2026-11-27-h100-gpu_check.md).

Per chunk of `vocab_chunk` ids, for a chunk of rows:
1. logits = h @ E_c^T with fp32 output (`mm_fp32`): [rows, vocab_chunk] fp32;
2. `_chunk_stats_kernel`, one program per row, sweeps the chunk: its max m_c, S_c = sum
   exp(z - m_c), W_c = sum exp(z - m_c) (z - m_c), the first-index argmax and the Gumbel
   argmax, written as the chunk's partials. With the soft signal it then rescales against
   the running max M of the row, M' = max(M, m_c):
   writes P = exp(z - M') in the embedding dtype (as flash attention rounds P for P @ V) and
   scale = exp(M - M'), and stores M';
3. soft = soft * scale + P @ E_c (fp32 output): flash attention's running output, chunk-wise.
At the end the chunks' statistics are merged (flash decoding's combine; the first chunk wins
ties: lowest id) and soft is divided by the row's normaliser. Rows are chunked too, so that
rows x vocab_chunk stays at `block_elements`: peak memory beyond the outputs is one fp32
logits block and one P block (96 MiB at the default), whatever the number of canvases.
By default the chunk is as wide as that block allows, so it narrows as rows grow; that moves
the chunk boundaries, and with them the order the chunks' statistics and soft signal are
summed, so a row's entropy and soft signal round differently in another batch. A fixed
`vocab_chunk` (`INVARIANT_VOCAB_CHUNK` under vLLM's batch-invariant mode) keeps a row's
arithmetic independent of the rows beside it, given products that are: under that mode the
products are `fixed_order_gemm.fixed_order_mm` (`matmul`), not cuBLAS, whose kernel choice
follows the shape.

Entropy = log S - W / S with W taken relative to the max, so nothing cancels at |z| ~ cap / T.
The draw is argmax_v(z_v + g_v), g = -log(-log u), u_v = word v % 4 of tl.rand4x(key_row,
v // 4) (Philox 4x32-10): it depends on (key, v) alone, not on chunks or the batch;
`noise.gumbel_noise` is the same noise in torch. The logits' products are exact for bf16
inputs and summed in fp32, so the reference is `naive_row_stats` on fp32 copies of the inputs.
Temperatures must be > 0 (not checked: that would synchronise the device). A `bias`
(vocab_tiled_sampler.SparseBias) is laid out per chunk as a dense fp32 block beside the
logits block and added to the softcapped logits in the kernel. Under tensor
parallelism `embedding` is one rank's slice of the vocabulary, from id `first_id`: ids and
noise are the global ones, and the returned top, log-normaliser and Gumbel maximum let
`denoise/vocab_shards.py` merge the slices.
"""

from __future__ import annotations

import torch

from diffusiongemma_vllm.kernels.vocab_tiled_sampler import RowStats, SparseBias

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None

BLOCK_ELEMENTS = 1 << 24  # rows x vocab_chunk of one logits block: 64 MiB fp32
MIN_VOCAB_CHUNK = 4096  # GEMMs narrower than this lose tensor-core efficiency
INVARIANT_VOCAB_CHUNK = 16384  # the chunk under batch-invariant mode (the vocab-tiled path's)


if triton is not None:

    @triton.jit
    def _tanh(x):
        t = tl.exp(-2.0 * tl.abs(x))  # no overflow at any |x|
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def _gumbel_run(key, first, BLOCK: tl.constexpr):
        """Gumbel noise of the BLOCK ids first, first + 1, ... (first % 4 == 0) under one key;
        each rand4x call feeds four ids, as noise.vocab_uniform lays them out."""
        u0, u1, u2, u3 = tl.rand4x(key, first // 4 + tl.arange(0, BLOCK // 4))
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])  # [quad, 2, 2] -> id order
        return -tl.log(-tl.log(u))

    @triton.jit
    def _biased(line, bias_line, cols, ok, softcap, HAS_BIAS: tl.constexpr):
        """softcap(logits) at `cols`, plus the bias block's values when there is one."""
        z = softcap * _tanh(tl.load(line + cols, mask=ok, other=0.0) / softcap)
        if HAS_BIAS:
            z += tl.load(bias_line + cols, mask=ok, other=0.0)
        return z

    @triton.jit
    def _chunk_stats_kernel(
        logits_ptr, bias_ptr, t_ptr, key_ptr, stats_ptr, ids_ptr, probs_ptr, running_max_ptr, scale_ptr,
        rows, width, first_id, softcap,
        WITH_SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        inv_t = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        key = tl.load(key_ptr + row).to(tl.int64)
        line = logits_ptr + row.to(tl.int64) * width
        bias_line = bias_ptr + row.to(tl.int64) * width
        m = float("-inf")
        total = 0.0
        weighted = 0.0
        best = 0
        drawn = float("-inf")
        drawn_id = 0
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < width
            z = _biased(line, bias_line, cols, ok, softcap, HAS_BIAS) * inv_t
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
            perturbed = tl.where(ok, z + _gumbel_run(key, first_id + c0, BLOCK), float("-inf"))
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
                z = _biased(line, bias_line, cols, ok, softcap, HAS_BIAS) * inv_t
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
    vocab_chunk: int | None = None,  # a fixed chunk width (a multiple of 4); None: the widest that fits the block
    matmul=None,  # (a, b) -> a @ b in fp32; None: mm_fp32 (cuBLAS); fixed_order_gemm's under batch invariance
    block: int = 2048,  # columns per step of the statistics kernel (a power of two >= 4)
    num_warps: int = 8,
    first_id: int = 0,  # the vocabulary id of embedding row 0 (a tensor-parallel rank's slice), a multiple of 4
    bias: SparseBias | None = None,  # added to the softcapped logits (eager passes: it synchronises)
) -> RowStats:
    assert triton is not None, "gemm_row_stats needs Triton; vocab_tiled_row_stats is the torch path"
    n, width = hidden.shape
    vocab = embedding.shape[0]
    assert n > 0 and vocab > 0, (n, vocab)
    assert embedding.shape == (vocab, width) and embedding.dtype == hidden.dtype, (embedding.shape, embedding.dtype)
    assert embedding.stride(1) == 1, embedding.stride()
    assert temperature.shape == gumbel_keys.shape == (n,) and temperature.is_floating_point()
    assert gumbel_keys.dtype in (torch.int64, torch.int32), gumbel_keys.dtype
    assert first_id % 4 == 0, first_id  # _gumbel_run draws ids from a multiple of 4
    # A multiple of 4: _gumbel_run draws ids from a multiple of 4.
    if vocab_chunk is None:
        vocab_chunk = max(4, min(vocab, max(min_vocab_chunk, block_elements // n)) // 4 * 4)
    assert vocab_chunk > 0 and vocab_chunk % 4 == 0, vocab_chunk
    row_chunk = max(1, block_elements // vocab_chunk)
    parts = [_row_chunk(hidden[r:r + row_chunk], embedding, softcap, temperature[r:r + row_chunk].contiguous(),
                        gumbel_keys[r:r + row_chunk].contiguous(), with_soft, vocab_chunk, block, num_warps,
                        matmul or mm_fp32, first_id, bias, r)
             for r in range(0, n, row_chunk)]
    return parts[0] if len(parts) == 1 else RowStats.cat(parts)


def _row_chunk(hidden, embedding, softcap, temperature, keys, with_soft, vocab_chunk, block, num_warps,
               matmul, first_id, bias, first_row) -> RowStats:
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
        logits = matmul(hidden, chunk.T)  # [rows, chunk width] fp32
        probs = torch.empty(logits.shape, dtype=embedding.dtype, device=device) if with_soft else logits
        dense = bias.block(first_row, rows, first_id + c * vocab_chunk, logits.shape[1]) if bias is not None else None
        _chunk_stats_kernel[(rows,)](
            logits, logits if dense is None else dense, temperature, keys, stats[c], ids[c], probs,
            running_max if with_soft else stats, scale if with_soft else stats,
            rows, logits.shape[1], first_id + c * vocab_chunk, float(softcap),
            WITH_SOFT=with_soft, HAS_BIAS=dense is not None, BLOCK=block, num_warps=num_warps)
        if with_soft:
            soft.mul_(scale[:, None]).add_(matmul(probs, chunk))
    m, total, weighted, drawn = stats.transpose(0, 1)  # each [chunks, rows]
    # max along a dim gives the first chunk on ties, i.e. the lowest vocabulary id, as argmax does.
    top, best_chunk = m.max(0, keepdim=True)  # top is also the final running_max
    drawn_max, drawn_chunk = drawn.max(0, keepdim=True)
    w = torch.exp(m - top)
    norm = (w * total).sum(0)
    log_norm = torch.log(norm)
    entropy = log_norm - (w * (weighted + (m - top) * total)).sum(0) / norm
    return RowStats(ids[:, 0].gather(0, best_chunk)[0], ids[:, 1].gather(0, drawn_chunk)[0], entropy,
                    soft.div_(norm[:, None]) if with_soft else None, top[0], top[0] + log_norm, drawn_max[0])


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: tensor-core inputs, fp32 accumulation and result on CUDA."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()
