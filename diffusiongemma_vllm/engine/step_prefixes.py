"""Where a step's canvases read their requests' committed prefix K/V (engine/worker_step.py).

- GPU: `PagedStepInputs`, the ready requests' context lengths and block-table rows copied
  into static buffers; the Triton canvas attention reads vLLM's paged cache in place through
  them, and the denoise graphs captured over them stay valid from step to step.
- CPU: `gather_prefixes` copies each layer's prefix K/V out of the cache once per step, since
  CPU_ATTN's pages are laid out per ISA (kv_layout.py decodes them).
Sliding layers read only the last window-1 tokens, the only ones vLLM keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffusiongemma_vllm.engine.kv_layout import first_kept, paged_views, read_slots, token_slots
from diffusiongemma_vllm.model.canvas_context import PagedPrefix, PrefixKV


@dataclass
class PagedStepInputs:
    """GPU: the per-request inputs of a step's canvases at fixed addresses, rows in job order:
    context lengths and each KV group's block-table rows; every layer's prefix is vLLM's paged
    cache read in place. Graphs captured over these stay valid from step to step."""

    context_lens: torch.Tensor  # [max_num_seqs] int64
    tables: list[torch.Tensor]  # per KV cache group: [max_num_seqs, max_blocks_per_request] int32
    prefixes: dict[str, PagedPrefix]

    @classmethod
    def build(cls, runner, max_num_seqs: int, num_splits: int | None) -> "PagedStepInputs":
        layers = runner.compilation_config.static_forward_context
        device = runner.device
        tables, prefixes = [], {}
        for group_id, group in enumerate(runner.kv_cache_config.kv_cache_groups):
            width = runner.input_batch.block_table[group_id].get_device_tensor(1).shape[1]
            table = torch.zeros((max_num_seqs, width), dtype=torch.int32, device=device)
            tables.append(table)
            for name in group.layer_names:
                key, value = paged_views(layers[name].kv_cache)
                prefixes[name] = PagedPrefix(key, value, table, group.kv_cache_spec.block_size, num_splits)
        return cls(torch.zeros(max_num_seqs, dtype=torch.long, device=device), tables, prefixes)

    def load(self, runner, ready: list[int], context: list[int]) -> None:
        n = len(ready)
        self.context_lens[:n].copy_(torch.tensor(context), non_blocking=True)
        index = torch.tensor(ready, device=self.context_lens.device)
        num_reqs = runner.input_batch.num_reqs
        for group_id, table in enumerate(self.tables):
            table[:n].copy_(runner.input_batch.block_table[group_id].get_device_tensor(num_reqs)[index])


def gather_prefixes(runner, ready: list[int], context: list[int], device: torch.device) -> dict[str, PrefixKV]:
    """CPU: each layer's committed K/V of the ready requests, gathered once per step
    (left-aligned, zero-padded; CPU_ATTN pages are ISA-specific); sliding layers keep only
    the last window-1 tokens, the only ones vLLM keeps."""
    layers = runner.compilation_config.static_forward_context
    prefixes = {}
    for group_id, group in enumerate(runner.kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        window = getattr(spec, "sliding_window", None)
        table = runner.input_batch.block_table[group_id].get_numpy_array()
        spans = [(first_kept(length, window), length) for length in context]
        lens = torch.tensor([end - start for start, end in spans], device=device)
        slots = [token_slots(table[row], np.arange(start, end), spec.block_size)
                 for row, (start, end) in zip(ready, spans)]
        for name in group.layer_names:
            keys, values = [], []
            for request_slots in slots:
                key, value = read_slots(layers[name], request_slots)
                keys.append(key)
                values.append(value)
            prefixes[name] = PrefixKV(_pad(keys), _pad(values), lens)
    return prefixes


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(1, max(r.shape[0] for r in rows))
    out = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out
