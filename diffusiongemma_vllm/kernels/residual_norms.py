"""Triton kernels: the norms around a layer's two residual adds, one launch each.

A DiffusionGemma layer (research/hf_reference.md 2.2) wraps each residual add in RMS norms:
    residual = hidden + post_attention_norm(attn)
    ff_in, ff2_in = pre_feedforward_norm(residual), pre_feedforward_norm_2(residual)
    router_in = norm(residual) * router_scale * hidden**-0.5
    ...
    out = (residual + post_feedforward_norm(post_ff_norm_1(dense) + post_ff_norm_2(routed))) * layer_scalar
With vLLM's layers that is 7 launches after attention and 6 at the layer's end, each reading
and writing a [tokens, hidden] row set; inside a replayed CUDA graph each costs a couple of
microseconds of gap. Here one program per token row does each group: `post_attention_norms`
(residual, the two feed-forward inputs and the router input) and `layer_output`.

Rounding follows transformers: each norm is computed in fp32, times its weight, and rounded
once to the activation dtype; adds and the router's scalings are rounded where transformers'
tensors are (the `_rounded` helper), so in fp32 the kernels are the torch composition up to
summation order, and in bf16 they differ from it only where the norms' fp32 sums do.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None


if triton is not None:

    @triton.jit
    def _rms_scale(x, width, eps):
        return tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)

    @triton.jit
    def _rounded(x, dtype: tl.constexpr):
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _weight(ptr, cols, mask):
        return tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _post_attention_kernel(attn_ptr, hidden_ptr, post_attention_ptr, pre_ff_ptr, pre_ff2_ptr, router_scale_ptr,
                               residual_ptr, ff_ptr, ff2_ptr, router_ptr, width, eps, root_size,
                               BLOCK: tl.constexpr):
        dtype = residual_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        offsets = tl.program_id(0).to(tl.int64) * width + cols

        attn = tl.load(attn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        normed = _rounded(attn * _rms_scale(attn, width, eps) * _weight(post_attention_ptr, cols, mask), dtype)
        residual = _rounded(tl.load(hidden_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + normed, dtype)
        tl.store(residual_ptr + offsets, residual.to(dtype), mask=mask)
        x = residual * _rms_scale(residual, width, eps)
        tl.store(ff_ptr + offsets, (x * _weight(pre_ff_ptr, cols, mask)).to(dtype), mask=mask)
        tl.store(ff2_ptr + offsets, (x * _weight(pre_ff2_ptr, cols, mask)).to(dtype), mask=mask)
        router = _rounded(_rounded(x, dtype) * _weight(router_scale_ptr, cols, mask), dtype) * root_size
        tl.store(router_ptr + offsets, router.to(dtype), mask=mask)

    @triton.jit
    def _layer_output_kernel(dense_ptr, routed_ptr, residual_ptr, post_ff1_ptr, post_ff2_ptr, post_ff_ptr,
                             layer_scalar_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        offsets = tl.program_id(0).to(tl.int64) * width + cols

        dense = tl.load(dense_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        routed = tl.load(routed_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dense = _rounded(dense * _rms_scale(dense, width, eps) * _weight(post_ff1_ptr, cols, mask), dtype)
        routed = _rounded(routed * _rms_scale(routed, width, eps) * _weight(post_ff2_ptr, cols, mask), dtype)
        mixed = _rounded(dense + routed, dtype)
        post = _rounded(mixed * _rms_scale(mixed, width, eps) * _weight(post_ff_ptr, cols, mask), dtype)
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out = _rounded(residual + post, dtype) * tl.load(layer_scalar_ptr).to(tl.float32)
        tl.store(out_ptr + offsets, out.to(dtype), mask=mask)


def _rows(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The [T, H] inputs, contiguous (a no-op for the layers' outputs), one shape and dtype."""
    for row in rows:
        assert row.shape == rows[0].shape and row.dtype == rows[0].dtype and row.dim() == 2, (row.shape, row.dtype)
    return tuple(row.contiguous() for row in rows)


def post_attention_norms(attn: torch.Tensor,  # [T, H] the attention block's output
                         hidden: torch.Tensor,  # [T, H] the layer's input
                         post_attention: torch.Tensor, pre_ff: torch.Tensor, pre_ff2: torch.Tensor,  # [H] norm weights
                         router_scale: torch.Tensor,  # [H]
                         eps: float) -> tuple[torch.Tensor, ...]:
    """(residual, dense MLP input, experts input, router input), each [T, H] in hidden's dtype."""
    assert triton is not None, "post_attention_norms needs Triton; naive_post_attention_norms is the torch path"
    attn, hidden = _rows(attn, hidden)
    tokens, width = hidden.shape
    outs = tuple(torch.empty_like(hidden) for _ in range(4))
    if tokens:
        block = triton.next_power_of_2(width)
        _post_attention_kernel[(tokens,)](attn, hidden, post_attention, pre_ff, pre_ff2, router_scale, *outs, width,
                                          eps, width**-0.5, BLOCK=block, num_warps=_warps(block))
    return outs


def layer_output(dense: torch.Tensor,  # [T, H] the dense MLP's output
                 routed: torch.Tensor,  # [T, H] the experts' output
                 residual: torch.Tensor,  # [T, H]
                 post_ff1: torch.Tensor, post_ff2: torch.Tensor, post_ff: torch.Tensor,  # [H] norm weights
                 layer_scalar: torch.Tensor,  # [1]
                 eps: float) -> torch.Tensor:
    """The layer's output [T, H]."""
    assert triton is not None, "layer_output needs Triton; naive_layer_output is the torch path"
    dense, routed, residual = _rows(dense, routed, residual)
    tokens, width = residual.shape
    out = torch.empty_like(residual)
    if tokens:
        block = triton.next_power_of_2(width)
        _layer_output_kernel[(tokens,)](dense, routed, residual, post_ff1, post_ff2, post_ff, layer_scalar, out, width,
                                        eps, BLOCK=block, num_warps=_warps(block))
    return out


def _warps(block: int) -> int:
    """Warps for a row of `block` (a power of two), so that a thread holds at most 8 values of
    each of the row's tensors: 16 at the release's 2816 (block 4096), where 8 spill registers
    on Ampere (compiled offline for sm_86, tests/test_kernels_compile_offline.py)."""
    return min(16, max(1, block // 256))


def _norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: fp32, times the weight, rounded once."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.float()).to(x.dtype)


def naive_post_attention_norms(attn, hidden, post_attention, pre_ff, pre_ff2, router_scale,
                               eps: float) -> tuple[torch.Tensor, ...]:
    """The reference, in torch."""
    residual = hidden + _norm(attn, post_attention, eps)
    router = _norm(residual, None, eps) * router_scale.to(hidden.dtype) * hidden.shape[-1] ** -0.5
    return residual, _norm(residual, pre_ff, eps), _norm(residual, pre_ff2, eps), router


def naive_layer_output(dense, routed, residual, post_ff1, post_ff2, post_ff, layer_scalar, eps: float) -> torch.Tensor:
    """The reference, in torch."""
    mixed = _norm(dense, post_ff1, eps) + _norm(routed, post_ff2, eps)
    return (residual + _norm(mixed, post_ff, eps)) * layer_scalar.to(residual.dtype)
