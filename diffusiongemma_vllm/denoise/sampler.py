"""The entropy-bound sampler's decisions for one denoise pass, on a batch of canvases.

Semantics are transformers' `DiffusionGemmaGenerationMixin._denoising_step` with its
`EntropyBoundSampler` and `StableAndConfidentStoppingCriteria` (research/hf_reference.md
section 3), for canvases that may each have their own settings:
- scale the logits by the pass temperature: z = logits / T;
- per position: a sample from softmax(z) (Gumbel-max), argmax(z), and the entropy of
  softmax(z), computed without materialising z (kernels/vocab_tiled_sampler.py, or
  kernels/gemm_sampler.py on CUDA);
- accept the k lowest-entropy positions whose entropy sum minus its largest term stays
  within the entropy bound (the lowest one always), keep their samples, re-noise every
  other position with fresh uniform tokens;
- halt when the argmax repeated over the last `stability_threshold` passes and the mean
  entropy is below `confidence_threshold`, or when the pass budget is spent.
Everything is batched tensor arithmetic with no host round trip, so a pass can be captured
in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PassResult:
    argmax: torch.Tensor  # [n, C] what a halted canvas commits
    accepted: torch.Tensor  # [n, C] bool
    next_canvas: torch.Tensor  # [n, C] accepted samples, fresh noise elsewhere
    mean_entropy: torch.Tensor  # [n]


def entropy_bound_mask(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """[n, C] bool: the lowest-entropy prefix whose sum minus its max is <= bound[n]."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    within = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound[:, None]
    return torch.zeros_like(within).scatter(-1, order, within)


def decide(
    argmax: torch.Tensor,  # [n, C] argmax of z = logits / T
    sample: torch.Tensor,  # [n, C] a draw from softmax(z)
    entropy: torch.Tensor,  # [n, C] entropy of softmax(z)
    renoise: torch.Tensor,  # [n, C] fresh uniform tokens
    entropy_bound: torch.Tensor,  # [n]
) -> PassResult:
    """Keep the entropy-bounded samples, re-noise every other position."""
    accepted = entropy_bound_mask(entropy, entropy_bound)
    return PassResult(argmax, accepted, torch.where(accepted, sample, renoise), entropy.mean(-1))


def unchanged_passes(previous: torch.Tensor, argmax: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """[n] how many passes in a row before this one produced this argmax [n, C]: run[n] + 1
    when it equals `previous` [n, C] (the last pass's argmax, -1 before the first), else 0.
    A canvas is stable when this reaches its `stability_threshold`: transformers' check that
    the argmax equals each of the last `threshold` argmaxes, without keeping them."""
    return torch.where((previous == argmax).all(-1), run + 1, torch.zeros_like(run))
