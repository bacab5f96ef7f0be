"""Seeded random draws of the uniform-state sampler, addressed by (block, pass).

Each request owns a seed. Every draw it needs (the initial canvas of a block, the Gumbel
noise that samples a pass, the tokens that re-noise the rejected positions) is keyed by
(seed, block, pass, kind). A request's trajectory therefore depends on its seed only: not on
batching, on which other requests share a pass, nor on call order. That makes seeded
requests reproducible token for token and lets the reference generator replay the exact
draws the engine made.

The Gumbel noise of (canvas position, vocabulary id) is a counter-based hash (splitmix64 of
row key and id), so any tile of the [C, V] noise can be computed on its own: the
vocab-tiled sampler never materialises it, and still draws exactly what the reference
draws. Canvas and re-noise tokens ([C] each) come from a seeded torch generator.
"""

from __future__ import annotations

import torch

_INITIAL, _GUMBEL, _RENOISE = 0, 1, 2
# Bound at import so that code patching torch's samplers (the reference generator replays
# these draws inside transformers' generate) cannot reach them.
_randint = torch.randint
_MASK = (1 << 63) - 1


def _wrap(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _wrap(0x9E3779B97F4A7C15), _wrap(0xBF58476D1CE4E5B9), _wrap(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def gumbel_noise(row_keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """[R, T] fp32 standard Gumbel noise for rows with int64 keys `row_keys` [R] at
    vocabulary ids `vocab_ids` [T]; the same (key, id) always gives the same value."""
    bits = _splitmix64(_splitmix64(row_keys[:, None]) ^ vocab_ids[None, :].to(torch.int64))
    uniform = (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).to(torch.float32)


def _key(seed: int, block: int, step: int, kind: int) -> int:
    value = seed & _MASK
    for part in (block, step, kind):
        value = (value * 6364136223846793005 + 1442695040888963407 + part) & _MASK
    return value


class CanvasNoise:
    def __init__(self, seed: int, vocab_size: int, canvas_length: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length
        self.device = torch.device(device)

    def _generator(self, block: int, step: int, kind: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_key(self.seed, block, step, kind))

    def initial_canvas(self, block: int) -> torch.Tensor:
        """[C] tokens drawn uniformly over the whole vocabulary, special tokens included."""
        return _randint(0, self.vocab_size, (self.canvas_length,), device=self.device,
                        generator=self._generator(block, 0, _INITIAL))

    def renoise(self, block: int, step: int) -> torch.Tensor:
        """[C] fresh uniform tokens for the positions pass `step` did not accept."""
        return _randint(0, self.vocab_size, (self.canvas_length,), device=self.device,
                        generator=self._generator(block, step, _RENOISE))

    def gumbel_keys(self, block: int, step: int) -> torch.Tensor:
        """[C] int64 row keys of pass `step`'s Gumbel noise, one per canvas position."""
        return torch.arange(self.canvas_length, device=self.device) ^ _key(self.seed, block, step, _GUMBEL)

    def gumbel(self, block: int, step: int) -> torch.Tensor:
        """[C, V] standard Gumbel noise: argmax(log p + g) is a draw from p."""
        return gumbel_noise(self.gumbel_keys(block, step), torch.arange(self.vocab_size, device=self.device))
