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


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_allowed_token_ids_equal_transformers_masked_to_them_with_raw_logprobs(tiny_dir):
    """Catches `allowed_token_ids` drawing or committing other ids, a logit bias on an id
    outside the set reaching the read (or breaking it), one inside it ignored, and logprobs
    renormalised over the set: vLLM's are raw, the model's distribution over the whole
    vocabulary, so over the allowed ids they must differ from transformers' masked log softmax
    by one constant per position, the log of the mass the set holds (below 0)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from diffusiongemma_vllm.testing.reference import reference_generate
    from tests.test_reference_equivalence import prompt_ids

    allowed = [300, 7, 45, 7, 511, 2, 260, 88]  # unsorted, 7 twice
    ids = sorted(set(allowed))
    knobs = {"max_denoising_steps": 4}
    sampler = SamplerConfig().with_request_overrides(knobs)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    length = model.config.canvas_length
    logit_bias = {45: 2.0, 400: 50.0}  # 400 is outside the set
    masked = reference_generate(model, prompt_ids(9, 41), 41, 2, sampler, allowed=allowed)
    biased = reference_generate(model, prompt_ids(10, 42), 42, 2, sampler, allowed=allowed,
                                biases=[(token, value, None) for token, value in logit_bias.items()])

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(9, 41)), TokensPrompt(prompt_token_ids=prompt_ids(10, 42))],
        [SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=41, allowed_token_ids=allowed,
                        logprob_token_ids=ids, extra_args=knobs),
         SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=42, allowed_token_ids=allowed,
                        logit_bias=logit_bias, extra_args=knobs)])
    tokens = list(outs[0].outputs[0].token_ids)
    assert tokens == masked.sequences[0, 9:].tolist() and set(tokens) <= set(ids)
    assert list(outs[1].outputs[0].token_ids) == biased.sequences[0, 10:].tolist()
    want = torch.log_softmax(torch.cat(masked.final_logits), dim=-1)[:, ids]  # renormalised over the set
    got = torch.tensor([[entry[t].logprob for t in ids] for entry in outs[0].outputs[0].logprobs])
    mass = torch.logsumexp(got, dim=-1)
    torch.testing.assert_close(got - mass[:, None], want, rtol=0, atol=1e-4)
    assert (mass < -1e-3).all()
    del llm
