"""Constrained reads (`diffusion_constrained`, denoise/loop.py `Unembedding.restricted`) against
materialised references: the softmax over the allowed ids, as if every other logit were -inf.

The sampler's statistics, its logprobs and the denoise loop, on one rank and over vocabulary
slices merged across thread ranks (tests/test_vocab_shards.py's `ThreadRanks`), including a
rank whose slice holds none of the allowed ids. The engine against transformers masked the
same way: tests/test_canvas_options.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

from diffusiongemma_vllm.denoise.loop import CanvasJob, Unembedding, denoise_canvases
from diffusiongemma_vllm.denoise.noise import gumbel_noise
from diffusiongemma_vllm.kernels.fixed_order_gemm import fixed_order_mm
from diffusiongemma_vllm.kernels.gemm_sampler import INVARIANT_VOCAB_CHUNK, gemm_row_stats
from diffusiongemma_vllm.kernels.top_logprobs import top_logprobs
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import vocab_tiled_row_stats
from diffusiongemma_vllm.model.config import SamplerConfig
from tests.test_vocab_shards import SOFTCAP, ThreadRanks, inputs, slices

VOCAB = 200
ALLOWED = (150, 3, 77, 3, 199, 0, 101)  # unsorted, one repeated: the read is over the 6 distinct ids
IDS = torch.tensor(sorted(set(ALLOWED)))


def masked_logits(hidden, embedding, temperature=None, allowed=ALLOWED):
    """softcap(h . E) / T with every logit outside `allowed` at -inf: [N, V]."""
    z = torch.tanh((hidden @ embedding.T) / SOFTCAP) * SOFTCAP
    if temperature is not None:
        z = z / temperature[:, None]
    keep = torch.zeros(z.shape[1], dtype=torch.bool)
    keep[list(allowed)] = True
    return z.masked_fill(~keep, float("-inf"))


def check_against_masked_softmax(stats, hidden, embedding, temperature, keys, allowed=ALLOWED):
    ids = torch.tensor(sorted(set(allowed)))
    z = masked_logits(hidden, embedding, temperature, allowed)
    probs = torch.softmax(z, -1)
    assert torch.equal(stats.argmax, z.argmax(-1))
    # The draw: Gumbel-max over the allowed ids, the noise of id ids[j] keyed by j.
    drawn = z[:, ids] + gumbel_noise(keys, 0, len(ids))
    assert torch.equal(stats.sample, ids[drawn.argmax(-1)])
    entropy = -(probs[:, ids] * torch.log(probs[:, ids])).sum(-1)
    torch.testing.assert_close(stats.entropy, entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.soft, probs @ embedding, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row_stats", [
    vocab_tiled_row_stats,
    lambda *args, **kwargs: gemm_row_stats(*args, block_elements=12 * 64, min_vocab_chunk=4, block=64, num_warps=1,
                                           **kwargs),
    lambda *args, **kwargs: gemm_row_stats(*args, vocab_chunk=INVARIANT_VOCAB_CHUNK, matmul=fixed_order_mm, block=64,
                                           num_warps=1, **kwargs),
], ids=["vocab_tiled", "gemm_interpreted", "gemm_batch_invariant"])
@pytest.mark.parametrize("allowed", [ALLOWED, (42,), (7, 3, 199)], ids=["six", "one", "three"])
def test_a_restricted_read_is_the_softmax_over_the_allowed_ids(row_stats, allowed):
    """Catches ids outside the set drawn or committed, the entropy or the self-conditioning
    signal taken over the whole vocabulary, a repeated allowed id counted twice, or K-space
    picks returned as indices instead of token ids; the GEMM sampler (Triton, in the
    interpreter; also its batch-invariant form, a fixed-order GEMM over a 16384-wide chunk)
    with vocabularies of 1 to 6 ids, narrower than one chunk."""
    hidden, embedding, temperature, keys = inputs(12, VOCAB)
    restricted = Unembedding(embedding, SOFTCAP, 1.0).restricted(allowed)
    assert restricted.vocab == VOCAB and restricted.weight.shape[0] == len(set(allowed))
    stats = restricted.row_stats(row_stats, hidden, temperature, keys)
    check_against_masked_softmax(stats, hidden, embedding, temperature, keys, allowed)


def one_rank_at_a_time(*args, **kwargs):
    """The GEMM sampler for thread ranks: Triton's interpreter runs one kernel at a time."""
    with INTERPRETER:
        return gemm_row_stats(*args, block_elements=12 * 64, min_vocab_chunk=4, block=64, num_warps=1, **kwargs)


INTERPRETER = threading.Lock()


@pytest.mark.parametrize("row_stats", [vocab_tiled_row_stats, one_rank_at_a_time],
                         ids=["vocab_tiled", "gemm_interpreted"])
@pytest.mark.parametrize("bounds", [[160], [60, 120], [1, 3]], ids=["two", "three", "empty_rank"])
def test_restricted_reads_merge_across_ranks(bounds, row_stats):
    """Catches a constrained read under tensor parallelism taken from one rank's ids, noise
    keyed by a rank's local index, NaN from a rank whose slice holds none of the allowed ids
    ([1, 3]: rank 1 holds ids 1 and 2), or the GEMM sampler (the GPU's) given a slice of the
    read that starts at no multiple of 4 ([160]: rank 1's read starts at its 6th id), whose
    noise layout it cannot draw."""
    hidden, embedding, temperature, keys = inputs(12, VOCAB)
    parts = slices(VOCAB, bounds)

    def work(rank, shards):
        start, stop = parts[rank]
        whole = Unembedding(embedding[start:stop], SOFTCAP, 1.0, first_id=start, vocab_size=VOCAB, shards=shards)
        return whole.restricted(ALLOWED).row_stats(row_stats, hidden, temperature, keys)

    for stats in ThreadRanks(len(parts)).run(work):
        check_against_masked_softmax(stats, hidden, embedding, temperature, keys)


@pytest.mark.parametrize("bounds", [None, [160], [1, 3]], ids=["one_rank", "two", "empty_rank"])
def test_restricted_logprobs_are_renormalised_over_the_allowed_ids(bounds):
    """Catches a constrained read's logprobs normalised over the whole vocabulary, an allowed
    id's logprob read at its K-space index as a token id, or a token outside the set (a pinned
    seed id) given a finite logprob."""
    hidden, embedding, _, _ = inputs(10, VOCAB)
    want = torch.log_softmax(masked_logits(hidden, embedding), -1)
    tokens = want.argmax(-1)
    tokens[-1] = 5  # outside the set
    chosen = torch.tensor([[0, 199, 77, -1]] * 10)
    parts = slices(VOCAB, bounds or [])

    def work(rank, shards):
        start, stop = parts[rank]
        whole = Unembedding(embedding[start:stop], SOFTCAP, 1.0, first_id=start, vocab_size=VOCAB,
                            shards=shards if bounds else None)
        read = whole.restricted(ALLOWED)
        return top_logprobs(hidden, read.weight, SOFTCAP, read.read_ids(tokens), 0, vocab_chunk=4,
                            first_id=read.first_id, shards=read.shards, chosen_ids=read.read_ids(chosen))

    for got in ThreadRanks(len(parts)).run(work):
        torch.testing.assert_close(got.token_logprob[:-1], want.gather(1, tokens[:-1, None])[:, 0])
        assert got.token_logprob[-1] == float("-inf")
        assert torch.equal(got.rank[:-1], torch.ones(9, dtype=torch.long))
        torch.testing.assert_close(got.chosen_logprobs[:, :3], want[:, [0, 199, 77]])
        assert (got.chosen_logprobs[:, 3] == float("-inf")).all()


def test_a_constrained_canvas_commits_allowed_ids_and_renoises_from_the_whole_vocabulary():
    """Catches a constrained canvas committing or accepting an id outside its set, or
    re-noised from the set (vLLM draws re-noise from the whole vocabulary: the model was
    trained on that noise); and a constrained loop over slices parting from one rank's."""
    vocab, width, length = VOCAB, 16, 8
    gen = torch.Generator().manual_seed(5)
    table, mix = torch.randn(vocab, width, generator=gen), torch.randn(width, width, generator=gen) * 0.3
    embedding = torch.randn(vocab, width, generator=gen)

    def run_pass(rows, canvas, soft):
        return torch.tanh(table[canvas] + soft @ mix) * 4

    jobs = [CanvasJob(0, SamplerConfig().with_request_overrides({"max_denoising_steps": 10}), seed) for seed in (1, 2)]
    canvases = []
    want = denoise_canvases(jobs, length, run_pass, Unembedding(embedding, SOFTCAP, 1.0).restricted(ALLOWED),
                            record=True, on_pass=lambda batch, slots: canvases.append(batch.canvas.clone()))
    allowed = set(ALLOWED)
    assert set(want.tokens.flatten().tolist()) <= allowed
    for record, canvas in zip(want.records, canvases):
        assert set(record.argmax.flatten().tolist()) <= allowed
        live = ~record.halted
        assert set(canvas[live][record.accepted[live]].tolist()) <= allowed
    assert any(set(canvas.flatten().tolist()) - allowed for canvas in canvases[:-1]), "re-noise never left the set"
    parts = slices(vocab, [1, 3, 160])

    def work(rank, shards):
        start, stop = parts[rank]
        whole = Unembedding(embedding[start:stop], SOFTCAP, 1.0, first_id=start, vocab_size=vocab, shards=shards)
        return denoise_canvases(jobs, length, run_pass, whole.restricted(ALLOWED))

    for got in ThreadRanks(len(parts)).run(work):
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.passes, want.passes)
