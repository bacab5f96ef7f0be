"""Triton kernel: uniform random tokens from Philox, one launch for a whole batch of canvases.

tokens[n, c] = tl.randint(keys[n], c) % vocab_size, which is `noise.philox_bits(keys,
arange(C)) % vocab_size` bit for bit (the reference, in torch). The torch form spends about
a hundred elementwise int64 kernels on the ten Philox rounds; inside a CUDA-graph-replayed
denoise pass each costs a couple of microseconds of launch gap, so on CUDA the re-noise and
initial canvases come from this one kernel instead (noise.py dispatches).
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
    def _philox_tokens_kernel(key_ptr, out_ptr, length, vocab_size, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        key = tl.load(key_ptr + row).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        bits = tl.randint(key, offsets).to(tl.int64) & 0xFFFFFFFF  # the uint32 draw, as a non-negative int64
        tl.store(out_ptr + row.to(tl.int64) * length + offsets, bits % vocab_size, mask=offsets < length)


def philox_tokens(keys: torch.Tensor, length: int, vocab_size: int, block: int = 256) -> torch.Tensor:
    """[n, length] int64 tokens in [0, vocab_size) for int64 `keys` [n]."""
    assert triton is not None, "philox_tokens needs Triton; noise.philox_bits is the torch path"
    assert keys.dim() == 1 and keys.dtype == torch.int64 and keys.stride(0) == 1, (keys.shape, keys.dtype)
    out = torch.empty((keys.shape[0], length), dtype=torch.int64, device=keys.device)
    if keys.shape[0]:
        _philox_tokens_kernel[(keys.shape[0], triton.cdiv(length, block))](keys, out, length, vocab_size, BLOCK=block)
    return out
