"""Logit biases of canvases: what a request's `logit_bias`, `bad_words` and `min_tokens` do to
the distribution every pass of its canvas samples, accepts, self-conditions on and commits.

A canvas's biases are a few (token id, value, positions) entries (engine/request_biases.py
builds them from the request); they hold for every pass of the canvas. `CanvasBiases` keeps the
entries of one denoise call's jobs as device tables, padded to the longest list, and gives each
pass the (row, id, value) triples of the canvases in it (`SparseBias`), which the samplers add
to the softcapped logits a vocabulary chunk at a time (kernels/vocab_tiled_sampler.py). Finding
the triples synchronises with the device, so passes over biased canvases run eagerly, never
from the denoise graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusiongemma_vllm.kernels.vocab_tiled_sampler import SparseBias


@dataclass(frozen=True)
class TokenBias:
    """`value` added to token `token`'s logit at canvas positions [0, until) (None: all)."""

    token: int
    value: float
    until: int | None = None


@dataclass(frozen=True)
class CanvasBiases:
    """The biases of a denoise call's jobs: row j (job `first_row + j`, as `CanvasBatch.rows`
    numbers them) holds its entries, padded with entries that cover no position."""

    first_row: int
    ids: torch.Tensor  # [jobs, B] int64
    values: torch.Tensor  # [jobs, B] fp32
    until: torch.Tensor  # [jobs, B] int64: positions [0, until) take the entry

    @classmethod
    def of(cls, biases: list[tuple[TokenBias, ...]], canvas_length: int, first_row: int,
           device: torch.device | str) -> "CanvasBiases | None":
        """The tables for jobs with these biases, or None when no job has any."""
        width = max(map(len, biases), default=0)
        if not width:
            return None
        ids = torch.zeros((len(biases), width), dtype=torch.long)
        values = torch.zeros((len(biases), width), dtype=torch.float32)
        until = torch.zeros((len(biases), width), dtype=torch.long)
        for job, entries in enumerate(biases):
            for n, entry in enumerate(entries):
                ids[job, n], values[job, n] = entry.token, entry.value
                until[job, n] = canvas_length if entry.until is None else min(entry.until, canvas_length)
        return cls(first_row, ids.to(device), values.to(device), until.to(device))

    def for_pass(self, rows: torch.Tensor, length: int) -> SparseBias:
        """The entries of the canvases whose jobs are `rows` [n], as sampler rows n * length + position."""
        index = rows - self.first_row
        until = self.until[index]  # [n, B]
        covered = torch.arange(length, device=until.device) < until[:, :, None]  # [n, B, length]
        canvas, entry, position = covered.nonzero(as_tuple=True)
        return SparseBias(canvas * length + position, self.ids[index][canvas, entry],
                          self.values[index][canvas, entry])
