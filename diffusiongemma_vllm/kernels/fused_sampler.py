"""Fused unembedding + sampler: one denoise pass's statistics straight from the hidden states.

For every canvas row h [H] against the tied embedding E [V, H] (fp32 arithmetic):
    z_v = softcap(h . E_v) / T_row,   softcap(x) = cap * tanh(x / cap),
and from softmax(z): argmax(z), a Gumbel-max draw, the entropy and, optionally, the
self-conditioning signal softmax(z) @ E: the `RowStats` that `vocab_tiled_sampler.py`
computes in torch, with the same Philox noise (noise.py), so both draw the same tokens. The
denoise loop uses this kernel on CUDA. The kernel never holds more than a [rows, vocab tile]
block of z. The upstream sampler materialises fp32 logits [n * 256, 262144], 268 MB per
canvas, and runs out of memory at 8 requests (research/vllm_intree.md 4.5 items 2-3, 6 idea 2).
The reference is `vocab_tiled_sampler.naive_row_stats` on fp32 copies of the inputs (the
kernel's dot products of bf16 inputs are exact in fp32; a bf16 matmul rounds its output).
`fused_stats_gemm_soft` is the same kernel without its soft path, followed by the soft
embedding as vocabulary-chunked GEMMs (see there); `benchmarks/gpu_check.py` times both.

Design:
- One program per (block of rows, vocabulary split) walks its vocabulary range in tiles, the
  way flash attention walks keys (scores z, keys = values = E): a z tile by tl.dot over H
  chunks, then a running max m, S = sum exp(z - m), W = sum exp(z - m) (z - m), the
  first-index argmax, the Gumbel argmax, and acc = sum exp(z - m) E_v, rescaled when m grows.
  Entropy = log S - W / S: W is taken relative to the max, so nothing cancels at |z| ~ cap / T.
- acc [rows, H] is too wide for registers at H = 2816, so it lives in global memory (the fp32
  output, or the split's partial), updated H chunk by H chunk; only its own program touches it.
- Splits fill the GPU when few rows are sampled (one canvas is 2 row blocks of 128); a torch
  epilogue merges the splits (the flash-decoding combine). Memory beyond the outputs is
  splits x N x H fp32 for acc, bounded by the split choice (~2 programs per SM); never N x V.
- The draw is argmax_v(z_v + g_v), g = -log(-log u), u_v = word v % 4 of
  tl.rand4x(key_row, v // 4) (Philox 4x32-10): it depends on (key, v) alone, not on tiles,
  splits or the batch; `noise.gumbel_noise` is the same noise in torch.
- Temperatures must be > 0 (not checked: that would synchronise the device).

Measured on an H100 during development (raw output not kept; benchmarks/gpu_check.py times
it beside the torch path) (bf16, V = 262144, H = 2816), 256 / 1024 rows: with soft 8.0 / 28 ms and
0.37 GB of partials (flat up to ~34k rows), vs 4.7 / 18 ms and 1.3 / 5 GB for materialised
fp32 logits; without soft 2.0 / 9.9 ms. With soft, time falls as block_v grows (15, 9.3, 8.0 ms
at 64, 128, 256): the acc read-modify-write, not the two dots, looks like the bound.
"""

from __future__ import annotations

import torch

from .vocab_tiled_sampler import RowStats

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None


if triton is not None:

    @triton.jit
    def stable_tanh(x):
        t = tl.exp(-2.0 * tl.abs(x))  # no overflow at any |x|
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def gumbel(key, vocab):
        """Gumbel noise -log(-log u) of vocabulary ids `vocab` under row keys `key` (broadcast):
        u = word v % 4 of tl.rand4x(key, v // 4), as noise.vocab_uniform draws it in torch."""
        u0, u1, u2, u3 = tl.rand4x(key, vocab // 4)
        word = vocab % 4
        u = tl.where(word == 0, u0, tl.where(word == 1, u1, tl.where(word == 2, u2, u3)))
        return -tl.log(-tl.log(u))

    @triton.jit
    def gumbel_run(key, first, BLOCK: tl.constexpr):
        """`gumbel` of the BLOCK consecutive ids first, first + 1, ... (first % 4 == 0) under one
        key: each rand4x call feeds four ids instead of one, a quarter of the Philox work."""
        u0, u1, u2, u3 = tl.rand4x(key, first // 4 + tl.arange(0, BLOCK // 4))
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])  # [quad, 2, 2] -> id order
        return -tl.log(-tl.log(u))

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        if UPCAST:  # Triton 3.9's interpreter multiplies bf16 as raw uint16; bf16 products are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")  # fp32 inputs get fp32 logits, not tf32
        return tl.dot(a, b)

    @triton.jit
    def _fused_sampler_kernel(
        h_ptr, e_ptr, t_ptr, key_ptr, stats_ptr, ids_ptr, acc_ptr,
        N, V, H, tiles_per_split, softcap,
        s_hn, s_ev, s_an, s_as,  # row strides of hidden, embedding, acc; acc's split stride
        WITH_SOFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_H)
        inv_t = 1.0 / tl.load(t_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        row_key = tl.load(key_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        h_rows = h_ptr + rows[:, None].to(tl.int64) * s_hn
        acc_rows = acc_ptr + split.to(tl.int64) * s_as + rows[:, None].to(tl.int64) * s_an
        if WITH_SOFT:
            for k in range(0, H, BLOCK_H):
                tl.store(acc_rows + k + cols[None, :], tl.zeros([BLOCK_N, BLOCK_H], tl.float32),
                         mask=row_ok[:, None] & (k + cols < H)[None, :])
            tl.debug_barrier()
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # also the argmax's value
        total = tl.zeros([BLOCK_N], tl.float32)  # S
        weighted = tl.zeros([BLOCK_N], tl.float32)  # W
        best = tl.zeros([BLOCK_N], tl.int32)
        drawn = tl.full([BLOCK_N], float("-inf"), tl.float32)
        drawn_id = tl.zeros([BLOCK_N], tl.int32)
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            vocab = v0 + tl.arange(0, BLOCK_V)
            v_ok = vocab < v_end
            e_rows = e_ptr + vocab[:, None].to(tl.int64) * s_ev
            logits = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k in range(0, H, BLOCK_H):
                h_ok = (k + cols < H)[None, :]
                h = tl.load(h_rows + k + cols[None, :], mask=row_ok[:, None] & h_ok, other=0.0)
                e = tl.load(e_rows + k + cols[None, :], mask=v_ok[:, None] & h_ok, other=0.0)
                logits += _dot(h, tl.trans(e), UPCAST)
            z = softcap * stable_tanh(logits / softcap) * inv_t[:, None]
            z = tl.where(v_ok[None, :], z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            best = tl.where(tile_max > m, v0 + tl.argmax(z, axis=1), best)  # strict: first index wins
            m_new = tl.maximum(m, tile_max)  # finite: every tile holds a valid id
            rescale = tl.exp(m - m_new)
            centred = z - m_new[:, None]
            p = tl.exp(centred)  # 0 at padded ids
            # W relative to the new max; both guards keep 0 * -inf (NaN) out of the sums.
            shift = tl.where(total > 0, m - m_new, 0.0)
            centred = tl.where(v_ok[None, :], centred, 0.0)
            weighted = rescale * (weighted + shift * total) + tl.sum(p * centred, axis=1)
            total = total * rescale + tl.sum(p, axis=1)
            m = m_new
            perturbed = z + gumbel(row_key[:, None], vocab[None, :])
            key_max = tl.max(perturbed, axis=1)
            drawn_id = tl.where(key_max > drawn, v0 + tl.argmax(perturbed, axis=1), drawn_id)
            drawn = tl.maximum(drawn, key_max)
            if WITH_SOFT:
                p = p.to(e_ptr.dtype.element_ty)  # as flash attention's P @ V
                for k in range(0, H, BLOCK_H):
                    ok = (k + cols < H)[None, :]
                    e = tl.load(e_rows + k + cols[None, :], mask=v_ok[:, None] & ok, other=0.0)
                    acc = tl.load(acc_rows + k + cols[None, :], mask=row_ok[:, None] & ok, other=0.0)
                    tl.store(acc_rows + k + cols[None, :], acc * rescale[:, None] + _dot(p, e, UPCAST),
                             mask=row_ok[:, None] & ok)
                tl.debug_barrier()  # next tile's loads of acc may come from other threads
        out = split * N + rows
        tl.store(stats_ptr + out, m, mask=row_ok)
        tl.store(stats_ptr + splits * N + out, total, mask=row_ok)
        tl.store(stats_ptr + 2 * splits * N + out, weighted, mask=row_ok)
        tl.store(stats_ptr + 3 * splits * N + out, drawn, mask=row_ok)
        tl.store(ids_ptr + out, best.to(tl.int64), mask=row_ok)
        tl.store(ids_ptr + splits * N + out, drawn_id.to(tl.int64), mask=row_ok)


def merge_partials(stats: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor | None) -> tuple[RowStats, torch.Tensor]:
    """Combine the vocabulary splits' partials [splits, N] (and acc [splits, N, H]); also
    returns each row's log-normaliser log sum_v exp(z_v) [N]."""
    m, total, weighted, drawn = stats
    top = m.max(0).values
    w = torch.exp(m - top)
    norm = (w * total).sum(0)
    entropy = torch.log(norm) - (w * (weighted + (m - top) * total)).sum(0) / norm
    # torch.argmax takes the first split on ties, i.e. the lowest vocabulary id.
    argmax = ids[0].gather(0, m.argmax(0, keepdim=True))[0]
    sample = ids[1].gather(0, drawn.argmax(0, keepdim=True))[0]
    soft = None
    if acc is not None:
        soft = acc[0] if acc.shape[0] == 1 else acc.mul_(w[:, :, None]).sum(0)
        soft.div_(norm[:, None])
    return RowStats(argmax, sample, entropy, soft), top + torch.log(norm)


def _default_splits(row_blocks: int, tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, -(-programs // row_blocks)))


def fused_row_stats(
    hidden: torch.Tensor,  # [N, H] bf16 / fp16 / fp32, rows contiguous in H
    embedding: torch.Tensor,  # [V, H] same dtype (the tied lm_head)
    softcap: float,
    temperature: torch.Tensor,  # [N] > 0
    gumbel_keys: torch.Tensor,  # [N] int64 / int32: the draw of row n is a function of (key n, v)
    with_soft: bool,
    block_n: int | None = None,  # None: 128 with soft, else 64 (fastest in an H100 sweep)
    block_v: int | None = None,  # None: 256 with soft, else 128
    block_h: int = 64,  # 128 with block_v 256 exceeds an H100's shared memory
    splits: int | None = None,  # vocabulary splits; None: about 2 programs per SM on CUDA, else 1
    num_warps: int = 8,
) -> RowStats:
    return _launch(hidden, embedding, softcap, temperature, gumbel_keys, with_soft, block_n, block_v, block_h,
                   splits, num_warps)[0]


def fused_stats_gemm_soft(
    hidden: torch.Tensor,  # [N, H], as fused_row_stats
    embedding: torch.Tensor,  # [V, H]
    softcap: float,
    temperature: torch.Tensor,  # [N] > 0
    gumbel_keys: torch.Tensor,  # [N]
    with_soft: bool,
    vocab_chunk: int = 16384,
    row_chunk: int = 4096,
) -> RowStats:
    """The kernel without its soft embedding, then softmax(z) @ E as vocabulary-chunked GEMMs.

    The kernel's soft path keeps its [rows, H] accumulator in global memory and rewrites it for
    every vocabulary tile (8.2 ms per canvas on an H100, 2.2 ms without it). Here the kernel
    returns the log-normaliser of each row, and each [row chunk, vocab chunk] block recomputes
    z with a tensor-core GEMM (fp32 output, so z is the kernel's), exponentiates it against the
    normaliser, rounds the probabilities to the embedding dtype (as the kernel does) and adds
    P @ E_chunk in fp32: two GEMMs of 2 N V H flops each, near peak, plus elementwise work on a
    [row chunk, vocab chunk] fp32 block. Same statistics and draws as `fused_row_stats`."""
    stats, log_norm = _launch(hidden, embedding, softcap, temperature, gumbel_keys, False)
    if not with_soft:
        return stats
    soft = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    inv_t = 1.0 / temperature.float()
    for r in range(0, hidden.shape[0], row_chunk):
        rows = slice(r, r + row_chunk)
        for v in range(0, embedding.shape[0], vocab_chunk):
            chunk = embedding[v:v + vocab_chunk]
            z = torch.tanh(mm_fp32(hidden[rows], chunk.T) / softcap) * softcap * inv_t[rows, None]
            probs = torch.exp(z - log_norm[rows, None]).to(embedding.dtype)
            soft[rows] += mm_fp32(probs, chunk)
    return RowStats(stats.argmax, stats.sample, stats.entropy, soft)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: tensor-core inputs, fp32 accumulation and result on CUDA."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _launch(hidden, embedding, softcap, temperature, gumbel_keys, with_soft, block_n=None, block_v=None,
            block_h=64, splits=None, num_warps=8) -> tuple[RowStats, torch.Tensor]:
    assert triton is not None, "fused_row_stats needs Triton; vocab_tiled_row_stats is the torch path"
    n, width = hidden.shape
    vocab = embedding.shape[0]
    assert n > 0 and vocab > 0, (n, vocab)
    assert embedding.shape == (vocab, width) and embedding.dtype == hidden.dtype, (embedding.shape, embedding.dtype)
    assert hidden.stride(1) == 1 and embedding.stride(1) == 1, (hidden.stride(), embedding.stride())
    assert temperature.shape == gumbel_keys.shape == (n,) and temperature.is_floating_point()
    assert gumbel_keys.dtype in (torch.int64, torch.int32), gumbel_keys.dtype
    assert temperature.stride(0) == 1 and gumbel_keys.stride(0) == 1
    block_n = block_n or (128 if with_soft else 64)
    block_v = block_v or (256 if with_soft else 128)
    assert min(block_n, block_v, block_h) >= 16, "tl.dot needs every tile dim >= 16"
    tiles = triton.cdiv(vocab, block_v)
    row_blocks = triton.cdiv(n, block_n)
    splits = splits or _default_splits(row_blocks, tiles, hidden.device)
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no empty split
    stats = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)  # m, S, W, Gumbel max
    ids = torch.empty((2, splits, n), dtype=torch.int64, device=hidden.device)  # argmax, sample
    acc = torch.empty((splits, n, width), dtype=torch.float32, device=hidden.device) if with_soft else None
    _fused_sampler_kernel[(row_blocks, splits)](
        hidden, embedding, temperature, gumbel_keys, stats, ids, acc if with_soft else stats,
        n, vocab, width, per_split, float(softcap),
        hidden.stride(0), embedding.stride(0), width, n * width,
        WITH_SOFT=with_soft, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        UPCAST=hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16, num_warps=num_warps)
    return merge_partials(stats, ids, acc)
