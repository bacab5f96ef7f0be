"""Seeded random draws of the uniform-state sampler, addressed by (block, pass).

Each request owns a seed. Every draw it needs (the initial canvas of a block, the Gumbel
noise that samples a pass, the tokens that re-noise the rejected positions) comes from its
own generator, keyed by (seed, block, pass, kind). A request's trajectory therefore depends
on its seed only: not on batching, on which other requests share a pass, nor on call order.
That makes seeded requests reproducible token for token and lets the reference generator
replay the exact draws the engine made.
"""

from __future__ import annotations

import torch

_INITIAL, _GUMBEL, _RENOISE = 0, 1, 2
# Bound at import so that code patching torch's samplers (the reference generator replays
# these draws inside transformers' generate) cannot reach them.
_randint, _rand = torch.randint, torch.rand
_MASK = (1 << 63) - 1


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

    def gumbel(self, block: int, step: int) -> torch.Tensor:
        """[C, V] standard Gumbel noise: argmax(log p + g) is a draw from p."""
        uniform = _rand((self.canvas_length, self.vocab_size), device=self.device,
                         generator=self._generator(block, step, _GUMBEL))
        tiny = torch.finfo(uniform.dtype).tiny
        return -torch.log(-torch.log(uniform.clamp(min=tiny)))
