"""A request's `logit_bias`, `bad_words` and `min_tokens`, as the biases of its canvases.

vLLM applies the three in its sampler, to the logits of the next token (after Gemma's softcap,
before the temperature); the block sampler applies them to every position of a canvas in every
pass (denoise/canvas_biases.py), so the canvas is drawn, accepted, self-conditioned and
committed from the biased distribution, as transformers' `generate` does with the same biases
given as a logits processor:
- `logit_bias`: each id's value, at every position;
- `bad_words`: vLLM tokenizes each word (with and without a leading space) into
  `bad_words_token_ids`; a one-token word is banned at every position. A longer word is banned
  by vLLM only after the tokens before its last, which a canvas does not know until it is
  committed, so request_validator.py refuses it;
- `min_tokens`: the request's stop tokens (EOS, `stop_token_ids`: vLLM's `all_stop_token_ids`)
  banned at the positions before the request's `min_tokens`-th output token.
A ban is a bias of `BANNED`: its probability is exactly 0, as vLLM's -inf makes it.
Logprobs are not biased: they are vLLM's `raw_logprobs`, the model's own distribution.
"""

from __future__ import annotations

from diffusiongemma_vllm.denoise.canvas_biases import TokenBias
from diffusiongemma_vllm.kernels.vocab_tiled_sampler import BANNED

BIASING_FIELDS = ("logit_bias", "bad_words", "min_tokens")


def request_biases(sampling_params, generated: int) -> tuple[TokenBias, ...]:
    """The biases of the canvas that starts after the request's `generated` output tokens."""
    entries = [TokenBias(int(token), float(value)) for token, value in (sampling_params.logit_bias or {}).items()]
    entries += [TokenBias(ids[0], BANNED) for ids in sampling_params.bad_words_token_ids or () if len(ids) == 1]
    before = sampling_params.min_tokens - generated
    if before > 0:
        entries += [TokenBias(token, BANNED, before) for token in sorted(sampling_params.all_stop_token_ids)]
    return tuple(entries)


def biases_requested(sampling_params) -> bool:
    return bool(sampling_params.logit_bias or sampling_params.bad_words or sampling_params.min_tokens)
