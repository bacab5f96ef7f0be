"""`logit_bias`, `bad_words` and `min_tokens` through the engine, against transformers'
`generate` with the same biases as a logits processor and the same draws; and through the
OpenAI server."""

from __future__ import annotations

import json
import os

import pytest
import torch
from vllm import SamplingParams

from diffusiongemma_vllm.model.config import SamplerConfig


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_biased_requests_equal_transformers_with_the_same_biases(tiny_dir):
    """Catches a bias the canvas ignores in any of draw, acceptance, self-conditioning or
    commit, `min_tokens` counted from the canvas instead of the request's output (its bans must
    end 3 tokens into the second canvas), a single-token bad word (and its space-prefixed
    form) left drawable, and biases leaking into a batch mate sharing the passes: each request's
    tokens must equal transformers' with the biases given as a logits processor."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import LLM
    from vllm.inputs import TokensPrompt
    from vllm.tokenizers import get_tokenizer

    from diffusiongemma_vllm.testing.reference import reference_generate
    from tests.test_reference_equivalence import prompt_ids

    tokenizer = get_tokenizer(tiny_dir)
    with open(os.path.join(tiny_dir, "generation_config.json")) as f:
        stops = sorted(set(json.load(f)["eos_token_id"]) | {tokenizer.eos_token_id})
    bad = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("a", " a")]
    knobs = {"max_denoising_steps": 4}
    sampler = SamplerConfig().with_request_overrides(knobs)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    length = model.config.canvas_length
    min_tokens = length + 3
    logit_bias = {stops[0]: 30.0, bad[0]: 30.0, 300: -5.0, 301: 3.0}  # EOS and a bad word made likely
    biases = [(token, value, None) for token, value in logit_bias.items()]
    biases += [(token, float("-inf"), None) for token in bad] + [(token, float("-inf"), min_tokens) for token in stops]
    biased = reference_generate(model, prompt_ids(9, 31), 31, 2, sampler, biases=biases)
    free = reference_generate(model, prompt_ids(12, 32), 32, 2, sampler)

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(9, 31)), TokensPrompt(prompt_token_ids=prompt_ids(12, 32))],
        [SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=31, logit_bias=logit_bias, bad_words=["a"],
                        min_tokens=min_tokens, extra_args=knobs),
         SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=32, extra_args=knobs)])
    tokens = list(outs[0].outputs[0].token_ids)
    assert tokens == biased.sequences[0, 9:].tolist()
    assert list(outs[1].outputs[0].token_ids) == free.sequences[0, 12:].tolist()
    assert not set(tokens[:min_tokens]) & set(stops) and stops[0] in tokens[min_tokens:]
    assert not set(tokens) & set(bad)
    del llm
