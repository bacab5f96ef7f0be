"""The phase of a forward pass, carried beside the model rather than through it.

The model keeps vLLM's forward signature. A pass over canvases (`denoise`, or a causal
commit computed outside vLLM's attention) is announced by entering `canvas_pass(...)`;
every attention layer then reads `current_canvas_pass()` and attends with the canvas op
instead of vLLM's paged attention. With no canvas pass active, a forward is an ordinary
vLLM `prefill`: causal, writing KV through vLLM's attention backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


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


_current: CanvasPass | None = None


def current_canvas_pass() -> CanvasPass | None:
    return _current


@contextlib.contextmanager
def canvas_pass(spec: CanvasPass) -> Iterator[CanvasPass]:
    global _current
    previous, _current = _current, spec
    try:
        yield spec
    finally:
        _current = previous
