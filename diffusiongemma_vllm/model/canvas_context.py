"""The phase of a forward pass, carried in vLLM's forward context as attention metadata.

The model keeps vLLM's forward signature. A pass over canvases (`denoise`, or a causal
commit computed outside vLLM's attention) runs inside `canvas_forward_context(spec, ...)`:
vLLM's own forward context, whose per-layer attention metadata is the `CanvasPass` for
every attention layer. Each layer's attention op (phase_attention.py) asks
`canvas_pass_for(its layer name)` and, given one, attends with the canvas op instead of vLLM's
paged attention. Under vLLM's own forwards the metadata is the attention backend's (or None),
so the answer is None and the forward is an ordinary vLLM `prefill`: causal, writing KV
through vLLM's attention backend. Nothing is kept in a module global, so the phase is per
call, as vLLM's torch.compile integration expects of what a forward reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available, set_forward_context


@dataclass(frozen=True)
class PrefixKV:
    """Committed K/V a layer's canvas queries may read: rows left-aligned, `lens` valid."""

    key: torch.Tensor  # [n, P, kv_heads, head_dim]
    value: torch.Tensor  # [n, P, kv_heads, head_dim]
    lens: torch.Tensor  # [n]


@dataclass(frozen=True)
class PagedPrefix:
    """Committed K/V left in vLLM's paged cache (GPU), read in place by the Triton kernel."""

    key_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim] view
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [n, max_blocks] int32, in blocks of `table_block_size` tokens
    table_block_size: int
    # Key-sequence splits of the kernel. None: enough to fill the GPU, so fewer as the batch
    # grows, which changes a canvas's summation order; 1 under vLLM's batch-invariant mode.
    num_splits: int | None = None


@dataclass(frozen=True)
class CanvasPass:
    context_lens: torch.Tensor  # [n] committed tokens before each canvas = its first position
    canvas_length: int
    prefix: Callable[[str], PrefixKV | PagedPrefix]  # attention layer name -> its committed K/V
    causal: bool = False  # False: denoise (bidirectional, read-only). True: commit.
    # Receives (layer name, canvas K, canvas V) of a causal pass; only the standalone
    # runner uses it, to keep its own cache. The engine commits through vLLM attention.
    kv_sink: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None

    def __post_init__(self):
        if self.kv_sink is not None and not self.causal:
            raise ValueError("a denoise pass is read-only: only a causal pass may store K/V")


def canvas_forward_context(spec: CanvasPass, vllm_config, layer_names):
    """vLLM's forward context for a pass over canvases: `spec` is every named attention
    layer's metadata."""
    return set_forward_context({name: spec for name in layer_names}, vllm_config)


def canvas_pass_for(layer_name: str) -> CanvasPass | None:
    """The canvas pass the current forward runs for this attention layer, or None (a vLLM
    forward: prefill through its attention backend)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    entry = metadata.get(layer_name) if isinstance(metadata, dict) else None
    return entry if isinstance(entry, CanvasPass) else None
