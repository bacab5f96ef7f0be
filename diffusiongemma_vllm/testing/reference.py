"""Ground truth: transformers' own `generate`, replaying the plugin's seeded draws.

`reference_generate` runs `DiffusionGemmaForBlockDiffusion.generate` unchanged for one
prompt, with its three sources of randomness (the initial canvas `torch.randint`, the
per-pass `torch.multinomial`, the re-noise `torch.randint`) answered from a `CanvasNoise`
with the request's seed. transformers draws in a fixed order per block (canvas, then per
pass: sample, re-noise), which tells each call its (block, pass) address. Sampling replays
Gumbel-max with the same noise on transformers' own probabilities (argmax(log p + g); the
plugin computes argmax(z + g), identical but for float ties).

It also records, per pass, the argmax canvas (through the draft streamer) and the accepted
positions, so tests compare the plugin's decisions pass by pass, not just the output; and
per block the halting pass's logits at temperature 1, materialised, the ground truth of
the plugin's logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from unittest import mock

import torch

from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.noise import CanvasNoise


@dataclass
class ReferenceTrace:
    sequences: torch.Tensor | None = None  # [1, prompt + k*C]
    argmax: list[list[torch.Tensor]] = field(default_factory=list)  # [block][pass] -> [C]
    accepted: list[list[torch.Tensor]] = field(default_factory=list)  # [block][pass] -> [C]
    final_logits: list[torch.Tensor] = field(default_factory=list)  # [block] -> [C, V] fp32, temperature 1


class _Replay:
    """Answers transformers' random calls from `noise`, tracking (block, pass). A constrained
    read's draws (`allowed`, sorted) take the noise the plugin keys by each id's index among
    the allowed ids (denoise/loop.py `Unembedding.restricted`), from `allowed_noise`."""

    def __init__(self, noise: CanvasNoise, trace: ReferenceTrace, allowed: torch.Tensor | None = None,
                 allowed_noise: CanvasNoise | None = None):
        self.noise, self.trace = noise, trace
        self.allowed, self.allowed_noise = allowed, allowed_noise
        self.block, self.step, self.after_sample = -1, 0, False
        self._randint, self._multinomial = torch.randint, torch.multinomial

    def randint(self, *args, **kwargs):
        if not self.after_sample:  # the first draw of a block: its initial canvas
            self.block, self.step = self.block + 1, 0
            self.trace.argmax.append([])
            self.trace.accepted.append([])
            return self.noise.initial_canvas(self.block)[None]
        self.after_sample = False
        tokens = self.noise.renoise(self.block, self.step)[None]
        self.step += 1
        return tokens

    def multinomial(self, probs, num_samples, *args, **kwargs):
        self.after_sample = True
        if self.allowed is None:
            gumbel = self.noise.gumbel(self.block, self.step).to(probs.device)
        else:  # log p is -inf outside the allowed ids: only their noise matters
            gumbel = torch.zeros(probs.shape)
            gumbel[:, self.allowed] = self.allowed_noise.gumbel(self.block, self.step)
        return torch.argmax(torch.log(probs) + gumbel, dim=-1, keepdim=True)


class _DraftRecorder:
    """A draft-capable streamer given each pass's logits (transformers' temperature-scaled
    ones): records the argmax canvas after every pass, and the block's latest logits at
    temperature 1 (the last recorded is the halting pass's)."""

    _takes_logits = True

    def __init__(self, trace: ReferenceTrace, sampler: SamplerConfig):
        self.trace, self.sampler = trace, sampler

    def put(self, value):
        pass

    def put_draft(self, logits):
        passes = self.trace.argmax[-1]
        passes.append(logits[0].argmax(-1))
        temperature = self.sampler.temperature(len(passes) - 1)
        if len(self.trace.final_logits) < len(self.trace.argmax):
            self.trace.final_logits.append(None)
        self.trace.final_logits[-1] = logits[0].float() * temperature

    def end(self):
        pass


class _AllowedOnly:
    """A transformers logits processor (applied before the temperature schedule): every logit
    outside `allowed` becomes -inf, vLLM's definition of a constrained read."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.allowed] = True
        return scores.masked_fill(~keep, float("-inf"))


class _Biased:
    """A transformers logits processor adding (token, value, before) biases: `value` to the
    token's logit at the canvas positions whose output index (tokens generated before them) is
    below `before` (None: every position); what vLLM's logit bias, bad words and min_tokens do
    to one next-token distribution, here to every position of a canvas."""

    def __init__(self, prompt_length: int, biases: list[tuple[int, float, int | None]]):
        self.prompt_length, self.biases = prompt_length, biases

    def __call__(self, input_ids, scores):  # scores [batch, canvas, vocab]
        generated = input_ids.shape[1] - self.prompt_length
        positions = torch.arange(scores.shape[1])
        scores = scores.clone()
        for token, value, before in self.biases:
            covered = positions if before is None else positions[generated + positions < before]
            scores[:, covered, token] += value
        return scores


def reference_generate(model, prompt_ids: list[int], seed: int, num_blocks: int, sampler: SamplerConfig,
                       allowed: list[int] | None = None, images: dict | None = None,
                       biases: list[tuple[int, float, int | None]] | None = None) -> ReferenceTrace:
    """One prompt through transformers' generate for exactly `num_blocks` canvases; with
    `allowed`, a constrained read of those ids (`diffusion_constrained`); with `biases`, those
    logit biases (`_Biased`); with `images`, the
    image processor's `pixel_values` and `image_position_ids` for the prompt's images (its
    soft tokens marked as transformers' processor marks them)."""
    from transformers import LogitsProcessorList
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_generation

    config = model.config
    image_inputs = {}
    if images is not None:
        soft_tokens = torch.tensor([prompt_ids]) == config.image_token_id
        image_inputs = {"pixel_values": images["pixel_values"], "image_position_ids": images["image_position_ids"],
                        "mm_token_type_ids": soft_tokens.long()}
    noise = CanvasNoise(seed, config.text_config.vocab_size, config.canvas_length)
    trace = ReferenceTrace()
    ids = None if allowed is None else torch.tensor(sorted(set(allowed)))
    replay = _Replay(noise, trace, ids, None if ids is None else CanvasNoise(seed, len(ids), config.canvas_length))
    accept = hf_generation.EntropyBoundSampler.accept_canvas

    def recording_accept(self, *args, **kwargs):
        accepted = accept(self, *args, **kwargs)
        trace.accepted[-1].append(self.accepted_token_mask[0].clone())
        return accepted

    with mock.patch.object(torch, "randint", replay.randint), \
            mock.patch.object(torch, "multinomial", replay.multinomial), \
            mock.patch.object(hf_generation.EntropyBoundSampler, "accept_canvas", recording_accept), \
            torch.no_grad():
        trace.sequences = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=num_blocks * config.canvas_length,
            max_denoising_steps=sampler.max_denoising_steps,
            t_min=sampler.t_min,
            t_max=sampler.t_max,
            stability_threshold=sampler.stability_threshold,
            confidence_threshold=sampler.confidence_threshold,
            sampler_config=hf_generation.EntropyBoundSamplerConfig(entropy_bound=sampler.entropy_bound),
            eos_token_id=[config.text_config.vocab_size],  # unreachable: every block runs
            streamer=_DraftRecorder(trace, sampler),
            logits_processor=LogitsProcessorList(([] if ids is None else [_AllowedOnly(ids)])
                                                 + ([_Biased(len(prompt_ids), biases)] if biases else [])),
            return_dict_in_generate=False,
            **image_inputs,
        )
    return trace
