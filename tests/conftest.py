"""Shared fixtures: tiny checkpoints in the release layout, built once per session."""

from __future__ import annotations

import os

import pytest

from diffusiongemma_vllm.testing.cpu_ranks import cpu_rank_binding
from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Triton kernels run on CPU tensors in Triton's interpreter. Set before anything imports a
# kernel: the interpreter is chosen when @triton.jit decorates. vLLM ignores it (its Triton
# use depends on a CPU backend, which PyPI's triton lacks).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Two backbones: the default (one sliding, one full layer) and one with the release's
# several-sliding-per-full pattern, different head dims and GQA ratios, an odd window and an
# expert width vLLM's CPU MoE kernel pads (hidden sizes must be multiples of 32 there).
SPECS = {
    "sf": TinySpec(),
    "sssf": TinySpec(layer_types=("sliding_attention",) * 3 + ("full_attention",) * 1 + ("sliding_attention", "full_attention"),
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16, global_head_dim=32,
                     num_global_key_value_heads=2, sliding_window=11, num_experts=8, top_k_experts=3,
                     hidden_size=96, intermediate_size=64, moe_intermediate_size=24, canvas_length=16),
    # The release's unequal per-layer KV pages (sliding 8 x 256 vs full 2 x 512: 2 to 1): vLLM
    # then gives the two cache groups different block sizes.
    "unequal_pages": TinySpec(num_key_value_heads=4, head_dim=32, global_head_dim=64, num_global_key_value_heads=1),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    return {name: str(build_tiny_checkpoint(tmp_path_factory.mktemp(name), spec, seed=7))
            for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> str:
    return tiny_dirs["sf"]


@pytest.fixture
def bind_cpu_ranks(monkeypatch):
    """bind(ranks): give each tensor-parallel rank of a vllm-cpu engine started in this test
    its own cores (testing/cpu_ranks.py); skips when there are fewer cores than ranks."""

    def bind(ranks: int) -> None:
        binding = cpu_rank_binding(ranks)
        if binding is None:
            pytest.skip(f"{ranks} tensor-parallel ranks need {ranks} cores")
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", binding)

    return bind
