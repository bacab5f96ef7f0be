"""The sampler and logprobs under tensor parallelism: vocabulary slices merged across ranks.

Each simulated rank runs in its own thread with its slice of the embedding and collectives
that really exchange the ranks' tensors (`ThreadRanks`), so the merge code runs as it does
on each rank of an engine. Slices are uneven, as vLLM's padded shards leave the last rank.
References: the same function over the whole vocabulary, and the materialising references.
"""

from __future__ import annotations

import threading

import pytest
import torch

from diffusiongemma_vllm.denoise.loop import CanvasJob, Unembedding, denoise_canvases
from diffusiongemma_vllm.denoise.vocab_shards import VocabShards, merge_row_stats
from diffusiongemma_vllm.kernels.gemm_sampler import gemm_row_stats
from diffusiongemma_vllm.kernels.top_logprobs import naive_top_logprobs, top_logprobs
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import naive_row_stats, vocab_tiled_row_stats
from diffusiongemma_vllm.model.config import SamplerConfig

SOFTCAP = 30.0


class ThreadRanks:
    """Collectives among `ranks` threads: every rank contributes, every rank gets the result."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.barrier = threading.Barrier(ranks)
        self.slots: list[torch.Tensor | None] = [None] * ranks

    def _exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return everyone

    def shards(self, rank: int) -> VocabShards:
        return VocabShards(rank, self.ranks, lambda t: torch.stack(self._exchange(rank, t)),
                           lambda t: sum(self._exchange(rank, t)))

    def run(self, work) -> list:
        """work(rank, shards) in one thread per rank; each rank's result, in rank order."""
        results, errors = [None] * self.ranks, []

        def target(rank):
            try:
                results[rank] = work(rank, self.shards(rank))
            except Exception as error:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def slices(vocab: int, bounds: list[int]) -> list[tuple[int, int]]:
    edges = [0, *bounds, vocab]
    return list(zip(edges[:-1], edges[1:]))


def inputs(rows: int, vocab: int, width: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen)
    embedding = torch.randn(vocab, width, generator=gen) * 0.6
    temperature = torch.rand(rows, generator=gen) * 0.8 + 0.2
    keys = torch.randint(0, 1 << 62, (rows,), generator=gen)
    return hidden, embedding, temperature, keys


def sharded_stats(row_stats, bounds, hidden, embedding, temperature, keys, **kwargs):
    """Each rank's merged statistics. The slices' own run one after another (Triton's
    interpreter is not thread-safe); the merges run in the ranks' threads."""
    local = [row_stats(hidden, embedding[start:stop], SOFTCAP, temperature, keys, True, first_id=start, **kwargs)
             for start, stop in slices(embedding.shape[0], bounds)]
    return ThreadRanks(len(local)).run(lambda rank, shards: merge_row_stats(local[rank], shards))


def assert_same_stats(got, want):
    assert torch.equal(got.argmax, want.argmax)
    assert torch.equal(got.sample, want.sample)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.soft, want.soft, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bounds", [[256], [200, 404], [1]])
def test_merged_slices_equal_the_whole_vocabulary(bounds):
    """Catches a wrong merge of the slices' statistics: the entropy's mixture term, the soft
    signal's weights, a draw or argmax taken from the wrong slice, local ids or noise at local
    ids; also with three ranks and a one-token slice. Every rank must end with the same values."""
    hidden, embedding, temperature, keys = inputs(40, 500)
    want = vocab_tiled_row_stats(hidden, embedding, SOFTCAP, temperature, keys, True, vocab_chunk=64)
    ranks = sharded_stats(vocab_tiled_row_stats, bounds, hidden, embedding, temperature, keys, vocab_chunk=64)
    for got in ranks:
        assert_same_stats(got, want)
        assert torch.equal(got.entropy, ranks[0].entropy) and torch.equal(got.soft, ranks[0].soft)
    exact = naive_row_stats(hidden, embedding, SOFTCAP, temperature, keys, True)
    assert torch.equal(ranks[0].sample, exact.sample)
    torch.testing.assert_close(ranks[0].log_norm, exact.log_norm, rtol=1e-5, atol=1e-5)


def test_gemm_sampler_slices_merge_to_the_whole_vocabulary():
    """Catches the GEMM sampler (Triton, here in the interpreter) drawing a slice's noise at
    local ids, or reporting local ids, under tensor parallelism."""
    hidden, embedding, temperature, keys = inputs(12, 300)
    want = naive_row_stats(hidden, embedding, SOFTCAP, temperature, keys, True)
    for got in sharded_stats(gemm_row_stats, [152], hidden, embedding, temperature, keys,
                             block_elements=12 * 64, min_vocab_chunk=64, block=64, num_warps=1):
        assert_same_stats(got, want)


def test_argmax_ties_across_slices_go_to_the_lower_id():
    """Catches a tie between two slices' maxima resolved by the wrong rank: torch.argmax over
    the whole vocabulary takes the first (lowest) id, as one rank does."""
    hidden, embedding, temperature, keys = inputs(6, 64)
    embedding[40] = embedding[9] = hidden[0] * 3  # the same top logit in both slices for row 0
    want = vocab_tiled_row_stats(hidden, embedding, SOFTCAP, temperature, keys, True)
    got = sharded_stats(vocab_tiled_row_stats, [32], hidden, embedding, temperature, keys)[1]
    assert int(want.argmax[0]) == 9 and torch.equal(got.argmax, want.argmax)


@pytest.mark.parametrize("k", [0, 3, 20])
def test_sharded_logprobs_equal_the_whole_vocabulary(k):
    """Catches logprobs under tensor parallelism normalised by one slice, alternatives from one
    slice, local ids, or a rank counted over one slice: tokens include the argmax, low-ranked
    tokens (the extra sweep) and k wider than a slice."""
    hidden, embedding, _, _ = inputs(30, 100)
    z = hidden @ embedding.T
    tokens = torch.cat([z[:10].argmax(-1), z[10:20].argmin(-1), torch.randint(0, 100, (10,))])
    want = naive_top_logprobs(hidden, embedding, SOFTCAP, tokens, k)
    parts = slices(100, [60, 88])

    def work(rank, shards):
        start, stop = parts[rank]
        return top_logprobs(hidden, embedding[start:stop], SOFTCAP, tokens, k, vocab_chunk=16, first_id=start,
                            shards=shards)

    for got in ThreadRanks(len(parts)).run(work):
        torch.testing.assert_close(got.token_logprob, want.token_logprob, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.rank, want.rank)
        assert torch.equal(got.top_ids, want.top_ids)
        torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)


def test_denoise_loop_over_slices_commits_the_single_rank_tokens():
    """Catches the loop under tensor parallelism drawing canvases or re-noise from a slice's
    vocabulary instead of the whole one, or ranks halting at different passes: whole canvases
    through `denoise_canvases` with a pass whose output depends on the canvas and the soft signal."""
    vocab, width, length = 96, 16, 8
    gen = torch.Generator().manual_seed(3)
    table, mix = torch.randn(vocab, width, generator=gen), torch.randn(width, width, generator=gen) * 0.3
    embedding = torch.randn(vocab, width, generator=gen)

    def run_pass(rows, canvas, soft):
        return torch.tanh(table[canvas] + soft @ mix) * 4

    knobs = [{"max_denoising_steps": 12, "entropy_bound": 1.0}, {"max_denoising_steps": 4},
             {"stability_threshold": 0, "confidence_threshold": 100.0}]
    jobs = [CanvasJob(0, SamplerConfig().with_request_overrides(k), seed) for seed, k in enumerate(knobs)]
    want = denoise_canvases(jobs, length, run_pass, Unembedding(embedding, SOFTCAP, 1.0))
    parts = slices(vocab, [50])

    def work(rank, shards):
        start, stop = parts[rank]
        unembedding = Unembedding(embedding[start:stop], SOFTCAP, 1.0, first_id=start, vocab_size=vocab,
                                  shards=shards)
        return denoise_canvases(jobs, length, run_pass, unembedding)

    assert len(set(want.passes.tolist())) > 1, "canvases should halt at different passes"
    for got in ThreadRanks(len(parts)).run(work):
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.passes, want.passes)


def test_sharded_chosen_ids_equal_the_whole_vocabulary():
    """Catches a chosen id's logprob taken from the rank whose slice does not hold it, or
    normalised by one slice (`logprob_token_ids` under tensor parallelism)."""
    hidden, embedding, _, _ = inputs(12, 100)
    tokens = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 59, 60, 87, 88, 99]] * 6 + [[5, -1, -1, -1, -1, -1]] * 6)
    want = naive_top_logprobs(hidden, embedding, SOFTCAP, tokens, 1, chosen_ids=ids)
    parts = slices(100, [60, 88])

    def work(rank, shards):
        start, stop = parts[rank]
        return top_logprobs(hidden, embedding[start:stop], SOFTCAP, tokens, 1, vocab_chunk=16, first_id=start,
                            shards=shards, chosen_ids=ids)

    for got in ThreadRanks(len(parts)).run(work):
        torch.testing.assert_close(got.chosen_logprobs, want.chosen_logprobs, rtol=1e-5, atol=1e-5)
