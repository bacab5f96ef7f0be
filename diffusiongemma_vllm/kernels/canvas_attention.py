"""Canvas attention: canvas queries over the committed prefix plus the canvas itself.

A denoise pass attends every canvas position to (a) the request's committed prefix, never
written, and (b) all canvas positions, bidirectionally. On sliding-window layers the prefix
seen is the last `window - 1` committed tokens (transformers' sliding cache keeps
`window - 1`; the canvas adds no further window). With `causal=True` the same op computes a
commit or prefill block: the query at position p sees keys at positions in (p - window, p].

Inputs, per request r of n:
- canvas q/k/v `[n, C, heads | kv_heads, head_dim]` at positions [context_len[r], + C);
- prefix K/V `[n, P, kv_heads, head_dim]`, row j holding position
  `context_len[r] - prefix_len[r] + j` for j < prefix_len[r] (rows past that are padding).
  A caller may pass more history than the window needs; positions decide what is visible.

`naive_canvas_attention` is the readable fp32 reference that the engine's CPU path runs and
the GPU kernel is checked against.
"""

from __future__ import annotations

import torch


def visible_keys(context_len: int, prefix_len: int, canvas: int, sliding_window: int | None,
                 causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions [prefix_len + C] and the [C, prefix_len + C] visibility mask of one request."""
    key_pos = torch.cat([torch.arange(context_len - prefix_len, context_len, device=device),
                         torch.arange(context_len, context_len + canvas, device=device)])
    query_pos = torch.arange(context_len, context_len + canvas, device=device)
    distance = query_pos[:, None] - key_pos[None, :]
    if causal:
        visible = distance >= 0
        if sliding_window is not None:
            visible &= distance < sliding_window
        return key_pos, visible
    visible = torch.ones_like(distance, dtype=torch.bool)
    if sliding_window is not None:
        in_prefix = key_pos < context_len
        visible &= ~in_prefix[None, :] | (key_pos[None, :] >= context_len - (sliding_window - 1))
    return key_pos, visible


def naive_canvas_attention(
    query: torch.Tensor,  # [n, C, heads, head_dim]
    key: torch.Tensor,  # [n, C, kv_heads, head_dim]
    value: torch.Tensor,  # [n, C, kv_heads, head_dim]
    prefix_key: torch.Tensor,  # [n, P, kv_heads, head_dim]
    prefix_value: torch.Tensor,  # [n, P, kv_heads, head_dim]
    prefix_lens: torch.Tensor,  # [n] valid prefix rows
    context_lens: torch.Tensor,  # [n] position of the first canvas token
    sliding_window: int | None,
    causal: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """Returns [n, C, heads, head_dim] in the query dtype; scores and softmax in fp32."""
    n, canvas, heads, _ = query.shape
    group = heads // key.shape[2]
    out = torch.empty_like(query)
    for r in range(n):
        prefix_len, context_len = int(prefix_lens[r]), int(context_lens[r])
        _, visible = visible_keys(context_len, prefix_len, canvas, sliding_window, causal, query.device)
        keys = torch.cat([prefix_key[r, :prefix_len], key[r]]).float().repeat_interleave(group, dim=1)
        values = torch.cat([prefix_value[r, :prefix_len], value[r]]).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[r].float(), keys) * scale
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        out[r] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return out
