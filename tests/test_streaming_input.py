"""vLLM's streaming-input sessions (`AsyncLLM.generate` fed an async generator of
`StreamingInput` chunks): each chunk starts a turn that reads everything the session said."""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

KNOBS = {"max_denoising_steps": 4}


async def session(engine, request_id: str, chunks: list[list[int]], params) -> tuple[list[int], list[int]]:
    """The tokens of the session's two turns; the second chunk is sent once the first turn ends."""
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt

    first_done = asyncio.Event()

    async def inputs():
        yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(chunks[0])))
        await first_done.wait()
        yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(chunks[1])))

    first, last = None, None
    async for out in engine.generate(inputs(), params, request_id):
        last = list(out.outputs[0].token_ids)
        if first is None and out.outputs[0].finish_reason is not None:
            first = last
            first_done.set()
    return first, last[len(first):]


async def alone(engine, request_id: str, prompt: list[int], params) -> list[int]:
    from vllm.inputs import TokensPrompt

    async for out in engine.generate(TokensPrompt(prompt_token_ids=list(prompt)), params, request_id):
        last = out
    return list(last.outputs[0].token_ids)


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_the_next_turn_reads_the_whole_last_canvas(tiny_dir):
    """Catches a turn that loses what the previous one said: vLLM keeps a finished turn's
    computed tokens, and a canvas is computed only by the step after it, so its rule alone
    dropped the turn's whole last canvas (a red-team run: a one-canvas reply vanished from the
    context). The next turn must read every token of the last turn but its last sampled one,
    as vLLM keeps an autoregressive model's: it equals a fresh request over that context."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run() -> list[tuple[list[int], list[int]]]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=tiny_dir, dtype="float32", max_model_len=512,
                                                           kv_cache_memory_bytes=1 << 28))
        try:
            chunks = [[2, 5, 6, 7, 8], [9, 10, 11]]
            results = []
            for max_tokens in (10, 40):  # within one canvas of 32, and into the second
                params = SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=True, extra_args=KNOBS,
                                        output_kind=RequestOutputKind.CUMULATIVE)
                first, second = await session(engine, f"session-{max_tokens}", chunks, params)
                fresh = await alone(engine, f"fresh-{max_tokens}", chunks[0] + first[:-1] + chunks[1], params)
                results.append((second, fresh, len(first)))
            return results
        finally:
            engine.shutdown()

    for second, fresh, said in asyncio.run(run()):
        assert said in (10, 40) and len(second) == len(fresh) and second == fresh
