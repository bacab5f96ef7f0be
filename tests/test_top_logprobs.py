"""kernels/top_logprobs.py against the materialised reference."""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.kernels.top_logprobs import naive_top_logprobs, top_logprobs


def inputs(rows: int, vocab: int, width: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen).to(dtype)
    embedding = (torch.randn(vocab, width, generator=gen) / width ** 0.5).to(dtype)
    return hidden, embedding


@pytest.mark.parametrize("rows, vocab, chunk, k", [(7, 300, 64, 5), (33, 1000, 1000, 0), (5, 97, 13, 20),
                                                   (3, 50, 7, 50), (16, 4096, 1024, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_materialised_logits(rows, vocab, chunk, k, dtype):
    """Catches an online logsumexp or top-k merge that drifts across vocabulary chunks (odd
    chunk counts, k of 0, k equal to the vocabulary, a chunk smaller than k), a token
    logprob read from the wrong chunk, or rows lost or misordered across row chunks (three
    rows per block here, so most cases split their rows, with a shorter last chunk)."""
    hidden, embedding = inputs(rows, vocab, 48, dtype)
    reference_tokens = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    for tokens in (naive_top_logprobs(hidden, embedding, 30.0, reference_tokens, 1).top_ids[:, 0], reference_tokens):
        got = top_logprobs(hidden, embedding, 30.0, tokens, k, vocab_chunk=chunk, block_elements=3 * chunk)
        want = naive_top_logprobs(hidden, embedding, 30.0, tokens, k)
        torch.testing.assert_close(got.token_logprob, want.token_logprob, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=1e-5, rtol=1e-5)
        if dtype == torch.float32:
            assert torch.equal(got.top_ids, want.top_ids)
        else:  # bf16 inputs make exact ties, ordered either way: each id must carry its value
            every = torch.log_softmax(torch.tanh((hidden @ embedding.T).float() / 30.0) * 30.0, -1)
            torch.testing.assert_close(every.gather(1, got.top_ids), want.top_logprobs, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.rank, want.rank)


def test_argmax_ranks_first_and_random_tokens_rank_exactly():
    """Catches ranks counted only within the kept top-k (a token outside it must still get its
    exact rank over the whole vocabulary) or an argmax not ranked 1."""
    hidden, embedding = inputs(9, 700, 32)
    argmax = naive_top_logprobs(hidden, embedding, 30.0, torch.zeros(9, dtype=torch.long), 1).top_ids[:, 0]
    assert top_logprobs(hidden, embedding, 30.0, argmax, 0, vocab_chunk=100).rank.tolist() == [1] * 9
    worst = (hidden @ embedding.T).argmin(-1)
    assert top_logprobs(hidden, embedding, 30.0, worst, 3, vocab_chunk=100).rank.tolist() == [700] * 9


def test_an_argmax_without_ties_needs_no_second_sweep(monkeypatch):
    """Catches every row swept twice when no alternatives are asked for (`logprob_token_ids`
    requests, constrained reads): a committed argmax is ranked from the kept top."""
    from diffusiongemma_vllm.kernels import top_logprobs as module

    hidden, embedding = inputs(9, 700, 32)
    argmax = naive_top_logprobs(hidden, embedding, 30.0, torch.zeros(9, dtype=torch.long), 1).top_ids[:, 0]
    products = []
    counting = module.softcapped_logits
    monkeypatch.setattr(module, "softcapped_logits", lambda *args: products.append(1) or counting(*args))
    assert top_logprobs(hidden, embedding, 30.0, argmax, 0, vocab_chunk=100).rank.tolist() == [1] * 9
    assert len(products) == 7  # one sweep of the 7 chunks


def test_ties_count_every_equal_logit():
    """Catches ties at the edge of the kept top being undercounted (vLLM's rank counts every
    logit >= the token's)."""
    hidden = torch.ones(2, 4)
    embedding = torch.zeros(10, 4)
    embedding[3] = 0.5  # one best id; the other nine tie
    result = top_logprobs(hidden, embedding, 30.0, torch.tensor([3, 7]), 1, vocab_chunk=4)
    assert result.rank.tolist() == [1, 10]
    assert result.top_ids[:, 0].tolist() == [3, 3]


def test_logprobs_of_all_ids_sum_to_one():
    """Catches a wrong normaliser (log Z from a partial vocabulary or without the softcap)."""
    hidden, embedding = inputs(4, 64, 16)
    result = top_logprobs(hidden, embedding, 5.0, torch.zeros(4, dtype=torch.long), 64, vocab_chunk=10)
    torch.testing.assert_close(result.top_logprobs.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("chunk", [7, 64, 300])
def test_chosen_ids_match_materialised_logits(chunk):
    """Catches a chosen id's logprob read from the wrong chunk (ids across chunk boundaries,
    the first and last ids), normalised apart from the committed token's, or padding (-1)
    reported as a value: vLLM's `logprob_token_ids`."""
    hidden, embedding = inputs(6, 300, 48)
    tokens = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 299, 150, 7], [6, 7, 8, -1], [63, 64, 65, -1], [1, -1, -1, -1], [299, 0, 1, 2],
                        [-1, -1, -1, -1]])
    got = top_logprobs(hidden, embedding, 30.0, tokens, 2, vocab_chunk=chunk, block_elements=2 * chunk, chosen_ids=ids)
    want = naive_top_logprobs(hidden, embedding, 30.0, tokens, 2, chosen_ids=ids)
    assert torch.equal(torch.isinf(got.chosen_logprobs), ids < 0)
    torch.testing.assert_close(got.chosen_logprobs, want.chosen_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logprob, want.token_logprob, atol=1e-5, rtol=1e-5)
    assert top_logprobs(hidden, embedding, 30.0, tokens, 2).chosen_logprobs.shape == (6, 0)
