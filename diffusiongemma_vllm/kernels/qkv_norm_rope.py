"""Triton kernel: the attention input's per-head norms and RoPE in one launch.

After the QKV projection every DiffusionGemma layer RMS-normalises each query head and each key
head with learned vectors, rotates both by their positions (neox RoPE over the whole head:
the release's "proportional" RoPE pads its unrotated angles with cos 1, sin 0 in the cache),
and RMS-normalises each value head without a weight (model/diffusion_gemma.py). With vLLM's
layers that is q norm, k norm, rotary and v norm, four launches per layer plus the copies that
make the split heads contiguous: some 150 launches in a 30-layer pass, each a couple of
microseconds of gap inside a replayed CUDA graph. Here one program takes one head of one
token, reads it from the QKV projection's output, and writes it normalised and rotated into
contiguous q, k and v; statistics and rotation in fp32, rounded once to the output dtype
(vLLM's kernels round after the norm and within the rotation, so the two agree to an ulp, not
bit for bit).
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
    def _qkv_norm_rope_kernel(qkv_ptr, positions_ptr, q_weight_ptr, k_weight_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr,
                              qkv_stride, eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                              HEAD_DIM: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # query heads, then key heads, then value heads
        half = tl.arange(0, HEAD_DIM // 2)
        src = qkv_ptr + token * qkv_stride + head * HEAD_DIM
        first = tl.load(src + half).to(tl.float32)
        second = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        scale = tl.rsqrt((tl.sum(first * first, axis=0) + tl.sum(second * second, axis=0)) / HEAD_DIM + eps)
        first, second = first * scale, second * scale
        if head < NUM_HEADS + NUM_KV_HEADS:
            if head < NUM_HEADS:
                weight_first = tl.load(q_weight_ptr + half).to(tl.float32)
                weight_second = tl.load(q_weight_ptr + HEAD_DIM // 2 + half).to(tl.float32)
                dst = q_ptr + (token * NUM_HEADS + head) * HEAD_DIM
            else:
                weight_first = tl.load(k_weight_ptr + half).to(tl.float32)
                weight_second = tl.load(k_weight_ptr + HEAD_DIM // 2 + half).to(tl.float32)
                dst = k_ptr + (token * NUM_KV_HEADS + head - NUM_HEADS) * HEAD_DIM
            first, second = first * weight_first, second * weight_second
            row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * HEAD_DIM
            cos = tl.load(row + half).to(tl.float32)
            sin = tl.load(row + HEAD_DIM // 2 + half).to(tl.float32)
            first, second = first * cos - second * sin, second * cos + first * sin
        else:
            dst = v_ptr + (token * NUM_KV_HEADS + head - NUM_HEADS - NUM_KV_HEADS) * HEAD_DIM
        tl.store(dst + half, first.to(q_ptr.dtype.element_ty))
        tl.store(dst + HEAD_DIM // 2 + half, second.to(q_ptr.dtype.element_ty))


def qkv_norm_rope(qkv: torch.Tensor,  # [T, (heads + 2 * kv_heads) * head_dim], the QKV projection's output
                  positions: torch.Tensor,  # [T] int
                  q_weight: torch.Tensor,  # [head_dim]
                  k_weight: torch.Tensor,  # [head_dim]
                  cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos for the first half, sin for the second
                  num_heads: int, num_kv_heads: int, head_dim: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, heads * head_dim], k, v [T, kv_heads * head_dim]), contiguous, in qkv's dtype."""
    assert triton is not None, "qkv_norm_rope needs Triton; naive_qkv_norm_rope is the torch path"
    tokens, width = qkv.shape
    assert width == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1, (qkv.shape, qkv.stride())
    assert head_dim & (head_dim - 1) == 0 and positions.shape == (tokens,), (head_dim, positions.shape)
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.is_contiguous(), cos_sin_cache.shape
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    q = qkv.new_empty((tokens, num_heads * head_dim))
    k = qkv.new_empty((tokens, num_kv_heads * head_dim))
    v = qkv.new_empty((tokens, num_kv_heads * head_dim))
    if tokens:
        _qkv_norm_rope_kernel[(tokens, num_heads + 2 * num_kv_heads)](
            qkv, positions, q_weight, k_weight, cos_sin_cache, q, k, v, qkv.stride(0), eps,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, num_warps=_warps(head_dim))
    return q, k, v


def _warps(head_dim: int) -> int:
    return 2 if head_dim >= 256 else 1


def naive_qkv_norm_rope(qkv, positions, q_weight, k_weight, cos_sin_cache, num_heads: int, num_kv_heads: int,
                        head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference, in torch and fp32, rounded once at the end."""
    heads = qkv.float().unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)
    q, k, v = normed.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos, sin = cos_sin_cache[positions].float()[:, None].chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    q, k = rotate(q * q_weight.float()), rotate(k * k_weight.float())
    return tuple(x.flatten(1).to(qkv.dtype) for x in (q, k, v))
