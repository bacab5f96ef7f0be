"""Attention of both phases as one opaque custom op, so the model's forward compiles once.

Every attention layer calls `torch.ops.diffusiongemma.phase_attention(q, k, v, output, layer_name)`.
At run time the op asks the forward context which phase this forward is
(`canvas_context.canvas_pass_for`):
- none (a vLLM forward): `prefill`, vLLM's own attention layer, which writes the KV cache
  through the backend vLLM chose, then the images' soft-token queries recomputed
  bidirectionally within each image (image_attention.py);
- a `CanvasPass`: the canvas op over the committed prefix, which never writes vLLM's cache:
  the Triton kernel reading the paged cache in place (`PagedPrefix`, GPU), else the torch
  reference over gathered K/V (`PrefixKV`, CPU, and the standalone runner's causal passes,
  whose K/V go to its own store through `kv_sink`).
Under vLLM's torch.compile (`@support_torch_compile` on the layer stack, a mode the user
chooses) Dynamo traces the forward once, without guards, and replays it for every call:
a phase branch in Python would be frozen at whatever the first traced call was (vLLM's
profiling prefill). As an opaque op the branch stays a run-time decision; the op is also a
splitting op of vLLM's piecewise compilation (config_hook.py), so vLLM's piecewise CUDA
graphs never capture one request's attention metadata, and Inductor fuses what lies
between two attention calls (norms, residual adds, RoPE, the router's scaling).
The op writes into `output`, which the caller allocates in traced code, as vLLM's own
attention op does: a piecewise graph replays on the addresses it captured, so the piece after
the op must find the output where the captured piece allocated it; a tensor the op returned
would live elsewhere on every replay. The paged kernel writes there directly; vLLM's
attention (prefill) and the CPU reference are copied in.
"""

from __future__ import annotations

import torch
from torch.library import Library

from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from diffusiongemma_vllm.kernels.canvas_attention import naive_canvas_attention
from diffusiongemma_vllm.kernels.paged_canvas_attention import paged_canvas_attention
from diffusiongemma_vllm.model.canvas_context import CanvasPass, PagedPrefix, canvas_pass_for
from diffusiongemma_vllm.model.image_attention import attend_images, image_prefill_now

OP_NAME = "diffusiongemma::phase_attention"  # as vLLM's splitting_ops name ops


def phase_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                    layer_name: str) -> None:
    """Attention of vLLM attention layer `layer_name` into `output` [tokens, heads * head_dim],
    for query [tokens, heads * head_dim] and key / value [tokens, kv_heads * head_dim]."""
    layer = get_forward_context().no_compile_layers[layer_name]  # vLLM's Attention module
    spec = canvas_pass_for(layer_name)
    if spec is None:
        output.copy_(layer(query, key, value))
        images = image_prefill_now()
        if images is not None:
            attend_images(images, layer, query, output)
    else:
        _canvas_attention(spec, layer, query, key, value, output)


def _phase_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                          layer_name: str) -> None:
    return None  # writes `output` only


def _canvas_attention(
    spec: CanvasPass,
    layer,  # vLLM's Attention: heads, head size, window, layer name
    query: torch.Tensor,  # [n * C, heads * head_dim]
    key: torch.Tensor,  # [n * C, kv_heads * head_dim]
    value: torch.Tensor,  # [n * C, kv_heads * head_dim]
    output: torch.Tensor,  # [n * C, heads * head_dim] contiguous
) -> None:
    canvas, heads, kv_heads, head_dim = spec.canvas_length, layer.num_heads, layer.num_kv_heads, layer.head_size
    q = query.view(-1, canvas, heads, head_dim)
    k = key.view(-1, canvas, kv_heads, head_dim)
    v = value.view(-1, canvas, kv_heads, head_dim)
    name = layer.layer_name
    prefix = spec.prefix(name)
    if isinstance(prefix, PagedPrefix):
        paged_canvas_attention(q, k, v, prefix.key_cache, prefix.value_cache, prefix.block_table,
                               spec.context_lens.to(torch.int32), layer.sliding_window, spec.causal,
                               table_block_size=prefix.table_block_size, num_splits=prefix.num_splits,
                               out=output.view(q.shape))
    else:
        out = naive_canvas_attention(q, k, v, prefix.key, prefix.value, prefix.lens, spec.context_lens,
                                     layer.sliding_window, causal=spec.causal)
        output.copy_(out.flatten(0, 1).flatten(-2))
    if spec.kv_sink is not None:
        spec.kv_sink(name, k, v)


_library = Library("diffusiongemma", "FRAGMENT")  # the op lives as long as this module
direct_register_custom_op("phase_attention", phase_attention, mutates_args=["output"],
                          fake_impl=_phase_attention_fake, target_lib=_library)
