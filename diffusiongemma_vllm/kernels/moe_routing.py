"""Triton kernel: the router's expert choice for a block of tokens in one launch.

DiffusionGemma routes each token (model/diffusion_gemma.py `Router`): fp32 softmax over all
experts, the top k, their probabilities renormalised to sum to one, each then scaled by its
expert's learned `per_expert_scale`. In torch (`naive_moe_routing`, the reference and the CPU
path) that is about eight kernels per layer (softmax, top-k, sum, divide, gather, multiply,
casts), some 240 launches in a 30-layer pass, each a couple of microseconds of gap inside a
replayed CUDA graph for a few microseconds of work. Here one program takes BLOCK_T tokens:
it loads their [BLOCK_T, E] logits, computes the softmax, picks the k largest by repeated
row maxima (the largest logit first, the lowest expert index among equal logits), and
writes weights and ids. vLLM's in-tree Gemma 4 fuses its routing the same way.

Differences from the reference: the exponentials are Triton's (a few ulps apart from torch's),
experts whose logits are equal are ordered by index, where torch.topk leaves the order of
equal probabilities unspecified, and a NaN logit counts as -inf (torch gives the row NaN
weights; here the ids stay valid experts either way).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still import this module
    triton = None

BLOCK_T = 16  # tokens per program: a [16, 128] fp32 tile at the release's 128 experts
NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _moe_routing_kernel(logits_ptr, scale_ptr, weights_ptr, ids_ptr, num_tokens, logits_stride,
                            NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        cols = tl.arange(0, BLOCK_K)
        in_rows = rows < num_tokens
        is_expert = experts[None, :] < NUM_EXPERTS
        logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * logits_stride + experts[None, :],
                         mask=in_rows[:, None] & is_expert, other=0.0).to(tl.float32)
        # Padding columns and NaN logits (a broken activation) never win: -inf, and every pick
        # is an unpicked real expert, so ids stay in range whatever the logits hold.
        logits = tl.where(is_expert & (logits == logits), logits, -float("inf"))
        exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = exp / tl.sum(exp, axis=1)[:, None]
        chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        free = tl.broadcast_to(is_expert, [BLOCK_T, BLOCK_E])  # not picked yet
        for j in tl.static_range(TOP_K):
            best = tl.max(tl.where(free, logits, -float("inf")), axis=1)
            index = tl.min(tl.where(free & (logits == best[:, None]), experts[None, :], BLOCK_E), axis=1)
            hit = experts[None, :] == index[:, None]
            chosen = tl.where(cols[None, :] == j, tl.sum(tl.where(hit, probs, 0.0), axis=1)[:, None], chosen)
            ids = tl.where(cols[None, :] == j, index[:, None], ids)
            free = free & ~hit
        is_pick = cols[None, :] < TOP_K
        scale = tl.load(scale_ptr + ids, mask=is_pick, other=1.0).to(tl.float32)
        weights = chosen / tl.sum(chosen, axis=1)[:, None] * scale
        out = rows[:, None].to(tl.int64) * TOP_K + cols[None, :]
        tl.store(weights_ptr + out, weights, mask=in_rows[:, None] & is_pick)
        tl.store(ids_ptr + out, ids, mask=in_rows[:, None] & is_pick)


def moe_routing(logits: torch.Tensor,  # [T, E] router logits (fp32 from the router's GEMM)
                per_expert_scale: torch.Tensor,  # [E]
                top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] fp32, expert ids [T, top_k] int32), largest first."""
    assert triton is not None, "moe_routing needs Triton; naive_moe_routing is the torch path"
    tokens, experts = logits.shape
    assert logits.stride(1) == 1 and per_expert_scale.shape == (experts,) and per_expert_scale.is_contiguous()
    assert 1 <= top_k <= experts, (top_k, experts)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=logits.device)
    if tokens:
        _moe_routing_kernel[(triton.cdiv(tokens, BLOCK_T),)](
            logits, per_expert_scale, weights, ids, tokens, logits.stride(0), NUM_EXPERTS=experts, TOP_K=top_k,
            BLOCK_T=BLOCK_T, BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=NUM_WARPS)
    return weights, ids


def naive_moe_routing(logits: torch.Tensor, per_expert_scale: torch.Tensor,
                      top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference, in torch: softmax over all experts in fp32, top k, renormalise, scale."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k=top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * per_expert_scale[ids].float()
    return weights.float(), ids.to(torch.int32)
