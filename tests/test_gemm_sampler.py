"""The CUDA sampler (GEMMs + the chunk statistics kernel) against its materialising reference,
on CPU in Triton's interpreter.

Tolerances, against `naive_row_stats` on fp32 copies of the inputs (fp32 logits materialised):
- argmax and sample: exactly equal (same fp32 products, same Philox draws; a near-tie closer
  than the summation-order difference, ~1e-6, is improbable at these sizes);
- entropy: atol = rtol = 1e-4 (only the summation order differs);
- soft, fp32 inputs: atol 1e-4;
- soft, bf16 inputs: P is rounded to bf16 for P @ E, as flash attention does: each term is off
  by at most 2^-9 relative, so |error| <= 2^-9 * max|E| (2^-8 is asserted).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from diffusiongemma_vllm.kernels.fixed_order_gemm import fixed_order_mm  # noqa: E402
from diffusiongemma_vllm.kernels.gemm_sampler import gemm_row_stats  # noqa: E402
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import naive_row_stats, vocab_tiled_row_stats  # noqa: E402
from diffusiongemma_vllm.denoise.noise import vocab_uniform  # noqa: E402

TINY = dict(block=64, num_warps=4)  # interpreter-sized steps
SOFTCAP = 30.0


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




@pytest.mark.parametrize("rows, vocab, hidden, dtype, scale, block_elements, with_soft, seed_dtype", [
    (37, 1000, 32, torch.float32, 1.0, 16 * 300, True, torch.int64),  # 3 row chunks x 4 vocab chunks, ragged
    (37, 1000, 64, torch.bfloat16, 3.0, 16 * 300, True, torch.int64),  # bf16: P rounded, fp32 GEMM output
    (21, 777, 48, torch.float32, 6.0, 1 << 20, True, torch.int32),  # one chunk; saturated softcap, peaked rows
    (5, 300, 32, torch.float32, 0.05, 5 * 100, False, torch.int64),  # flat rows, stats only
])
def test_matches_reference(rows, vocab, hidden, dtype, scale, block_elements, with_soft, seed_dtype):
    """Catches a wrong running-max rescale of soft across chunks (scale, final normaliser), chunk
    partials merged with the wrong weights, ids offset by the wrong chunk start, padded columns
    or rows leaking in, and noise that differs from the reference's."""
    h, e, t, keys = make_inputs(rows, vocab, hidden, dtype, scale, seed_dtype=seed_dtype)
    got = gemm_row_stats(h, e, SOFTCAP, t, keys, with_soft, block_elements=block_elements, min_vocab_chunk=100,
                         **TINY)
    want = reference(h, e, t, keys, with_soft)
    assert torch.equal(got.argmax, want.argmax)
    assert torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-4)
    if not with_soft:
        assert got.soft is None
        return
    atol = 1e-4 if dtype == torch.float32 else 2**-8 * e.float().abs().max()
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=float(atol))


def test_draws_the_same_tokens_as_the_torch_path():
    """Catches the CUDA sampler drifting from the torch one (noise keyed by chunk, Philox words
    in the wrong order, another tie rule): a seeded request must draw the same tokens whichever
    sampler its device uses."""
    h, e, t, keys = make_inputs(33, 700, 32, torch.float32, 2.0, seed=4)
    got = gemm_row_stats(h, e, SOFTCAP, t, keys, True, block_elements=16 * 256, min_vocab_chunk=64, **TINY)
    want = vocab_tiled_row_stats(h, e, SOFTCAP, t, keys, True, row_chunk=16, vocab_chunk=256)
    assert torch.equal(got.argmax, want.argmax) and torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=1e-4)


def test_draws_do_not_depend_on_chunking_or_batch():
    """Catches noise keyed by chunk or row position: the same rows in another batch, cut into
    other chunks, must draw the same tokens."""
    h, e, t, keys = make_inputs(20, 300, 32, torch.float32, 1.0, seed=3)
    a = gemm_row_stats(h, e, SOFTCAP, t, keys, False, block_elements=20 * 300, **TINY)
    b = gemm_row_stats(h[7:], e, SOFTCAP, t[7:], keys[7:], False, block_elements=4 * 68, min_vocab_chunk=68,
                       block=32, num_warps=4)
    assert torch.equal(a.sample[7:], b.sample) and torch.equal(a.argmax[7:], b.argmax)


def test_batch_invariant_settings_make_a_row_independent_of_its_batch():
    """Catches chunk boundaries that follow the batch, or products whose rounding does, under
    vLLM's batch-invariant mode: with a fixed `vocab_chunk` and the fixed-order GEMM (what
    `row_stats_for(..., batch_invariant=True)` passes), a row's statistics must be
    bit-identical alone and among 40 rows. The default chunking, which narrows with the rows,
    must differ, or this test could not see the difference."""
    h, e, t, keys = make_inputs(40, 700, 32, torch.float32, 1.0, seed=11)
    # Default chunk: 700 wide alone, 64 in the batch.
    sizes = dict(block_elements=40 * 64, min_vocab_chunk=16, matmul=fixed_order_mm, **TINY)

    def alone_and_batched(vocab_chunk):
        alone = gemm_row_stats(h[:2], e, SOFTCAP, t[:2], keys[:2], True, vocab_chunk=vocab_chunk, **sizes)
        batched = gemm_row_stats(h, e, SOFTCAP, t, keys, True, vocab_chunk=vocab_chunk, **sizes)
        return [torch.equal(getattr(alone, field), getattr(batched, field)[:2])
                for field in ("argmax", "sample", "entropy", "soft")]

    assert alone_and_batched(128) == [True] * 4
    assert alone_and_batched(None)[2:] == [False, False]


def test_argmax_ties_take_the_first_id():
    """Catches `>=` within a step or across chunks: torch.argmax (the reference, transformers)
    commits the lowest of equal-logit ids."""
    gen = torch.Generator().manual_seed(5)
    e = torch.randint(-2, 3, (300, 16), generator=gen).float()  # integer dots: ties are exact
    h = torch.randint(-2, 3, (3, 16), generator=gen).float()
    e[[40, 70, 100, 200, 290]] = h[0] * 3  # chunks of 100: ids 40 and 70 share a chunk and a step
    t, keys = torch.full((3,), 0.5), torch.arange(3)
    got = gemm_row_stats(h, e, SOFTCAP, t, keys, False, block_elements=300, min_vocab_chunk=100, **TINY)
    assert int(got.argmax[0]) == 40
    assert torch.equal(got.argmax, naive_row_stats(h, e, SOFTCAP, t, keys, False).argmax)


def test_sample_frequencies_match_softmax():
    """Catches a biased draw (Gumbel sign or transform wrong, temperature ignored, padded ids
    drawn). 1024 seeds sample one row over 8 ids; Pearson's chi-square (7 degrees of freedom)
    must have p > 1e-4, a bound a correct sampler fails for 1 seed set in 10^4 (the seeds are
    fixed, so the test is deterministic). The same counts against softmax at temperature 1 must
    fail it, showing the test can see a wrong temperature."""
    n, logits, temperature = 1024, torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0, 2.0, 0.2, -0.5]), 0.6
    e = torch.zeros(8, 16)
    e[:, 0] = logits
    h = torch.zeros(n, 16)
    h[:, 0] = 1.0
    seeds = torch.arange(n) * 7919 + 11
    got = gemm_row_stats(h, e, SOFTCAP, torch.full((n,), temperature), seeds, False, **TINY)
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


def test_poisoned_buffers_are_overwritten_and_memory_is_bounded_by_the_block():
    """Catches a partial, scale or P entry the kernel leaves unwritten (NaN or -7 would
    surface) and any temporary larger than one logits block: memory must not grow with the
    number of rows beyond the [rows, H] outputs."""
    rows, vocab, hidden, block_elements = 37, 1000, 32, 16 * 300
    h, e, t, keys = make_inputs(rows, vocab, hidden, torch.float32, 1.0, seed=9)
    with _PoisonAndRecord() as mode:
        got = gemm_row_stats(h, e, SOFTCAP, t, keys, True, block_elements=block_elements, min_vocab_chunk=100,
                             **TINY)
    assert max(mode.numels) <= max(block_elements, rows * hidden) < rows * vocab
    assert got.soft.shape == (rows, hidden) and got.soft.dtype == torch.float32
    assert bool(got.entropy.isfinite().all() and got.soft.isfinite().all())
    want = reference(h, e, t, keys, True)
    assert torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.soft, want.soft, rtol=0, atol=1e-4)


def test_rejects_mismatched_inputs():
    """Catches a transposed embedding view, mixed dtypes or float keys reaching the kernel,
    which would read the wrong elements silently."""
    h, e, t, keys = make_inputs(4, 64, 32, torch.float32, 1.0)
    for bad in ((h, e.T.contiguous().T, t, keys), (h, e.bfloat16(), t, keys), (h, e, t, keys.float())):
        with pytest.raises(AssertionError):
            gemm_row_stats(bad[0], bad[1], SOFTCAP, bad[2], bad[3], False, **TINY)
