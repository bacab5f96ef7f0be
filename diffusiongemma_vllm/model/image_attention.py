"""An image's soft tokens attend to each other both ways, in every layer of the prompt's prefill.

The release sets `use_bidirectional_attention: "vision"`: transformers builds the prompt's
mask as `causal OR same_image` on full layers and `(causal AND window) OR same_image` on
sliding ones (masking_utils: the block overlay is OR-ed after the window), so an image
longer than the window is still bidirectional inside. Text queries keep the causal mask.

vLLM's own prefill is causal (CPU_ATTN has no bidirectional ranges). After vLLM's attention
layer has written this forward's K/V to the cache and attended causally, `attend_images`
recomputes the outputs at the soft-token queries only, reading from the cache the image's
K/V and the committed tokens before it that a query may see. Later layers then read
bidirectional hidden states at the image, as in transformers; the cache holds the K/V that
transformers' cache holds.

The runner describes each forward's images (`ImagePrefill`, built by
engine/image_prefill.py) in vLLM's forward context, under `FORWARD_KEY`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

from diffusiongemma_vllm.engine.kv_layout import read_slots

FORWARD_KEY = "diffusiongemma_images"  # in ForwardContext.additional_kwargs


@dataclass(frozen=True)
class ImageSpan:
    """The soft tokens of one image that this forward computes, and the K/V they read; the
    tensors on the model's device, built once per forward for every layer."""

    query_rows: torch.Tensor  # [q] rows of this forward's tokens holding its soft-token queries
    query_positions: torch.Tensor  # [q] their positions in the request
    image_start: int  # position of the image's first soft token
    # KV cache group -> slots of positions [first kept, image end), oldest first: the committed
    # tokens before the image a query may see, then the whole image; and those positions.
    key_slots: dict[int, torch.Tensor]
    key_positions: dict[int, torch.Tensor]


@dataclass(frozen=True)
class ImagePrefill:
    spans: list[ImageSpan]
    group_of_layer: dict[str, int]  # attention layer name -> KV cache group


def image_prefill_now() -> ImagePrefill | None:
    """The images of the current vLLM forward, if any."""
    if not is_forward_context_available():
        return None
    return get_forward_context().additional_kwargs.get(FORWARD_KEY)


def image_span_attention(query: torch.Tensor, query_positions: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, key_positions: torch.Tensor, image_start: int,
                         sliding_window: int | None, scale: float = 1.0) -> torch.Tensor:
    """query [q, heads, D] at `query_positions`, keys/values [k, kv_heads, D] at
    `key_positions` (the image's and what precedes it): [q, heads, D] in the query dtype.
    A key before the image is visible when causal and, on sliding layers, inside the window;
    every key of the image is visible."""
    group = query.shape[1] // key.shape[1]
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if sliding_window is not None:
        visible &= distance < sliding_window
    visible |= (key_positions >= image_start)[None, :]
    keys = key.float().repeat_interleave(group, dim=1)
    values = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)


def attend_images(images: ImagePrefill, layer, query: torch.Tensor, output: torch.Tensor) -> None:
    """Overwrite `output` [tokens, heads * D] at every soft-token query with its attention
    over the image and the tokens before it. `layer` is vLLM's Attention, whose cache
    already holds this forward's K/V."""
    heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_size
    group = images.group_of_layer[layer.layer_name]
    for span in images.spans:
        key, value = read_slots(layer, span.key_slots[group])
        out = image_span_attention(query[span.query_rows].view(-1, heads, head_dim), span.query_positions,
                                   key.view(-1, kv_heads, head_dim), value.view(-1, kv_heads, head_dim),
                                   span.key_positions[group], span.image_start, layer.sliding_window)
        output[span.query_rows] = out.flatten(-2).to(output.dtype)
