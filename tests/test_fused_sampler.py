"""The fused sampler kernel against its materialising reference, on CPU in Triton's interpreter.

Tolerances, against `naive_row_stats` on fp32 copies of the inputs (fp32 logits materialised):
- argmax and sample: exactly equal (same fp32 products, same Philox draws; a near-tie closer
  than the summation-order difference, ~1e-6, is improbable at these sizes);
- entropy: atol = rtol = 1e-4 (only the summation order differs; measured <= 4e-6);
- soft, fp32 inputs: atol 1e-4 (measured <= 1e-5);
- soft, bf16 inputs: the kernel rounds the probabilities to bf16 for P @ E, as flash attention
  does: each term is off by at most 2^-9 relative, so |error| <= 2^-9 * max|E| (2^-8 is asserted).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from diffusiongemma_vllm.kernels.fused_sampler import fused_row_stats, fused_stats_gemm_soft  # noqa: E402
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import (  # noqa: E402
    RowStats, naive_row_stats, vocab_tiled_row_stats)
from diffusiongemma_vllm.noise import vocab_uniform  # noqa: E402

SOFTCAP = 30.0
SMALL = dict(block_n=16, block_v=64, block_h=32, num_warps=4)  # interpreter-sized tiles


def make_inputs(rows, vocab, hidden, dtype, scale, seed=0, seed_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=gen) * scale).to(dtype)
    e = torch.randn(vocab, hidden, generator=gen).to(dtype)
    temperature = torch.rand(rows, generator=gen) * 0.4 + 0.4
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=gen).to(seed_dtype)
    return h, e, temperature, seeds


def reference(h, e, t, keys, with_soft):
    return naive_row_stats(h.float(), e.float(), SOFTCAP, t, keys, with_soft)


@triton.jit
def _rand4x_kernel(seed_ptr, out_ptr, first, counters, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    for c0 in range(0, counters, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(seed, first + offs)
        base = out_ptr + (row * counters + offs) * 4
        mask = offs < counters
        tl.store(base, u0, mask=mask)
        tl.store(base + 1, u1, mask=mask)
        tl.store(base + 2, u2, mask=mask)
        tl.store(base + 3, u3, mask=mask)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_vocab_uniform_is_tl_rand4x(dtype):
    """Catches a torch Philox that drifts from Triton's (key split, round constants, word
    order, the int -> [0, 1) map) or a vocabulary range cut at the wrong word: the torch
    sampler and the reference would then draw other tokens than the kernel."""
    seeds = torch.tensor([0, 1, 2**31 - 1, -1, -2**31, 12345, 987654321], dtype=dtype)
    if dtype == torch.int64:
        seeds = torch.cat([seeds, torch.tensor([2**32, 2**62 + 12345, -2**63, 2**63 - 1])])
    for first in (0, 30_864):
        want = torch.empty(seeds.shape[0], 75, 4)
        _rand4x_kernel[(seeds.shape[0],)](seeds, want, first, 75, BLOCK=32)
        want = want.flatten(1)  # vocabulary ids 4 * first ... 4 * first + 299
        assert torch.equal(vocab_uniform(seeds, 4 * first, 4 * first + 300), want)
        assert torch.equal(vocab_uniform(seeds, 4 * first + 3, 4 * first + 298), want[:, 3:298])


@pytest.mark.parametrize("rows, vocab, hidden, dtype, scale, splits, with_soft, seed_dtype", [
    (37, 1000, 32, torch.float32, 1.0, 1, True, torch.int64),  # odd rows, vocab % tile = 40
    (37, 1000, 64, torch.bfloat16, 1.0, 3, True, torch.int64),  # bf16, merged vocab splits
    (21, 777, 48, torch.float32, 6.0, 1, True, torch.int32),  # H = 1.5 chunks; softcap, peaked rows
    (19, 500, 32, torch.bfloat16, 6.0, 2, True, torch.int64),  # bf16 with saturated logits
    (5, 300, 32, torch.float32, 0.05, 2, False, torch.int64),  # flat rows, fewer rows than a block
])
def test_matches_reference(rows, vocab, hidden, dtype, scale, splits, with_soft, seed_dtype):
    """Catches a wrong online rescale (entropy, soft), W kept relative to a stale max, argmax or
    draw taken from the wrong tile or split, masked rows/ids/H columns leaking in, the softcap
    or the temperature applied in the wrong place, and noise that differs from the reference's."""
    h, e, t, seeds = make_inputs(rows, vocab, hidden, dtype, scale, seed_dtype=seed_dtype)
    got = fused_row_stats(h, e, SOFTCAP, t, seeds, with_soft, splits=splits, **SMALL)
    want = reference(h, e, t, seeds, with_soft)
    assert torch.equal(got.argmax, want.argmax)
    assert torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-4)
    if not with_soft:
        assert got.soft is None and want.soft is None
        return
    atol = 1e-4 if dtype == torch.float32 else 2**-8 * e.float().abs().max()
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=float(atol))


def test_draws_do_not_depend_on_tiling_or_batch():
    """Catches RNG streams keyed by tile, split or row position: a seeded request must draw the
    same tokens whatever the tile sizes and whichever requests share its pass."""
    h, e, t, seeds = make_inputs(20, 300, 32, torch.float32, 1.0, seed=3)
    a = fused_row_stats(h, e, SOFTCAP, t, seeds, False, block_n=16, block_v=32, block_h=32, splits=1)
    b = fused_row_stats(h[7:], e, SOFTCAP, t[7:], seeds[7:], False, block_n=32, block_v=64, block_h=16,
                        splits=4)
    assert torch.equal(a.sample[7:], b.sample)
    assert torch.equal(a.argmax[7:], b.argmax)


@pytest.mark.parametrize("splits", [1, 3])
def test_argmax_ties_take_the_first_id(splits):
    """Catches `>=` across tiles or splits and last-index tie breaks within a tile: torch.argmax
    (and so the reference and transformers) commits the lowest of equal-logit ids."""
    gen = torch.Generator().manual_seed(5)
    e = torch.randint(-2, 3, (300, 16), generator=gen).float()  # integer dots: ties are exact
    h = torch.randint(-2, 3, (3, 16), generator=gen).float()
    # Tiles 0, 1, 1, 3, 4 at block_v=64; with 3 splits: 0, 0, 0, 1, 2.
    e[[40, 70, 100, 200, 290]] = h[0] * 3
    t, seeds = torch.full((3,), 0.5), torch.arange(3)
    got = fused_row_stats(h, e, SOFTCAP, t, seeds, False, splits=splits, **SMALL)
    want = reference(h, e, t, seeds, False)
    assert int(got.argmax[0]) == 40
    assert torch.equal(got.argmax, want.argmax)


def test_sample_frequencies_match_softmax():
    """Catches a biased draw (Gumbel sign or transform wrong, temperature ignored, padded ids
    drawn). 4096 seeds sample one row over 8 ids; Pearson's chi-square (7 degrees of freedom)
    must have p > 1e-4, a bound a correct sampler fails for 1 seed set in 10^4 (the seeds are
    fixed, so the test is deterministic). The same counts against softmax at temperature 1 must
    fail it, showing the test can see a wrong temperature."""
    n, logits, temperature = 4096, torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0, 2.0, 0.2, -0.5]), 0.6
    e = torch.zeros(8, 16)
    e[:, 0] = logits
    h = torch.zeros(n, 16)
    h[:, 0] = 1.0
    seeds = torch.arange(n) * 7919 + 11
    got = fused_row_stats(h, e, SOFTCAP, torch.full((n,), temperature), seeds, False,
                          block_n=64, block_v=16, block_h=16, num_warps=4)
    counts = torch.bincount(got.sample, minlength=8).double()
    assert counts.shape == (8,)  # no padded id (8..15) was drawn

    def p_value(probs):
        expected = n * probs.double()
        chi2 = ((counts - expected) ** 2 / expected).sum()
        return float(torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64), chi2 / 2))

    capped = torch.tanh(logits / SOFTCAP) * SOFTCAP
    assert p_value(torch.softmax(capped / temperature, 0)) > 1e-4
    assert p_value(torch.softmax(capped, 0)) < 1e-4


class _PoisonAndRecord(TorchDispatchMode):
    """Fills every fresh torch.empty with NaN (floats) or -7 (ints) and records the size of every
    new tensor (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            out.fill_(float("nan") if out.is_floating_point() else -7)
        if all(r.alias_info is None for r in func._schema.returns):  # a new tensor, not a view or in-place
            for t in out if isinstance(out, (tuple, list)) else (out,):
                self.numels.append(t.numel() if isinstance(t, torch.Tensor) else 0)
        return out


@pytest.mark.parametrize("splits", [1, 2])
def test_poisoned_buffers_are_overwritten_and_nothing_vocab_sized_is_allocated(splits):
    """Catches an output row, split partial or soft column the kernel leaves unwritten (NaN or
    -7 would surface), an uninitialised soft accumulator, and any [N, V] temporary: the launcher
    may allocate its outputs and the splits' partials, O(splits * N * H), never O(N * V)."""
    rows, vocab, hidden = 37, 1000, 32
    h, e, t, seeds = make_inputs(rows, vocab, hidden, torch.float32, 1.0, seed=9)
    with _PoisonAndRecord() as mode:
        got = fused_row_stats(h, e, SOFTCAP, t, seeds, True, splits=splits, **SMALL)
    assert isinstance(got, RowStats)
    assert got.argmax.shape == got.sample.shape == got.entropy.shape == (rows,)
    assert got.argmax.dtype == got.sample.dtype == torch.int64 and got.entropy.dtype == torch.float32
    assert got.soft.shape == (rows, hidden) and got.soft.dtype == torch.float32
    assert max(mode.numels) <= splits * rows * hidden < rows * vocab
    assert bool(((got.argmax >= 0) & (got.argmax < vocab) & (got.sample >= 0) & (got.sample < vocab)).all())
    assert bool(got.entropy.isfinite().all() and got.soft.isfinite().all())
    want = reference(h, e, t, seeds, True)
    assert torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=1e-4)


def test_launcher_rejects_mismatched_inputs():
    """Catches a transposed [H, V] embedding view or mixed dtypes reaching the kernel, which
    would read the wrong elements silently."""
    h, e, t, seeds = make_inputs(4, 64, 32, torch.float32, 1.0)
    with pytest.raises(AssertionError):
        fused_row_stats(h, e.T.contiguous().T, SOFTCAP, t, seeds, False, **SMALL)
    with pytest.raises(AssertionError):
        fused_row_stats(h, e.bfloat16(), SOFTCAP, t, seeds, False, **SMALL)
    with pytest.raises(AssertionError):
        fused_row_stats(h, e, SOFTCAP, t, seeds.float(), False, **SMALL)


def test_draws_the_same_tokens_as_the_torch_path():
    """Catches the two samplers drifting apart (noise keyed differently, a different tie rule):
    the denoise loop uses this kernel on CUDA and the torch one elsewhere, and a seeded request
    must draw the same tokens on both."""
    h, e, t, keys = make_inputs(33, 700, 32, torch.float32, 2.0, seed=4)
    got = fused_row_stats(h, e, SOFTCAP, t, keys, True, splits=2, **SMALL)
    want = vocab_tiled_row_stats(h, e, SOFTCAP, t, keys, True, row_chunk=16, vocab_chunk=256)
    assert torch.equal(got.argmax, want.argmax) and torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_soft_variant_matches_the_kernel(dtype):
    """Catches a wrong log-normaliser (probabilities not summing to one), row or vocabulary
    chunks skipped or counted twice, and a temperature applied to the wrong rows in the
    GEMM-soft path; its argmax, draws and entropy are the kernel's."""
    h, e, t, keys = make_inputs(37, 1000, 32, dtype, 3.0, seed=6)
    got = fused_stats_gemm_soft(h, e, SOFTCAP, t, keys, True, vocab_chunk=300, row_chunk=16)
    kernel = fused_row_stats(h, e, SOFTCAP, t, keys, False, **SMALL)
    want = reference(h, e, t, keys, True)
    assert torch.equal(got.argmax, kernel.argmax) and torch.equal(got.sample, kernel.sample)
    torch.testing.assert_close(got.entropy, kernel.entropy, rtol=1e-5, atol=1e-5)  # other tiles, same sums
    atol = 1e-4 if dtype == torch.float32 else 2**-8 * e.float().abs().max()
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=float(atol))
    assert fused_stats_gemm_soft(h, e, SOFTCAP, t, keys, False).soft is None
