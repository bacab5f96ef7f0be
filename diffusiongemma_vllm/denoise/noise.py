"""Seeded random draws of the uniform-state sampler, addressed by (seed, block, pass).

Each request owns a seed. Every draw it needs (the initial canvas of a block, the Gumbel
noise that samples a pass, the tokens that re-noise the rejected positions) is a pure
function of (seed, block, pass, kind, position[, vocabulary id]). A request's trajectory
therefore depends on its seed only: not on batching, on which other requests share a pass,
nor on call order. Seeded requests reproduce token for token, the reference generator
replays the exact draws the engine made, and nothing here needs a host round trip: keys of
a whole batch are computed on the device from `[n]` tensors, so the denoise loop can be
captured in a CUDA graph.

All draws are Philox 4x32-10 (counter-based), bit for bit Triton's: `philox_bits(key,
counter)` is `tl.randint(key, counter)` (tokens), and the uniform behind the Gumbel noise of
vocabulary id v is word v % 4 of `tl.rand4x(key, v // 4)` (`vocab_uniform`): one Philox
evaluation serves four ids, which makes the torch path (CPU) 4x cheaper than one evaluation
per id, and lets the Triton statistics kernel feed four ids per evaluation. So the torch
vocab-tiled sampler and the CUDA (GEMM) sampler draw the same Gumbel noise for the same
(row key, vocabulary id), whatever the tiling. Keys chain a 64-bit LCG step per address part (kept to 63 bits so they stay
non-negative int64).
"""

from __future__ import annotations

import torch

INITIAL, GUMBEL, RENOISE = 0, 1, 2
_MASK = (1 << 63) - 1
_LCG_A, _LCG_C = 6364136223846793005, 1442695040888963407

# Philox 4x32-10 constants and tl.rand's int -> [0, 1) scale (triton/language/random.py).
_ROUND_A, _ROUND_B, _KEY_A, _KEY_B = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10


def _philox(keys: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four [N, T] output words (int64 in [0, 2^32)) of tl.randint4x(keys[n], counters[t])."""
    key = keys.to(torch.int64)[:, None]
    k0, k1 = key & _M32, (key >> 32) & _M32
    counters = counters.to(torch.int64)[None, :].expand(key.shape[0], -1)
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        # Products of two uint32 fit 64 bits; int64 wraps, so the bits (and the high word) are exact.
        pb, pa = _ROUND_B * c2, _ROUND_A * c0
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_bits(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """[N, T] int64 in [0, 2^32): tl.randint(keys[n], counters[t]) (keys [N], counters [T])."""
    return _philox(keys, counters)[0]


def vocab_uniform(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[N, stop - start] fp32 in [0, 1): for vocabulary id v, word v % 4 of
    tl.rand4x(keys[n], v // 4) (tl.rand's int -> float map)."""
    first = start // 4
    words = _philox(keys, torch.arange(first, (stop - 1) // 4 + 1, device=keys.device))
    bits = torch.stack(words, dim=-1).flatten(1)[:, start - 4 * first:stop - 4 * first]
    folded = torch.where(bits >= 1 << 31, _M32 - bits, bits)  # tl.rand: int32 x < 0 -> ~x
    return folded.float() * _UNIFORM_SCALE  # a Python scalar: no host-to-device copy (graph capture)


def gumbel_noise(row_keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[R, stop - start] fp32 standard Gumbel noise for rows keyed `row_keys` [R] at vocabulary
    ids [start, stop): -log(-log(u)); u = 0 (p = 2^-31) gives -inf, a token never drawn."""
    return -torch.log(-torch.log(vocab_uniform(row_keys, start, stop)))


def _chain(value, part):
    """One LCG step: works on Python ints and on int64 tensors (which wrap mod 2^64)."""
    return (value * _LCG_A + _LCG_C + part) & _MASK


def block_key(seed: int, block: int) -> int:
    """The key of a request's `block`-th canvas: every draw of that canvas derives from it."""
    return _chain(seed & _MASK, block)


def pass_keys(block_keys: torch.Tensor, steps: torch.Tensor, kind: int) -> torch.Tensor:
    """[n] int64 keys of draw `kind` at pass `steps[n]` of canvases keyed `block_keys[n]`."""
    return _chain(_chain(block_keys, steps), kind)


def uniform_tokens(keys: torch.Tensor, canvas_length: int, vocab_size: int) -> torch.Tensor:
    """[n, C] tokens philox_bits(keys[n], c) % vocab_size: one Triton kernel on CUDA
    (kernels/philox_tokens.py), the torch Philox elsewhere."""
    if keys.is_cuda:
        from diffusiongemma_vllm.kernels.philox_tokens import philox_tokens, triton

        if triton is not None:
            return philox_tokens(keys, canvas_length, vocab_size)
    return philox_bits(keys, torch.arange(canvas_length, device=keys.device)) % vocab_size


def initial_tokens(block_keys: torch.Tensor, canvas_length: int, vocab_size: int) -> torch.Tensor:
    """[n, C] starting canvases: tokens uniform over the whole vocabulary, special ones included."""
    return uniform_tokens(pass_keys(block_keys, torch.zeros_like(block_keys), INITIAL), canvas_length, vocab_size)


def renoise_tokens(block_keys: torch.Tensor, steps: torch.Tensor, canvas_length: int, vocab_size: int) -> torch.Tensor:
    """[n, C] fresh uniform tokens for the positions pass `steps[n]` does not accept."""
    return uniform_tokens(pass_keys(block_keys, steps, RENOISE), canvas_length, vocab_size)


def gumbel_row_keys(block_keys: torch.Tensor, steps: torch.Tensor, canvas_length: int) -> torch.Tensor:
    """[n, C] row keys of pass `steps[n]`'s Gumbel noise, one per canvas position."""
    keys = pass_keys(block_keys, steps, GUMBEL)
    return keys[:, None] ^ torch.arange(canvas_length, device=keys.device)


class CanvasNoise:
    """One request's draws, one canvas at a time (the reference generator's view)."""

    def __init__(self, seed: int, vocab_size: int, canvas_length: int):
        self.seed, self.vocab_size, self.canvas_length = seed, vocab_size, canvas_length

    def _key(self, block: int) -> torch.Tensor:
        return torch.tensor([block_key(self.seed, block)])

    def initial_canvas(self, block: int) -> torch.Tensor:
        return initial_tokens(self._key(block), self.canvas_length, self.vocab_size)[0]

    def renoise(self, block: int, step: int) -> torch.Tensor:
        return renoise_tokens(self._key(block), torch.tensor([step]), self.canvas_length, self.vocab_size)[0]

    def gumbel(self, block: int, step: int) -> torch.Tensor:
        """[C, V] standard Gumbel noise: argmax(log p + g) is a draw from p."""
        keys = gumbel_row_keys(self._key(block), torch.tensor([step]), self.canvas_length)[0]
        return gumbel_noise(keys, 0, self.vocab_size)
