"""Sampler pieces against transformers' own classes, and the per-request settings."""

from __future__ import annotations

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from diffusiongemma_vllm.model.config import TEMPERATURE_RANGE, SamplerConfig
from diffusiongemma_vllm.denoise.noise import CanvasNoise
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import vocab_tiled_row_stats
from diffusiongemma_vllm.denoise.sampler import decide, entropy_bound_mask, unchanged_passes


@pytest.mark.parametrize("scale, bound", [(1.0, 0.1), (4.0, 0.1), (12.0, 0.1), (12.0, 2.0), (12.0, 1e-4)])
def test_entropy_bound_mask_matches_transformers(scale, bound):
    """Catches an off-by-one in the accepted prefix (sum minus max vs sum) and a lost
    'at least one token' guarantee."""
    logits = torch.randn(3, 32, 50, generator=torch.Generator().manual_seed(0)) * scale
    hf = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 32, 50, 48)
    hf.accept_canvas(torch.zeros(3, 32, dtype=torch.long), torch.ones(3, 32, dtype=torch.long), logits, 1)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    ours = entropy_bound_mask(entropy, torch.full((3,), bound))
    assert torch.equal(ours, hf.accepted_token_mask)
    assert (ours.sum(-1) >= 1).all()


def test_temperature_schedule_matches_transformers():
    """Catches a schedule counting passes done instead of passes remaining."""
    cfg = SamplerConfig(max_denoising_steps=48)
    hf = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)
    ones = torch.ones(1, 1)
    for step in (0, 1, 24, 46, 47):
        assert cfg.temperature(step) == pytest.approx(1.0 / hf(None, ones, 48 - step).item())


def test_stability_matches_transformers_history():
    """Catches halting on the first pass (history starts empty) or a wrong window of passes:
    the run-length count must agree with transformers' argmax history at every pass."""
    for threshold in (0, 1, 2, 3):
        hf = StableAndConfidentStoppingCriteria(threshold, confidence_threshold=1e9)
        previous, run = torch.full((1, 4), -1), torch.zeros(1, dtype=torch.long)
        for argmax in ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 5], [1, 2, 3, 5], [1, 2, 3, 5],
                       [0, 2, 3, 5]):
            canvas = torch.tensor([argmax])
            want = hf(canvas, torch.zeros(1, 4, 8)).item()
            run = unchanged_passes(previous, canvas, run)
            previous = canvas
            assert bool(run >= threshold) == want


def test_draws_follow_the_distribution():
    """Catches Gumbel-max on the wrong quantity (e.g. unscaled or un-capped logits): sample
    frequencies must match softmax(softcap(h . E) / T). 4000 draws over 4 tokens: the total
    variation of the empirical distribution stays under 0.05 with overwhelming probability."""
    hidden = torch.tensor([[1.0, 0.5]]).repeat(4000, 1)
    embedding = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    temperature = torch.full((4000,), 0.7)
    stats = vocab_tiled_row_stats(hidden, embedding, 30.0, temperature, torch.arange(4000) * 7919, False)
    counts = torch.bincount(stats.sample, minlength=4).float()
    logits = torch.tanh(embedding @ hidden[0] / 30.0) * 30.0
    want = torch.softmax(logits / 0.7, dim=-1)
    assert 0.5 * (counts / 4000 - want).abs().sum() < 0.05


def test_decide_keeps_accepted_samples_and_renoises_the_rest():
    """Catches re-noising accepted positions, or keeping stale tokens where it must re-noise.
    The bound applies to the sum minus the largest term, so 5.0 is accepted after 0.01 and
    0.02 (0.03 <= 0.1) and 6.0 is not (5.03 > 0.1)."""
    entropy = torch.tensor([[0.01, 5.0, 0.02, 6.0]])
    result = decide(torch.tensor([[9, 9, 9, 9]]), torch.tensor([[1, 2, 3, 4]]), entropy,
                    torch.tensor([[50, 60, 70, 80]]), torch.tensor([0.1]))
    assert result.accepted.tolist() == [[True, True, True, False]]
    assert result.next_canvas.tolist() == [[1, 2, 3, 80]]
    assert result.mean_entropy.item() == pytest.approx(entropy.mean().item())


def test_noise_depends_only_on_seed_block_and_pass():
    """Catches draws that depend on call order, which would break reproducible seeds."""
    a, b = CanvasNoise(7, 100, 16), CanvasNoise(7, 100, 16)
    b.renoise(3, 3)
    assert torch.equal(a.renoise(0, 2), b.renoise(0, 2))
    assert torch.equal(a.initial_canvas(1), b.initial_canvas(1))
    assert not torch.equal(a.renoise(0, 2), a.renoise(0, 3))
    assert not torch.equal(a.initial_canvas(1), CanvasNoise(8, 100, 16).initial_canvas(1))


def test_generation_config_round_trip_and_overrides():
    """Catches knobs read from the wrong generation_config.json fields."""
    release = SamplerConfig().to_generation_config()
    assert SamplerConfig.from_generation_config(release) == SamplerConfig()
    custom = SamplerConfig.from_generation_config({**release, "max_denoising_steps": 12,
                                                   "sampler_config": {"entropy_bound": 0.3}})
    assert (custom.max_denoising_steps, custom.entropy_bound) == (12, 0.3)
    assert custom.with_request_overrides({"t_min": 0.2, "unrelated": 1}).t_min == 0.2


@pytest.mark.parametrize("knobs, field", [
    ({"max_denoising_steps": 0}, "max_denoising_steps"), ({"max_denoising_steps": 2.5}, "max_denoising_steps"),
    ({"max_denoising_steps": True}, "max_denoising_steps"), ({"entropy_bound": float("nan")}, "entropy_bound"), ({"entropy_bound": 0}, "entropy_bound"),
    ({"t_min": 0}, "t_min"), ({"t_max": 0.1}, "t_max"), ({"stability_threshold": -1}, "stability_threshold"),
    ({"confidence_threshold": "0.1"}, "confidence_threshold"),
    ({"t_max": float("inf")}, "t_max"), ({"t_max": 1e39}, "t_max"), ({"t_min": 1e-40, "t_max": 1e-40}, "t_min"),
])
def test_invalid_knobs_name_the_field(knobs, field):
    """Catches a bad request value reaching the sampler (a crash or a silent default), including
    temperatures the fp32 sampler turns into NaN (served as blank text, with logprobs a 400 that
    blamed JSON)."""
    with pytest.raises(ValueError, match=field):
        SamplerConfig().with_request_overrides(knobs)


def test_temperatures_at_the_ends_of_the_accepted_range_give_finite_statistics():
    """Catches a temperature range that admits values the fp32 sampler turns into NaN."""
    gen = torch.Generator().manual_seed(0)
    hidden, embedding = torch.randn(8, 16, generator=gen) * 10, torch.randn(300, 16, generator=gen)
    for temperature in TEMPERATURE_RANGE:
        stats = vocab_tiled_row_stats(hidden, embedding, 30.0, torch.full((8,), temperature), torch.arange(8), True)
        assert torch.isfinite(stats.entropy).all() and torch.isfinite(stats.soft).all()
    stats = vocab_tiled_row_stats(hidden, embedding, 30.0, torch.full((8,), 1e-38), torch.arange(8), True)
    assert not torch.isfinite(stats.entropy).all()  # what the range keeps out
