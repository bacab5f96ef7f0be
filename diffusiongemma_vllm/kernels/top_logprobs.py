"""Log-probabilities of committed tokens and their top-k alternatives, tiled over the vocabulary.

What a request's `logprobs` report (README "Logprobs"): the distribution of the pass that
committed the canvas, the halting pass, at temperature 1: log softmax(softcap(h . E)) over
the whole vocabulary, with h the final hidden state of that pass at the position. The
committed token is that pass's argmax, so its rank is 1 unless the logits tie.

Materialising the logits costs rows x V fp32 (268 MB per canvas at V = 262144). Here rows
and vocabulary are walked in chunks, one rows x vocab_chunk block at a time (64 MiB by
default, as in gemm_sampler.py, so a turn of 64 canvases peaks at a few blocks, not 4 GiB),
with online statistics as in vocab_tiled_sampler.py: a running max and sum give log Z, a
running top-k (each chunk's top-k merged with the best so far) gives the alternatives, and
the committed token's logit is read from the chunk that holds it, so it is bit-identical to
the value ranked against. The rank (vLLM's: how many logits are >= the token's) is exact:
counted from a top-(k+1) (a top-2 when k is 0), plus one more sweep for the rows whose token's
logit is not above the last one kept (a token outside the top, or a tie: never for a committed
argmax without ties). Runs once per finished canvas, not per pass, with torch matmuls on any device
(cuBLAS on a GPU).

Under tensor parallelism `embedding` is this rank's slice of the vocabulary (ids from
`first_id`): each rank reduces its slice, then the slices' log Z, the token's logit (on the
rank that holds it) and top-(k+1) lists are gathered and merged, and the extra sweep's counts
are summed over the ranks (denoise/vocab_shards.py, which says why every rank ends with the same
values).

`naive_top_logprobs` materialises everything and is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from diffusiongemma_vllm.denoise.vocab_shards import VocabShards, merge_top_lists
from diffusiongemma_vllm.kernels.gemm_sampler import BLOCK_ELEMENTS, mm_fp32

VOCAB_CHUNK = 16384  # embedding rows per product: a [rows, VOCAB_CHUNK] logits block at a time


@dataclass(frozen=True)
class TopLogprobs:
    token_logprob: torch.Tensor  # [N] fp32: log p(token)
    rank: torch.Tensor  # [N] int64: 1 + how many other ids have a logit >= the token's
    top_ids: torch.Tensor  # [N, k] int64, most likely first
    top_logprobs: torch.Tensor  # [N, k] fp32
    chosen_logprobs: torch.Tensor  # [N, m] fp32: log p of each `chosen_ids` id (-inf at its -1 padding)


def softcapped_logits(hidden: torch.Tensor, embedding: torch.Tensor, softcap: float) -> torch.Tensor:
    # The products of the sampler that chose the committed argmax on this device: fp32 output
    # on CUDA (gemm_sampler.py; a bf16 product would round the logits to bf16 spacing, 0.06-0.125
    # at |z| in the tens, tying ranks and parting them from that argmax), the input dtype's
    # product elsewhere (vocab_tiled_sampler.py).
    products = mm_fp32(hidden, embedding.T) if hidden.is_cuda else (hidden @ embedding.T).float()
    return torch.tanh(products / softcap) * softcap


def naive_top_logprobs(hidden: torch.Tensor, embedding: torch.Tensor, softcap: float, tokens: torch.Tensor,
                       k: int, chosen_ids: torch.Tensor | None = None) -> TopLogprobs:
    log_probs = torch.log_softmax(softcapped_logits(hidden, embedding, softcap), dim=-1)  # [N, V]
    chosen = log_probs.gather(1, tokens[:, None]).squeeze(1)
    top = log_probs.topk(k, dim=-1)
    ids = _no_ids(tokens) if chosen_ids is None else chosen_ids
    picked = log_probs.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, float("-inf"))
    return TopLogprobs(chosen, (log_probs >= chosen[:, None]).sum(-1), top.indices, top.values, picked)


def top_logprobs(
    hidden: torch.Tensor,  # [N, H]
    embedding: torch.Tensor,  # [V, H] (the tied lm_head)
    softcap: float,
    tokens: torch.Tensor,  # [N] int64 committed ids
    k: int,  # alternatives per row, >= 0
    vocab_chunk: int = VOCAB_CHUNK,
    block_elements: int = BLOCK_ELEMENTS,  # rows x vocab_chunk of one logits block, as the sampler's
    first_id: int = 0,  # the vocabulary id of embedding row 0 (a tensor-parallel rank's slice)
    shards: VocabShards | None = None,  # the tensor-parallel ranks whose slices merge
    chosen_ids: torch.Tensor | None = None,  # [N, m] int64 ids whose log p each row also reports, -1 padded
) -> TopLogprobs:
    assert hidden.dim() == 2 and embedding.dim() == 2 and hidden.shape[1] == embedding.shape[1]
    assert tokens.shape == hidden.shape[:1] and k >= 0 and (shards is not None or k <= embedding.shape[0])
    row_chunk = max(1, block_elements // vocab_chunk)  # peak memory stays a few blocks, whatever the rows
    ids = _no_ids(tokens) if chosen_ids is None else chosen_ids
    parts = [_top_logprobs_rows(hidden[r:r + row_chunk], embedding, softcap, tokens[r:r + row_chunk], k, vocab_chunk,
                                first_id, shards, ids[r:r + row_chunk])
             for r in range(0, hidden.shape[0], row_chunk)]
    return TopLogprobs(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TopLogprobs)))


def _no_ids(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.new_zeros((tokens.shape[0], 0))


def _top_logprobs_rows(hidden, embedding, softcap: float, tokens, k: int, vocab_chunk: int, first_id: int,
                       shards: VocabShards | None, ids: torch.Tensor) -> TopLogprobs:
    rows, device = hidden.shape[0], hidden.device
    # Beyond the alternatives, one more (two with none: the argmax must stand above the last kept
    # logit): a token above the last kept logit has all its ties among the kept ones.
    keep = max(k, 1) + 1
    m = torch.full((rows,), float("-inf"), device=device)
    total = torch.zeros(rows, device=device)  # sum exp(z - m)
    chosen = torch.full((rows,), float("-inf"), device=device)
    best = torch.full((rows, 0), float("-inf"), device=device)
    best_ids = torch.zeros((rows, 0), dtype=torch.long, device=device)
    picked = torch.zeros(ids.shape, device=device)  # the logits at `ids`, each read from the chunk holding it
    for start in range(0, embedding.shape[0], vocab_chunk):
        z = softcapped_logits(hidden, embedding[start:start + vocab_chunk], softcap)  # [N, chunk]
        m_new = torch.maximum(m, z.max(-1).values)
        total = total * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
        m = m_new
        first = first_id + start
        inside = (tokens >= first) & (tokens < first + z.shape[1])
        local = (tokens - first).clamp(0, z.shape[1] - 1)
        chosen = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), chosen)
        if ids.shape[1]:
            held = (ids >= first) & (ids < first + z.shape[1])
            picked = torch.where(held, z.gather(1, (ids - first).clamp(0, z.shape[1] - 1)), picked)
        value, index = z.topk(min(keep, z.shape[1]), dim=-1)
        best, order = torch.cat([best, value], 1).topk(min(keep, best.shape[1] + value.shape[1]), dim=-1)
        best_ids = torch.cat([best_ids, index + first], 1).gather(1, order)
    log_z = m + torch.log(total)
    if shards is not None:
        log_z, chosen, best, best_ids = merge_top_lists(log_z, chosen, best, best_ids, keep, shards)
        if ids.shape[1]:  # each id's logit lives on one rank's slice; the others hold 0 for it
            picked = shards.all_reduce(picked)
    rank = (best >= chosen[:, None]).sum(-1)
    outside = (chosen <= best[:, -1]).nonzero().squeeze(-1) if best.shape[1] == keep else rank[:0]
    if len(outside):  # logits >= the token's may lie beyond the kept top: count over the vocabulary
        counts = sum(((softcapped_logits(hidden[outside], embedding[s:s + vocab_chunk], softcap)
                       >= chosen[outside, None]).sum(-1) for s in range(0, embedding.shape[0], vocab_chunk)),
                     torch.zeros_like(outside))  # a slice may be empty (a constrained read's)
        rank[outside] = counts if shards is None else shards.all_reduce(counts.float()).long()
    chosen_logprobs = (picked - log_z[:, None]).masked_fill(ids < 0, float("-inf"))
    return TopLogprobs(chosen - log_z, rank, best_ids[:, :k], best[:, :k] - log_z[:, None], chosen_logprobs)

