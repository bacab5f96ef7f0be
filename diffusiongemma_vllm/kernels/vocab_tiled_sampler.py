"""Per-position sampler statistics straight from hidden states, tiled over the vocabulary.

One denoise pass needs, for every canvas position, from z = softcap(h . E_v) / T over the
whole vocabulary: argmax(z), a draw from softmax(z) (Gumbel-max), the entropy of softmax(z),
and the self-conditioning signal softmax(z) @ E. Materialising z costs rows x V fp32 (268 MB
per 256-position canvas at V = 262144, the reason vLLM's in-tree sampler runs out of memory at
8 requests). Here the vocabulary is walked in chunks with online statistics, exactly as
flash attention walks keys: a running max m, S = sum exp(z - m), sum exp(z - m) * z (for the
entropy m + log S - that / S), a running argmax and Gumbel argmax, and the soft embedding
accumulated as sum exp(z - m) E_v, rescaled whenever m grows. Rows are processed in chunks
too, so peak memory is `row_chunk x vocab_chunk`, independent of how many canvases a pass has.

`naive_row_stats` materialises everything and is the reference. The draw is argmax(z + g)
with g from `noise.gumbel_noise` (counter-based, so a chunk computes its own noise).

`embedding` may be one slice of the vocabulary (a tensor-parallel rank's rows, ids from
`first_id`): ids and noise are then the global ones, and the statistics cover the slice;
`vocab_shards.merge_row_stats` combines the slices' statistics into the whole vocabulary's.

`bias` (a `SparseBias`) adds values to some rows' softcapped logits before the temperature,
where transformers applies a logits processor and vLLM its logit bias and bans: z = (softcap(l)
+ b) / T. Each chunk adds the entries that fall inside it, so nothing vocabulary-wide is built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from diffusiongemma_vllm.denoise.noise import gumbel_noise


BANNED = -1e30  # a bias that bans a token: exp underflows to exactly 0 at every temperature, no inf arithmetic


@dataclass(frozen=True)
class SparseBias:
    """Additive logit biases of some (row, token id) pairs; repeated pairs add up. Ids are the
    whole vocabulary's."""

    rows: torch.Tensor  # [E] int64
    ids: torch.Tensor  # [E] int64
    values: torch.Tensor  # [E] fp32

    def block(self, first_row: int, rows: int, first_id: int, width: int) -> torch.Tensor | None:
        """The dense [rows, width] fp32 bias of rows first_row.. and ids first_id.., or None
        when no entry falls inside (synchronises with the device: eager passes only)."""
        inside = (self.rows >= first_row) & (self.rows < first_row + rows) \
            & (self.ids >= first_id) & (self.ids < first_id + width)
        if not bool(inside.any()):
            return None
        dense = torch.zeros((rows, width), dtype=torch.float32, device=self.values.device)
        dense.index_put_((self.rows[inside] - first_row, self.ids[inside] - first_id), self.values[inside],
                         accumulate=True)
        return dense


@dataclass(frozen=True)
class RowStats:
    argmax: torch.Tensor  # [N] int64
    sample: torch.Tensor  # [N] int64
    entropy: torch.Tensor  # [N] fp32
    soft: torch.Tensor | None  # [N, H] fp32: softmax(z) @ E
    # What merging vocabulary slices needs (vocab_shards.py): max z, log sum exp z, max (z + g).
    top: torch.Tensor | None = None  # [N] fp32
    log_norm: torch.Tensor | None = None  # [N] fp32
    drawn: torch.Tensor | None = None  # [N] fp32

    @classmethod
    def cat(cls, parts: list["RowStats"]) -> "RowStats":
        """The row chunks' statistics as one."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) if getattr(parts[0], f.name) is not None
                     else None for f in fields(cls)))


def _scaled_logits(hidden, embedding, softcap: float, temperature, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = torch.tanh((hidden @ embedding.T).float() / softcap) * softcap
    if bias is not None:
        logits = logits + bias
    return logits / temperature[:, None]


def naive_row_stats(hidden: torch.Tensor, embedding: torch.Tensor, softcap: float, temperature: torch.Tensor,
                    gumbel_keys: torch.Tensor, with_soft: bool, first_id: int = 0,
                    bias: SparseBias | None = None) -> RowStats:
    dense = bias.block(0, hidden.shape[0], first_id, embedding.shape[0]) if bias is not None else None
    z = _scaled_logits(hidden, embedding, softcap, temperature, dense)  # [N, V]
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    drawn = z + gumbel_noise(gumbel_keys, first_id, first_id + z.shape[1])
    soft = probs @ embedding.float() if with_soft else None
    return RowStats(z.argmax(-1) + first_id, drawn.argmax(-1) + first_id, -(probs * log_probs).sum(-1), soft,
                    z.max(-1).values, torch.logsumexp(z, -1), drawn.max(-1).values)


def vocab_tiled_row_stats(
    hidden: torch.Tensor,  # [N, H]
    embedding: torch.Tensor,  # [V, H] (the tied lm_head)
    softcap: float,
    temperature: torch.Tensor,  # [N]
    gumbel_keys: torch.Tensor,  # [N] int64
    with_soft: bool,
    row_chunk: int = 256,
    vocab_chunk: int = 16384,
    first_id: int = 0,  # the vocabulary id of embedding row 0 (a tensor-parallel rank's slice)
    bias: SparseBias | None = None,
) -> RowStats:
    assert hidden.dim() == 2 and embedding.dim() == 2 and hidden.shape[1] == embedding.shape[1]
    assert temperature.shape == gumbel_keys.shape == hidden.shape[:1]
    return RowStats.cat([_row_chunk_stats(hidden[i:i + row_chunk], embedding, softcap, temperature[i:i + row_chunk],
                                          gumbel_keys[i:i + row_chunk], with_soft, vocab_chunk, first_id, bias, i)
                         for i in range(0, hidden.shape[0], row_chunk)])


def _row_chunk_stats(hidden, embedding, softcap, temperature, keys, with_soft, vocab_chunk, first_id, bias,
                     first_row) -> RowStats:
    rows, device = hidden.shape[0], hidden.device
    m = torch.full((rows,), float("-inf"), device=device)
    total = torch.zeros(rows, device=device)  # sum exp(z - m)
    weighted = torch.zeros(rows, device=device)  # sum exp(z - m) * z
    best = torch.full((rows,), float("-inf"), device=device)
    best_id = torch.zeros(rows, dtype=torch.long, device=device)
    drawn = torch.full((rows,), float("-inf"), device=device)
    drawn_id = torch.zeros(rows, dtype=torch.long, device=device)
    soft = torch.zeros(rows, hidden.shape[1], device=device) if with_soft else None
    for start in range(0, embedding.shape[0], vocab_chunk):
        chunk = embedding[start:start + vocab_chunk]
        ids = torch.arange(first_id + start, first_id + start + chunk.shape[0], device=device)
        dense = bias.block(first_row, rows, first_id + start, chunk.shape[0]) if bias is not None else None
        z = _scaled_logits(hidden, chunk, softcap, temperature, dense)  # [rows, chunk]
        m_new = torch.maximum(m, z.max(-1).values)
        rescale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        total = total * rescale + e.sum(-1)
        weighted = weighted * rescale + (e * z).sum(-1)
        if with_soft:
            soft = soft * rescale[:, None] + e @ chunk.float()
        m = m_new
        value, index = z.max(-1)  # first index on ties, like torch.argmax
        better = value > best
        best, best_id = torch.where(better, value, best), torch.where(better, ids[index], best_id)
        value, index = (z + gumbel_noise(keys, first_id + start, first_id + start + chunk.shape[0])).max(-1)
        better = value > drawn
        drawn, drawn_id = torch.where(better, value, drawn), torch.where(better, ids[index], drawn_id)
    log_norm = m + torch.log(total)
    return RowStats(best_id, drawn_id, log_norm - weighted / total, soft / total[:, None] if with_soft else None,
                    m, log_norm, drawn)
