"""Triton kernel: a product with fp32 output whose every element sums its K terms in one fixed
order, whatever the number of rows: the GEMM sampler's products under vLLM's batch-invariant mode.

cuBLAS picks its kernel (tiles, split-K) from the shape, so one row of a product can round
differently in a batch of another size. On Hopper vLLM's batch-invariant mode replaces no GEMM:
it caps cuBLASLt's workspace so that no split-K fits and trusts the heuristic to keep each
element's order, which vLLM itself relies on only for its small router GEMM. The sampler's
products are large (K = 2816 for the logits, K = 16384 for the self-conditioning signal), the
regime where split-K pays. Here one program owns a `BLOCK_M x BLOCK_N` output tile and walks
K in `BLOCK_K` steps from 0, accumulating `tl.dot` in fp32; the tile sizes are constants, so
an element's sum depends only on its own row and column (and at most on the row's position
within its BLOCK_M tile, which a canvas keeps in any batch: it is 256 rows, a multiple of
BLOCK_M), never on M or on the rows beside it. Inputs bf16, fp16 or fp32 with any strides
(the sampler passes a transposed embedding view), output fp32 (fp32 inputs multiply in IEEE
fp32, not TF32). `naive_fixed_order_mm` is the reference: torch's product on fp32 copies.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None

# vLLM's batch-invariant bf16 matmul tiles (model_executor/determinism/batch_invariant.py).
LAUNCH = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


if triton is not None:

    @triton.jit
    def _fixed_order_mm_kernel(
        a_ptr, b_ptr, c_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + k[None, :] * stride_ak,
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + k[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn,
                        mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn, acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def fixed_order_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] fp32, each element summed in K order in BLOCK_K steps."""
    assert triton is not None, "fixed_order_mm needs Triton; naive_fixed_order_mm is the torch path"
    assert a.dim() == b.dim() == 2 and a.shape[1] == b.shape[0] and a.dtype == b.dtype, (a.shape, b.shape)
    m, n = a.shape[0], b.shape[1]
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    blocks = {name: LAUNCH[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
    _fixed_order_mm_kernel[grid](
        a, b, out, m, n, a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        # Triton's interpreter multiplies bf16 dot operands as raw integers: upcast on CPU.
        UPCAST=not a.is_cuda and a.dtype != torch.float32,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32 means fp32, not TF32
        num_warps=LAUNCH["num_warps"],
        num_stages=LAUNCH["num_stages"], **blocks)
    return out


def naive_fixed_order_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float() @ b.float()
