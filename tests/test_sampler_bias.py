"""Logit biases inside the samplers (vocab-tiled, materialising, and the CUDA one in Triton's
interpreter) against statistics computed here from the materialised biased logits
z = (softcap(h . E) + b) / T: what transformers' logits processors and vLLM's logit bias and
bans do to the distribution a pass samples, accepts and self-conditions on."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusiongemma_vllm.denoise.noise import gumbel_noise  # noqa: E402
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import (BANNED, SparseBias, naive_row_stats,  # noqa: E402
                                                             vocab_tiled_row_stats)

SOFTCAP = 30.0
ROWS, VOCAB, HIDDEN = 24, 600, 32


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(ROWS, HIDDEN, generator=gen) * 2
    e = torch.randn(VOCAB, HIDDEN, generator=gen)
    t = torch.rand(ROWS, generator=gen) * 0.4 + 0.4
    keys = torch.randint(0, 2**62, (ROWS,), generator=gen)
    return h, e, t, keys


def biases(h, e):
    """Every row's argmax banned, a +8 on id 5 in rows 0-5 given as two entries that add, a -3
    on ids spread over the vocabulary chunks, and rows 20-23 untouched."""
    argmax = (h @ e.T).argmax(-1)
    rows = list(range(20)) + [0, 1, 2, 3, 4, 5] * 2 + [r for r in range(6, 20) for _ in range(3)]
    ids = argmax[:20].tolist() + [5] * 12 + [(97 * r + 150 * j) % VOCAB for r in range(6, 20) for j in range(3)]
    values = [BANNED] * 20 + [4.0] * 12 + [-3.0] * 42
    return SparseBias(torch.tensor(rows), torch.tensor(ids), torch.tensor(values)), argmax


def expected(h, e, t, keys, bias: SparseBias):
    dense = torch.zeros(ROWS, VOCAB)
    for row, token, value in zip(bias.rows.tolist(), bias.ids.tolist(), bias.values.tolist()):
        dense[row, token] += value
    z = (torch.tanh(h @ e.T / SOFTCAP) * SOFTCAP + dense) / t[:, None]
    p = torch.softmax(z, -1)
    entropy = -(p * torch.log_softmax(z, -1)).sum(-1)
    drawn = (z + gumbel_noise(keys, 0, VOCAB)).argmax(-1)
    return z.argmax(-1), drawn, entropy, p @ e


def gemm():
    triton = pytest.importorskip("triton")
    del triton
    from diffusiongemma_vllm.kernels.gemm_sampler import gemm_row_stats

    # 4 row chunks x 5 vocabulary chunks: entries land in chunks other than the first.
    return functools.partial(gemm_row_stats, block_elements=8 * 128, min_vocab_chunk=128, block=64, num_warps=4)


@pytest.mark.parametrize("sampler", ["naive", "vocab_tiled", "gemm"])
def test_biases_shift_every_statistic(sampler):
    """Catches a bias added after the temperature or before the softcap, entries dropped at a
    row or vocabulary chunk boundary, repeated entries overwriting instead of adding, and a ban
    that a draw or the argmax can still pick or that turns the entropy or soft signal into NaN."""
    row_stats = {"naive": naive_row_stats, "vocab_tiled": functools.partial(vocab_tiled_row_stats, row_chunk=7,
                                                                            vocab_chunk=128), "gemm": None}[sampler]
    row_stats = row_stats or gemm()
    h, e, t, keys = inputs()
    bias, unbiased_argmax = biases(h, e)
    got = row_stats(h, e, SOFTCAP, t, keys, True, bias=bias)
    argmax, drawn, entropy, soft = expected(h, e, t, keys, bias)
    assert torch.equal(got.argmax, argmax) and torch.equal(got.sample, drawn)
    torch.testing.assert_close(got.entropy, entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.soft, soft, rtol=1e-4, atol=1e-4)
    assert not (got.argmax[:20] == unbiased_argmax[:20]).any() and not (got.sample[:20] == unbiased_argmax[:20]).any()
    plain = row_stats(h, e, SOFTCAP, t, keys, True)
    assert torch.equal(got.argmax[20:], plain.argmax[20:]) and torch.equal(got.sample[20:], plain.sample[20:])
    assert (got.sample[:6] == 5).sum() > (plain.sample[:6] == 5).sum()  # +8 on id 5 shows


def test_a_slice_of_the_vocabulary_takes_the_entries_inside_it():
    """Catches a tensor-parallel rank applying entries by their id within its slice instead of
    the whole vocabulary's: a slice from id 256 must see exactly the entries of ids 256.."""
    h, e, t, keys = inputs(1)
    bias, _ = biases(h, e)
    whole = naive_row_stats(h, e, SOFTCAP, t, keys, True, bias=bias)
    part = vocab_tiled_row_stats(h, e[256:], SOFTCAP, t, keys, True, vocab_chunk=100, first_id=256, bias=bias)
    want = naive_row_stats(h, e[256:], SOFTCAP, t, keys, True, first_id=256, bias=bias)
    assert torch.equal(part.argmax, want.argmax) and torch.equal(part.sample, want.sample)
    torch.testing.assert_close(part.log_norm, want.log_norm, rtol=1e-5, atol=1e-5)
    z = (torch.tanh(h @ e[256:].T / SOFTCAP) * SOFTCAP) / t[:, None]
    assert not torch.allclose(want.log_norm, torch.logsumexp(z, -1))  # entries inside the slice apply
    assert whole.log_norm.shape == part.log_norm.shape


def test_block_is_none_when_no_entry_falls_inside():
    bias = SparseBias(torch.tensor([3]), torch.tensor([40]), torch.tensor([1.0]))
    assert bias.block(0, 3, 0, 100) is None and bias.block(0, 4, 41, 100) is None
    assert bias.block(2, 2, 0, 64)[1, 40] == 1.0
