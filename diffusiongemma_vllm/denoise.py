"""The denoise loop: every active canvas of a step, pass after pass, until each halts.

All canvases of all requests go through each pass together; a canvas that halts leaves the
batch, so it costs no further work. Between passes the sampler runs on device (sampler.py),
each canvas with its own settings, pass counter and seeded draws (noise.py). The loop does
not know how a pass is computed: the engine and the standalone runner each supply
`run_pass(rows, canvas, soft_embeds) -> logits` over the subset `rows` of canvases.

The result is each canvas's argmax at its halting pass (what gets committed), the number of
passes it took, and optionally a per-pass record for tracing and reference comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import SamplerConfig
from .noise import CanvasNoise
from .kernels.vocab_tiled_sampler import vocab_tiled_row_stats
from .sampler import decide, stable

RunPass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Unembedding:
    """The tied embedding as the sampler uses it: logits = softcap(h . E), and the
    self-conditioning signal softmax(z) @ E * scale."""

    weight: torch.Tensor  # [V, H]
    softcap: float
    scale: float


@dataclass(frozen=True)
class CanvasJob:
    """One request's canvas in this step."""

    block: int  # how many canvases this request has committed before
    sampler: SamplerConfig
    noise: CanvasNoise


@dataclass
class PassRecord:
    """What one pass decided for the canvases in it (all canvases of a step start together)."""

    step: int
    rows: list[int]
    argmax: torch.Tensor  # [m, C]
    accepted: torch.Tensor  # [m, C]
    halted: torch.Tensor  # [m]


@dataclass
class DenoiseResult:
    tokens: torch.Tensor  # [n, C] committed argmax canvases
    passes: torch.Tensor  # [n] passes each canvas ran
    records: list[PassRecord] = field(default_factory=list)


def denoise_canvases(jobs: list[CanvasJob], run_pass: RunPass, unembedding: Unembedding,
                     device: torch.device | str = "cpu", record: bool = False) -> DenoiseResult:
    n = len(jobs)
    canvas = torch.stack([job.noise.initial_canvas(job.block) for job in jobs]).to(device)
    argmax = canvas.clone()
    max_history = max(1, max(job.sampler.stability_threshold for job in jobs))
    history = torch.full((n, max_history, canvas.shape[1]), -1, dtype=canvas.dtype, device=device)
    soft: torch.Tensor | None = None
    steps = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    settings = {name: torch.tensor([getattr(job.sampler, name) for job in jobs], device=device)
                for name in ("entropy_bound", "stability_threshold", "confidence_threshold",
                             "max_denoising_steps")}
    records = []
    step = 0
    while active.any():
        rows = active.nonzero().squeeze(-1)
        row_list = rows.tolist()
        hidden = run_pass(rows, canvas[rows], None if soft is None else soft[rows])  # [m, C, H]
        m, length, width = hidden.shape
        temperature = torch.tensor([jobs[r].sampler.temperature(int(steps[r])) for r in row_list],
                                   device=device, dtype=torch.float32).repeat_interleave(length)
        keys = torch.cat([jobs[r].noise.gumbel_keys(jobs[r].block, int(steps[r])) for r in row_list]).to(device)
        renoise = torch.stack([jobs[r].noise.renoise(jobs[r].block, int(steps[r])) for r in row_list])
        stats = vocab_tiled_row_stats(hidden.reshape(m * length, width), unembedding.weight, unembedding.softcap,
                                      temperature, keys, with_soft=True)
        result = decide(stats.argmax.view(m, length), stats.sample.view(m, length), stats.entropy.view(m, length),
                        renoise.to(device), settings["entropy_bound"][rows])
        is_stable = stable(history[rows], result.argmax, settings["stability_threshold"][rows])
        confident = result.mean_entropy < settings["confidence_threshold"][rows]
        steps[rows] += 1
        halted = (is_stable & confident) | (steps[rows].to(device) >= settings["max_denoising_steps"][rows])

        canvas[rows] = result.next_canvas
        argmax[rows] = result.argmax
        history[rows] = torch.cat([history[rows, 1:], result.argmax[:, None]], dim=1)
        next_soft = (stats.soft * unembedding.scale).view(m, length, width).to(hidden.dtype)
        if soft is None:
            soft = torch.zeros((n, length, width), dtype=hidden.dtype, device=device)
        soft[rows] = next_soft
        if record:
            records.append(PassRecord(step, row_list, result.argmax.cpu(), result.accepted.cpu(), halted.cpu()))
        active[rows[halted.cpu()]] = False
        step += 1
    return DenoiseResult(argmax, steps, records)
