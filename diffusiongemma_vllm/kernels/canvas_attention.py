"""Canvas attention: canvas queries over a read-only paged prefix plus the canvas itself.

A denoise pass attends every canvas position to (a) the request's committed prefix, read
from vLLM's paged KV cache through its block table and never written, and (b) all canvas
positions, bidirectionally. On sliding-window layers the prefix seen is the last
`window - 1` committed tokens (transformers' sliding cache keeps `window - 1`; the canvas
adds no further window). With `causal=True` the same op computes a commit or prefill
block: query at position p sees keys at positions in (p - window, p].

Cache layout expected here: `key_cache` / `value_cache` are `[num_blocks, block_size,
num_kv_heads, head_dim]` views (the engine adapter presents each backend's cache this way).

`naive_canvas_attention` is the readable fp32 reference; the Triton kernel for GPUs is
checked against it.
"""

from __future__ import annotations

import torch


def gather_prefix(cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows for token positions [start, end) of one request: [end - start, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    positions = torch.arange(start, end, device=cache.device)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, positions % block_size]


def write_canvas_kv(
    key: torch.Tensor,  # [n, C, kv_heads, head_dim]
    value: torch.Tensor,  # [n, C, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [n, max_blocks]
    prefix_lens: torch.Tensor,  # [n]
) -> None:
    """Store a committed block's K/V at positions [prefix_len, prefix_len + C) of each request."""
    block_size = key_cache.shape[1]
    canvas = key.shape[1]
    for r in range(key.shape[0]):
        start = int(prefix_lens[r])
        positions = torch.arange(start, start + canvas, device=key.device)
        blocks = block_table[r, positions // block_size].long()
        key_cache[blocks, positions % block_size] = key[r].to(key_cache.dtype)
        value_cache[blocks, positions % block_size] = value[r].to(value_cache.dtype)


def naive_canvas_attention(
    query: torch.Tensor,  # [n, C, heads, head_dim]
    key: torch.Tensor,  # [n, C, kv_heads, head_dim]
    value: torch.Tensor,  # [n, C, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [n, max_blocks] int32
    prefix_lens: torch.Tensor,  # [n]
    sliding_window: int | None,
    causal: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """Returns [n, C, heads, head_dim] in the query dtype; softmax in fp32."""
    n, canvas, heads, head_dim = query.shape
    group = heads // key.shape[2]
    out = torch.empty_like(query)
    for r in range(n):
        prefix_len = int(prefix_lens[r])
        start = 0 if sliding_window is None else max(0, prefix_len - (sliding_window - 1))
        keys = torch.cat([gather_prefix(key_cache, block_table[r], start, prefix_len), key[r]]).float()
        values = torch.cat([gather_prefix(value_cache, block_table[r], start, prefix_len), value[r]]).float()
        key_pos = torch.arange(start, prefix_len + canvas, device=query.device)
        query_pos = torch.arange(prefix_len, prefix_len + canvas, device=query.device)
        visible = torch.ones(canvas, key_pos.numel(), dtype=torch.bool, device=query.device)
        if causal:
            distance = query_pos[:, None] - key_pos[None, :]
            visible = distance >= 0
            if sliding_window is not None:
                visible &= distance < sliding_window
        keys = keys.repeat_interleave(group, dim=1)  # [K, heads, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[r].float(), keys) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[r] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return out
