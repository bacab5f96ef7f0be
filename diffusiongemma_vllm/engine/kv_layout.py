"""Reading committed K/V back out of vLLM's paged cache, per attention backend.

Every backend in vLLM 0.32 gives a layer the logical cache `[num_blocks, kv_heads,
block_size, 2 * head_dim]`, but what lives inside a (block, head) page differs:
- GPU backends (FLASH_ATTN, TRITON_ATTN) store each token as [K | V]: a strided view reads it.
- CPU_ATTN stores the page's K half then its V half, each in an ISA-specific order (K
  transposed for the vector ISAs, VNNI tiles for AMX). We do not hard-code those orders: the
  first read of a (isa, dtype, head_dim, block_size) writes index-coded K/V through vLLM's
  own `cpu_attn_reshape_and_cache` into a scratch page and records where each (token, dim)
  landed, then reads with that permutation.

`read_tokens` returns `[T, kv_heads, head_dim]` K and V for given slots (block ids are the
layer's kernel blocks), `read_slots` for a request's slots from `token_slots` (its block-table
row; `first_kept` is where a sliding layer's kept tokens start); `paged_views` returns
zero-copy `[blocks, block_size, kv_heads, head_dim]` K and V views of a GPU cache for the
Triton kernel. `check_caches` runs once at
start-up, after vLLM allocated the caches: every layer's backend must be one whose pages
these functions read, and its cache must have the geometry they assume. Block tables
count blocks of the group's manager block size (`kv_cache_spec.block_size`); a cache tensor's
kernel block (`kv_cache.shape[2]`) may be smaller (one manager block is then several
consecutive kernel blocks), never larger. The GPU layout is the one vLLM 0.32's FLASH_ATTN
and TRITON_ATTN write (tests/test_vllm_contract.py runs their writers against `paged_views`);
it has not yet been exercised on a GPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def _cpu_page_permutation(isa: str, dtype: torch.dtype, head_dim: int, block_size: int):
    """(k_perm, v_perm) [block_size, head_dim]: flat index of (token, dim) within a page half."""
    from vllm import _custom_ops as ops

    page = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_half, value_half = page.chunk(2, dim=2)
    slots = torch.arange(block_size)
    token = torch.arange(block_size).view(-1, 1, 1).expand(block_size, 1, head_dim).float()
    dim = torch.arange(head_dim).view(1, 1, -1).expand(block_size, 1, head_dim).float()
    perms = []
    for half in (key_half, value_half):
        # Three codes, each exact in bf16: token + 1, dim % 256 + 1, dim // 256 + 1.
        landed = []
        for code in (token + 1, dim % 256 + 1, dim // 256 + 1):
            page.zero_()
            ops.cpu_attn_reshape_and_cache(code.to(dtype), code.to(dtype), key_half, value_half, slots, isa)
            landed.append(half[0, 0].contiguous().view(-1).float().long() - 1)
        where_token, where_dim = landed[0], landed[1] + 256 * landed[2]
        if (where_token < 0).any():
            raise RuntimeError(f"CPU KV layout calibration left cells unwritten (isa={isa}, dtype={dtype})")
        perm = torch.empty(block_size, head_dim, dtype=torch.long)
        perm[where_token, where_dim] = torch.arange(block_size * head_dim)
        perms.append(perm)
    return tuple(perms)


def check_caches(runner) -> None:
    """Refuse, at start-up, KV caches the denoise attention would misread (naming the layer)."""
    from diffusiongemma_vllm.engine.config_hook import check_backend_name

    platform = "cpu" if runner.device.type == "cpu" else "gpu"
    layers = runner.compilation_config.static_forward_context
    for group in runner.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            layer = layers[name]
            check_backend_name(layer.attn_backend.get_name(), platform)
            _, heads, kernel_block, twice_dim = layer.kv_cache.shape
            if (heads, twice_dim) != (spec.num_kv_heads, 2 * spec.head_size) or spec.block_size % kernel_block:
                raise RuntimeError(f"{name}: KV cache of shape {tuple(layer.kv_cache.shape)} does not hold "
                                   f"{spec.num_kv_heads} heads x 2 x {spec.head_size} in kernel blocks dividing "
                                   f"the block table's {spec.block_size} tokens")


def paged_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as `[num_blocks, block_size, kv_heads, head_dim]` views of a GPU layer cache."""
    assert kv_cache.device.type != "cpu", "CPU_ATTN pages are ISA-specific: use read_tokens"
    head_dim = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_dim].transpose(1, 2), kv_cache[..., head_dim:].transpose(1, 2)


def read_tokens(layer, kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor):
    """K, V `[T, kv_heads, head_dim]` of the tokens at (blocks[t], offsets[t])."""
    num_blocks, heads, block_size, twice_dim = kv_cache.shape
    head_dim = twice_dim // 2
    if kv_cache.device.type != "cpu":
        per_token = kv_cache[blocks, :, offsets]  # [T, heads, 2 * head_dim]
        return per_token[..., :head_dim], per_token[..., head_dim:]
    k_perm, v_perm = _cpu_page_permutation(layer.isa, kv_cache.dtype, head_dim, block_size)
    pages = kv_cache.view(num_blocks, heads, 2, block_size * head_dim)[blocks]  # [T, heads, 2, BS*D]
    out = []
    for half, perm in ((0, k_perm), (1, v_perm)):
        index = perm[offsets].unsqueeze(1).expand(-1, heads, -1)  # [T, heads, D]
        out.append(torch.gather(pages[:, :, half], 2, index))
    return tuple(out)


def first_kept(position: int, window: int | None) -> int:
    """The first position a layer's cache still holds for attention up to `position`: a sliding
    layer keeps the last window - 1 tokens before it (all that vLLM keeps), a full layer all."""
    return max(0, position - (window - 1)) if window else 0


def token_slots(table_row: np.ndarray, positions: np.ndarray, block_size: int) -> torch.Tensor:
    """The cache slots of a request's token `positions`, from its block-table row (blocks of
    `block_size` tokens: the KV cache group's manager block size)."""
    return torch.from_numpy(table_row[positions // block_size].astype(np.int64) * block_size + positions % block_size)


def read_slots(layer, slots: torch.Tensor):
    """K, V `[T, kv_heads, head_dim]` of the tokens at `slots` (token_slots) of `layer`'s cache."""
    kernel_block = layer.kv_cache.shape[2]
    slots = slots.to(layer.kv_cache.device)
    return read_tokens(layer, layer.kv_cache, slots // kernel_block, slots % kernel_block)
