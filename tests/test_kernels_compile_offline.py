"""Every Triton kernel, at the launch settings the plugin uses, compiled for real GPUs offline.

The parity tests run the kernels in Triton's interpreter, which accepts code that fails to
compile, runs out of shared memory or spills registers on a GPU; a lent GPU is rare and its
minutes are few. Here Triton compiles each kernel to a cubin for an H100 (sm_90), for Ampere
(sm_86, RTX 30xx: users serve on consumer cards; its dots take another code path than
Hopper's) and, for the attention's COMPACT_LAUNCH (the fallback for GPUs with less shared
memory), for sm_89 and sm_86, without a GPU, and `ptxas -v` reports its spills. The attention kernel at its LAUNCH table spills (4.8 KB of
spill stores at head dim 256, 2.6 KB at 512, Triton 3.9 with ptxas 13.4; so did each of 16
other tile shapes tried, see paged_canvas_attention.py): there the check is that it compiles
within the shared memory; the other kernels must not spill at all. Pointer arguments are assumed 16-byte aligned, as torch
allocations are. The compiles run in a child process: tests/conftest.py puts this process's
kernels in the interpreter, which cannot compile them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

if __name__ != "__main__":
    pytest.importorskip("triton.backends.nvidia.compiler")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nvidia  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from diffusiongemma_vllm.kernels import (fixed_order_gemm, gemm_sampler, moe_routing,  # noqa: E402
                                         paged_canvas_attention, philox_tokens, qkv_norm_rope, residual_norms)

HOPPER = GPUTarget("cuda", 90, 32)
ADA = GPUTarget("cuda", 89, 32)
AMPERE = GPUTarget("cuda", 86, 32)  # RTX 30xx; an A100 (sm_80) has the same instructions, more shared memory
SHARED_LIMIT = {90: paged_canvas_attention.HOPPER_SHARED_MEM, 89: 101376, 86: 101376}  # opt-in bytes per block


def compile_for(target, kernel, pointer_types: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                floats: tuple = ()) -> tuple[int, int]:
    """(shared memory bytes, spill store bytes) of `kernel` compiled for `target`."""
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else pointer_types.get(p, "fp32" if p in floats else "i32")
                 for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in pointer_types}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared, spill_stores(compiled.asm["ptx"], target.arch)


def spill_stores(ptx: str, arch: int) -> int:
    ptxas = nvidia.get_ptxas(arch).path
    report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", "-", "-o", "/dev/null"],
                            input=ptx, capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


ATTENTION_POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                      "out_ptr": "*fp32", "lse_ptr": "*fp32", "table_ptr": "*i32", "ctx_ptr": "*i64"}


def compile_attention(target, head_dim: int, launch: dict, split: bool, sliding: bool) -> tuple[int, int]:
    block_dv = launch["block_dv"] or head_dim
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_DV=block_dv, BLOCK_M=launch["block_m"],
                      BLOCK_N=launch["block_n"], SPLIT=split, CAUSAL=False, SLIDING=sliding, UPCAST=False)
    pointers = dict(ATTENTION_POINTERS, out_ptr="*fp32" if split else "*bf16")
    return compile_for(target, paged_canvas_attention._paged_canvas_attention_kernel, pointers, constexprs,
                       launch["num_warps"], launch["num_stages"], floats=("qk_scale",))


def oversized_launch() -> dict:
    """A 512-wide output slice with 64-key tiles at head dim 512: more shared memory than an
    H100 has (the control that shows the check can fail)."""
    return dict(block_m=128, block_n=64, block_dv=512, num_warps=8, num_stages=2)


def compile_all() -> dict:
    """name -> [shared bytes, spill store bytes] of every kernel the plugin launches on a GPU."""
    out = {}
    for head_dim, launch in paged_canvas_attention.LAUNCH.items():
        for split in (False, True):
            out[f"attention_{head_dim}_split_{split}"] = compile_attention(HOPPER, head_dim, launch, split,
                                                                           sliding=head_dim == 256)
    for head_dim in (256, 512):
        for target in (ADA, AMPERE):
            out[f"compact_{head_dim}_sm{target.arch}"] = compile_attention(
                target, head_dim, paged_canvas_attention.COMPACT_LAUNCH, True, sliding=False)
    out["oversized_512"] = compile_attention(HOPPER, 512, oversized_launch(), True, sliding=False)
    for target in (HOPPER, AMPERE):  # Hopper's dots and Ampere's take different code paths
        out.update({f"{name}_sm{target.arch}": result for name, result in compile_others(target).items()})
    return out


def compile_others(target) -> dict:
    """Every kernel but the attention, at its launch settings, for `target`."""
    out = {}
    for head_dim in (256, 512):
        out[f"combine_{head_dim}"] = compile_for(
            target, paged_canvas_attention._combine_splits_kernel,
            {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
            dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=4096 // head_dim), num_warps=4)
    defaults = inspect.signature(gemm_sampler.gemm_row_stats).parameters
    pointers = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "t_ptr": "*fp32", "key_ptr": "*i64", "stats_ptr": "*fp32",
                "ids_ptr": "*i64", "probs_ptr": "*bf16", "running_max_ptr": "*fp32", "scale_ptr": "*fp32"}
    for with_soft, has_bias in ((False, False), (True, False), (True, True)):
        out[f"sampler_soft_{with_soft}" + "_bias" * has_bias] = compile_for(
            target, gemm_sampler._chunk_stats_kernel, pointers,
            dict(WITH_SOFT=with_soft, HAS_BIAS=has_bias, BLOCK=defaults["block"].default),
            num_warps=defaults["num_warps"].default, floats=("softcap",))
    out["philox_tokens"] = compile_for(target, philox_tokens._philox_tokens_kernel,
                                       {"key_ptr": "*i64", "out_ptr": "*i64"}, dict(BLOCK=256), num_warps=4)
    out["moe_routing"] = compile_for(
        target, moe_routing._moe_routing_kernel,
        {"logits_ptr": "*fp32", "scale_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i32"},
        dict(NUM_EXPERTS=128, TOP_K=8, BLOCK_T=moe_routing.BLOCK_T, BLOCK_E=128, BLOCK_K=8),
        num_warps=moe_routing.NUM_WARPS)
    for head_dim, kv_heads in ((256, 8), (512, 2)):  # the release's sliding and full layers
        out[f"qkv_norm_rope_{head_dim}"] = compile_for(
            target, qkv_norm_rope._qkv_norm_rope_kernel,
            {name: "*i64" if name == "positions_ptr" else "*bf16" for name in
             ("qkv_ptr", "positions_ptr", "q_weight_ptr", "k_weight_ptr", "cos_sin_ptr", "q_ptr", "k_ptr", "v_ptr")},
            dict(NUM_HEADS=16, NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim), num_warps=qkv_norm_rope._warps(head_dim),
            floats=("eps",))
    rows = dict(BLOCK=4096)  # the release's hidden size, 2816, padded
    out["post_attention_norms"] = compile_for(
        target, residual_norms._post_attention_kernel, dict.fromkeys(
            ("attn_ptr", "hidden_ptr", "post_attention_ptr", "pre_ff_ptr", "pre_ff2_ptr", "router_scale_ptr",
             "residual_ptr", "ff_ptr", "ff2_ptr", "router_ptr"), "*bf16"),
        rows, num_warps=residual_norms._warps(rows["BLOCK"]), floats=("eps", "root_size"))
    out["layer_output"] = compile_for(
        target, residual_norms._layer_output_kernel, dict.fromkeys(
            ("dense_ptr", "routed_ptr", "residual_ptr", "post_ff1_ptr", "post_ff2_ptr", "post_ff_ptr",
             "layer_scalar_ptr", "out_ptr"), "*bf16"),
        rows, num_warps=residual_norms._warps(rows["BLOCK"]), floats=("eps",))
    launch = fixed_order_gemm.LAUNCH
    out["fixed_order_gemm"] = compile_for(
        target, fixed_order_gemm._fixed_order_mm_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
        dict(BLOCK_M=launch["BLOCK_M"], BLOCK_N=launch["BLOCK_N"], BLOCK_K=launch["BLOCK_K"], UPCAST=False,
             PRECISION="tf32"), num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("head_dim", sorted(paged_canvas_attention.LAUNCH))
@pytest.mark.parametrize("split", [False, True])
def test_attention_launch_table_fits_an_h100(compiled, head_dim, split):
    """Catches a LAUNCH entry (or a kernel edit) that fails to compile for an H100 or needs
    more shared memory than it has, in the release layers (head dim 256 sliding, 512 full)."""
    shared, _ = compiled[f"attention_{head_dim}_split_{split}"]
    assert shared <= SHARED_LIMIT[90], shared


@pytest.mark.parametrize("arch", [89, 86])
@pytest.mark.parametrize("head_dim", [256, 512])
def test_compact_launch_fits_smaller_gpus(compiled, head_dim, arch):
    """Catches a COMPACT_LAUNCH that would not fit, or not compile for, the GPUs it exists
    for: Ada (sm_89) and Ampere (sm_86, RTX 30xx; an A100 has more shared memory), 99 KB."""
    shared, _ = compiled[f"compact_{head_dim}_sm{arch}"]
    assert shared <= SHARED_LIMIT[arch], shared


def test_the_check_sees_an_oversized_launch(compiled):
    """Catches a check that cannot fail (shared memory misread as 0, say)."""
    assert compiled["oversized_512"][0] > SHARED_LIMIT[90]


@pytest.mark.parametrize("name", ["combine_256", "combine_512", "sampler_soft_False", "sampler_soft_True",
                                  "sampler_soft_True_bias",
                                  "philox_tokens", "fixed_order_gemm", "moe_routing", "qkv_norm_rope_256",
                                  "qkv_norm_rope_512", "post_attention_norms", "layer_output"])
@pytest.mark.parametrize("arch", [90, 86])
def test_other_kernels_compile_without_spills(compiled, name, arch):
    """Catches the split combine, the sampler's statistics kernel (a loop-carried type change,
    a join or reshape the GPU backend rejects), the token kernel, the fixed-order GEMM, the
    router's kernel (at the release's 128 experts, top 8), the per-head norms with RoPE (head
    dims 256 and 512) or the residual norms (hidden 2816) failing to compile for an H100 or
    spilling at their launch settings, for an H100 or for Ampere (whose dots take another path)."""
    shared, spills = compiled[f"{name}_sm{arch}"]
    assert shared <= SHARED_LIMIT[arch] and spills == 0, (shared, spills)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
