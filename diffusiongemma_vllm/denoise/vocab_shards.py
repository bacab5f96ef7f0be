"""The denoise sampler under tensor parallelism: each rank holds one slice of the vocabulary.

vLLM shards the tied embedding by vocabulary rows across the tensor-parallel ranks
(`VocabParallelEmbedding`): rank r holds the ids [start_r, start_r + rows_r). Everything the
sampler needs is a sum or a maximum over the vocabulary, so each rank computes it over its
slice, with the same functions at the global ids (so the same Gumbel noise), and the slices
merge as the vocabulary chunks inside one rank do:
- log Z = logsumexp_r log Z_r, and slice r carries the share w_r = exp(log Z_r - log Z) of
  the probability;
- entropy: H = sum_r w_r (H_r - log w_r), since p = w_r q_r on slice r;
- the self-conditioning signal: sum_r w_r soft_r;
- argmax and draw: the slice with the largest max z (max z + g); the lowest rank wins ties,
  and it holds the lower ids, so this is torch.argmax's first-index rule over the whole
  vocabulary.
Per pass that is one all-gather of [N, 6] scalars and one all-reduce of the [N, H] signal.
Every rank merges the same gathered values in the same order, so all ranks hold the same
tokens and the denoise loop's host decisions (which canvases halted) agree across ranks; the
all-reduce gives every rank the same sum, as in vLLM's own layers. `merge_top_lists` merges
logprobs the same way (kernels/top_logprobs.py), `merge_best` a structured canvas's
whole-vocabulary fallback (engine/structured_commit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusiongemma_vllm.kernels.vocab_tiled_sampler import RowStats

EXACT_IDS = 1 << 24  # token ids travel as fp32 in the gathered statistics: exact below this


@dataclass(frozen=True)
class VocabShards:
    """This rank's place among the tensor-parallel ranks and the collectives over them."""

    rank: int
    ranks: int
    all_gather: Callable[[torch.Tensor], torch.Tensor]  # [N, ...] on each rank -> [ranks, N, ...], in rank order
    all_reduce: Callable[[torch.Tensor], torch.Tensor]  # elementwise sum over the ranks


def merge_row_stats(stats: RowStats, shards: VocabShards) -> RowStats:
    """The whole vocabulary's statistics from this rank's slice's (`stats`, ids global)."""
    local = torch.stack([stats.top, stats.log_norm, stats.drawn, stats.entropy, stats.argmax.float(),
                         stats.sample.float()], dim=-1)
    top, log_norm, drawn, entropy, argmax, sample = shards.all_gather(local).unbind(-1)  # each [ranks, N]
    total = torch.logsumexp(log_norm, dim=0)
    log_share = log_norm - total
    share = torch.exp(log_share)
    soft = None
    if stats.soft is not None:
        soft = shards.all_reduce(stats.soft * share[shards.rank, :, None])
    mixture = torch.where(share > 0, share * (entropy - log_share), 0.0)  # a slice of no probability adds 0
    return RowStats(argmax.gather(0, top.argmax(0, keepdim=True))[0].long(),
                    sample.gather(0, drawn.argmax(0, keepdim=True))[0].long(),
                    mixture.sum(0), soft, top.max(0).values, total, drawn.max(0).values)


def empty_row_stats(hidden: torch.Tensor) -> RowStats:
    """The statistics of an empty slice (a rank holding none of a constrained read's ids):
    no probability, so the merge takes nothing from it."""
    rows, device = hidden.shape[0], hidden.device
    none = torch.full((rows,), float("-inf"), device=device)
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    return RowStats(ids, ids, torch.zeros(rows, device=device), torch.zeros(rows, hidden.shape[1], device=device),
                    none, none, none)


def merge_top_lists(log_z, chosen, best, best_ids, keep: int, shards: VocabShards):
    """Logprobs (kernels/top_logprobs.py): the whole vocabulary's log Z, token logit and
    top-`keep` from each rank's slice's ([N], [N], [N, <= keep] values and global ids).
    Lists are padded to `keep` (a slice narrower than that) with -inf, which never ranks."""
    rows, short = best.shape[0], keep - best.shape[1]
    best = torch.cat([best, best.new_full((rows, short), float("-inf"))], 1)
    best_ids = torch.cat([best_ids, best_ids.new_zeros((rows, short))], 1)
    local = torch.cat([log_z[:, None], chosen[:, None], best, best_ids.float()], 1)  # ids exact below 2^24
    gathered = shards.all_gather(local)  # [ranks, N, 2 + 2 keep]
    everyone = lambda columns: gathered[..., columns].transpose(0, 1).flatten(1)  # noqa: E731 [N, ranks * width]
    best, order = everyone(slice(2, 2 + keep)).topk(min(keep, shards.ranks * keep), dim=-1)
    best_ids = everyone(slice(2 + keep, None)).gather(1, order).long()
    return torch.logsumexp(gathered[..., 0], 0), gathered[..., 1].max(0).values, best, best_ids


def merge_best(local: torch.Tensor, shards: VocabShards | None) -> int:
    """The token of the largest value over the vocabulary slices, from this slice's
    [value, token]: the lower rank, which holds the lower ids, on ties."""
    if shards is None:
        return int(local[1])
    gathered = shards.all_gather(local[None])  # [ranks, 1, 2]
    return int(gathered[gathered[:, 0, 0].argmax(), 0, 1])
