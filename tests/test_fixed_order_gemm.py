"""The fixed-order GEMM (the GEMM sampler's products under vLLM's batch-invariant mode) against
torch's product on fp32 copies, on CPU in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1). Tolerance: fp32 sums of the same exact products in another order,
1e-5 relative to the largest output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.fixed_order_gemm import LAUNCH, fixed_order_mm, naive_fixed_order_mm  # noqa: E402


@pytest.mark.parametrize("m, k, n", [(1, 16, 16), (130, 70, 300), (7, 200, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_fp32_product(m, k, n, dtype):
    """Catches masked edges read or written wrongly (shapes that are not multiples of the
    tiles), K steps skipped or repeated, or an output that is not fp32."""
    gen = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    got = fixed_order_mm(a, b)
    want = naive_fixed_order_mm(a, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_strided_operands_and_rows_alone_equal_the_same_rows_in_a_batch():
    """Catches strides ignored (the sampler multiplies by a transposed view of the embedding and
    slices of it) and a row's sum that depends on the number of rows or on the rows beside
    it, the property the kernel exists for: bit-identical alone and among 130 rows, for rows
    at the same position within a BLOCK_M tile (a canvas is 256 rows, a multiple of BLOCK_M,
    so its rows keep their positions in any batch; the interpreter's numpy dots can round a
    row differently at another position)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(130, 70, generator=gen).bfloat16()
    embedding = torch.randn(300, 70, generator=gen).bfloat16()
    chunk = embedding[100:240]
    batched = fixed_order_mm(hidden, chunk.T)
    assert (batched - naive_fixed_order_mm(hidden, chunk.T)).abs().max() <= 1e-5 * batched.abs().max()
    assert LAUNCH["BLOCK_M"] == 128 and 256 % LAUNCH["BLOCK_M"] == 0
    assert torch.equal(fixed_order_mm(hidden[:3], chunk.T), batched[:3])
    assert torch.equal(fixed_order_mm(hidden[128:], chunk.T), batched[128:])
