"""Admission-time validation of DiffusionGemma requests (a 400 / ValueError, never a crash).

vLLM calls a logits processor's `validate_params` for every request in the front-end
process before it reaches the engine; engine_config.py installs this class for the
DiffusionGemma architecture only. It rejects bad diffusion knobs (`extra_args` /
`vllm_xargs`, named like generation_config.json's fields) naming the field, and the
sampling features the block-diffusion sampler does not implement. It changes no logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .config import SamplerConfig


class DiffusionRequestValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        SamplerConfig().with_request_overrides(sampling_params.extra_args)
        if sampling_params.logprobs is not None:
            raise ValueError("logprobs are not supported by the DiffusionGemma sampler")
        if sampling_params.structured_outputs is not None:
            raise ValueError("structured outputs are not supported by the DiffusionGemma sampler")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
