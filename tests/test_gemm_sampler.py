"""The GEMM sampler (chunk statistics kernel + matrix products) against its reference, on CPU
in Triton's interpreter.

Tolerances against `naive_row_stats` on fp32 copies of the inputs, as for the fused kernel
(tests/test_fused_sampler.py): equal argmax and draws, entropy to 1e-4, soft to 1e-4 with fp32
inputs and to 2^-8 max|E| with bf16 ones (P is rounded to bf16 before P @ E).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.fused_sampler import fused_row_stats  # noqa: E402
from diffusiongemma_vllm.kernels.gemm_sampler import gemm_row_stats  # noqa: E402
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import naive_row_stats, vocab_tiled_row_stats  # noqa: E402
from tests.test_fused_sampler import SMALL, SOFTCAP, _PoisonAndRecord, make_inputs, reference  # noqa: E402

TINY = dict(block=64, num_warps=4)  # interpreter-sized steps


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


def test_draws_the_same_tokens_as_the_other_samplers():
    """Catches the CUDA default drifting from the torch path and the fused kernel (noise keyed
    by chunk, Philox words in the wrong order, another tie rule): a seeded request must draw the
    same tokens whichever sampler its device uses."""
    h, e, t, keys = make_inputs(33, 700, 32, torch.float32, 2.0, seed=4)
    got = gemm_row_stats(h, e, SOFTCAP, t, keys, True, block_elements=16 * 256, min_vocab_chunk=64, **TINY)
    for other in (vocab_tiled_row_stats(h, e, SOFTCAP, t, keys, True, row_chunk=16, vocab_chunk=256),
                  fused_row_stats(h, e, SOFTCAP, t, keys, True, splits=2, **SMALL)):
        assert torch.equal(got.argmax, other.argmax) and torch.equal(got.sample, other.sample)
        torch.testing.assert_close(got.entropy, other.entropy, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.soft, other.soft, rtol=0, atol=1e-4)


def test_draws_do_not_depend_on_chunking_or_batch():
    """Catches noise keyed by chunk or row position: the same rows in another batch, cut into
    other chunks, must draw the same tokens."""
    h, e, t, keys = make_inputs(20, 300, 32, torch.float32, 1.0, seed=3)
    a = gemm_row_stats(h, e, SOFTCAP, t, keys, False, block_elements=20 * 300, **TINY)
    b = gemm_row_stats(h[7:], e, SOFTCAP, t[7:], keys[7:], False, block_elements=4 * 68, min_vocab_chunk=68,
                       block=32, num_warps=4)
    assert torch.equal(a.sample[7:], b.sample) and torch.equal(a.argmax[7:], b.argmax)


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
