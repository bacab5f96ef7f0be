"""The Philox token kernel against noise.py's torch Philox, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from diffusiongemma_vllm.kernels.philox_tokens import philox_tokens  # noqa: E402
from diffusiongemma_vllm.denoise.noise import philox_bits  # noqa: E402


@pytest.mark.parametrize("length, vocab_size, block", [(256, 262144, 256), (81, 30, 32), (5, 7, 16)])
def test_kernel_draws_the_torch_tokens(length, vocab_size, block):
    """Catches a CUDA re-noise that differs from the CPU one (another Philox output word, a
    sign-extended uint32, a row or offset off by one): seeded requests would then give other
    tokens on a GPU than in the reference replay."""
    keys = torch.tensor([0, 1, 12345, 2**31 + 7, 2**62 + 99, 2**63 - 1, 987654321987])
    want = philox_bits(keys, torch.arange(length)) % vocab_size
    got = philox_tokens(keys, length, vocab_size, block=block)
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < vocab_size


def test_no_canvases_is_an_empty_result():
    """Catches a zero-size launch grid (an error in Triton) when no canvas is running."""
    assert philox_tokens(torch.zeros(0, dtype=torch.int64), 16, 100).shape == (0, 16)
