"""The phase of a forward pass, carried beside the model rather than through it.

The model keeps vLLM's forward signature. A pass over canvases (`denoise`, or a commit run
by our own attention) is announced by entering `canvas_pass(...)`; every attention layer
then reads `current_canvas_pass()` and attends with the canvas op instead of vLLM's paged
attention. With no canvas pass active, a forward is an ordinary vLLM prefill: causal,
writing KV through vLLM's attention backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# layer name -> (key_cache, value_cache, block_table), caches as [blocks, block_size, kv_heads, head_dim]
KVLookup = Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CanvasPass:
    prefix_lens: torch.Tensor  # [num_canvases] committed tokens before each canvas
    canvas_length: int
    kv_lookup: KVLookup
    causal: bool = False  # False: denoise (bidirectional, read-only). True: commit.
    write_kv: bool = False  # store the canvas K/V at its positions (commit only)

    def __post_init__(self):
        if self.write_kv and not self.causal:
            raise ValueError("only a causal (commit) pass may write the KV cache")


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
