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
from .sampler import sample_pass, stable

RunPass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
SoftEmbed = Callable[[torch.Tensor], torch.Tensor]


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


def denoise_canvases(jobs: list[CanvasJob], run_pass: RunPass, soft_embed: SoftEmbed,
                     sc_dtype: torch.dtype, device: torch.device | str = "cpu",
                     record: bool = False) -> DenoiseResult:
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
        logits = run_pass(rows, canvas[rows], None if soft is None else soft[rows])
        temperature = torch.tensor([jobs[r].sampler.temperature(int(steps[r])) for r in row_list],
                                   device=device, dtype=torch.float32)
        gumbel = torch.stack([jobs[r].noise.gumbel(jobs[r].block, int(steps[r])) for r in row_list])
        renoise = torch.stack([jobs[r].noise.renoise(jobs[r].block, int(steps[r])) for r in row_list])
        result = sample_pass(logits.float(), temperature, gumbel.to(device), renoise.to(device),
                             settings["entropy_bound"][rows])
        is_stable = stable(history[rows], result.argmax, settings["stability_threshold"][rows])
        confident = result.mean_entropy < settings["confidence_threshold"][rows]
        steps[rows] += 1
        halted = (is_stable & confident) | (steps[rows].to(device) >= settings["max_denoising_steps"][rows])

        canvas[rows] = result.next_canvas
        argmax[rows] = result.argmax
        history[rows] = torch.cat([history[rows, 1:], result.argmax[:, None]], dim=1)
        # transformers feeds the scaled logits back in the embedding dtype, then softmaxes in fp32.
        probs = torch.softmax(result.scaled_logits.to(sc_dtype).float(), dim=-1)
        next_soft = soft_embed(probs)
        if soft is None:
            soft = torch.zeros((n, *next_soft.shape[1:]), dtype=next_soft.dtype, device=device)
        soft[rows] = next_soft
        if record:
            records.append(PassRecord(step, row_list, result.argmax.cpu(), result.accepted.cpu(), halted.cpu()))
        active[rows[halted.cpu()]] = False
        step += 1
    return DenoiseResult(argmax, steps, records)
