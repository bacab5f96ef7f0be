"""Thinking, tool calls and structured outputs after the reasoning, through the OpenAI server
as a Gemma 4 user serves them: `--enable-auto-tool-choice --tool-call-parser gemma4
--reasoning-parser gemma4`.

A random tiny model writes no tool call of its own, so the reply is pinned: a seeded first
canvas with every position pinned (`diffusion_seed_canvas`, `diffusion_pinned`) commits
exactly the tokens of Gemma 4's thought channel and tool-call syntax, and vLLM's parsers read
them from one canvas-sized delta. A random model does not end its thinking either, so the
grammar-after-reasoning check uses a test parser (tests/marker_reasoning_parser.py) whose end
marker is a token the model does write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from transformers import AutoTokenizer

from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

from benchmarks.openai_server import OpenAIServer

pytestmark = pytest.mark.engine

CANVAS = 64
SPEC = TinySpec(canvas_length=CANVAS, generation={"max_denoising_steps": 8})
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
THOUGHT = "<|channel>thought\nParis, then<channel|>"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("agent") / "model", SPEC, seed=5)


@pytest.fixture(scope="module")
def gemma_server(model):
    server = OpenAIServer(str(model), "--max-model-len", "1024", "--served-model-name", "tiny",
                          "--enable-auto-tool-choice", "--tool-call-parser", "gemma4", "--reasoning-parser", "gemma4")
    yield server
    server.stop()


def chat(server, messages, **body):
    response = requests.post(server.url + "/v1/chat/completions",
                             json={"model": "tiny", "messages": messages, "max_tokens": 200, "seed": 1, **body},
                             timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def pinned_reply(model: Path, text: str) -> dict:
    """vllm_xargs pinning the whole first canvas to `text`, padded."""
    ids = AutoTokenizer.from_pretrained(model).encode(text, add_special_tokens=False)
    assert len(ids) <= CANVAS
    return {"diffusion_seed_canvas": ids + [0] * (CANVAS - len(ids)), "diffusion_pinned": list(range(CANVAS))}


@pytest.mark.parametrize("thinking", [True, False])
def test_a_thought_and_a_tool_call_in_one_canvas_are_parsed(gemma_server, model, thinking):
    """Catches a reply whose thinking or tool call vLLM's Gemma 4 parsers cannot read when a
    whole canvas arrives at once (one delta carrying the thought channel, its end and the tool
    call): reasoning, call and finish reason, unstreamed and streamed alike, with thinking on
    and off (a call right after the prompt's closed thought channel)."""
    expected_reasoning = "Paris, then" if thinking else None
    request = {"tools": TOOLS, "chat_template_kwargs": {"enable_thinking": thinking},
               "vllm_xargs": pinned_reply(model, THOUGHT * thinking + CALL)}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = chat(gemma_server, messages, **request)
    call = reply["message"]["tool_calls"]
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["reasoning"] == expected_reasoning
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in call] == \
        [("get_weather", {"city": "Paris"})]
    assert not reply["message"]["content"]

    reasoning, arguments, names, finish = None, "", [], None
    with requests.post(gemma_server.url + "/v1/chat/completions", stream=True, timeout=300,
                       json={"model": "tiny", "messages": messages, "max_tokens": 200, "seed": 1, "stream": True,
                             **request}) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("reasoning"):
                reasoning = (reasoning or "") + choice["delta"]["reasoning"]
            for delta in choice["delta"].get("tool_calls") or []:
                names += [delta["function"]["name"]] if delta["function"].get("name") else []
                arguments += delta["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    assert (reasoning, names, json.loads(arguments), finish) == (expected_reasoning, ["get_weather"],
                                                                  {"city": "Paris"}, "tool_calls")

    # The next turn: the call and the tool's reply go back through the chat template.
    messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": call[0]["id"], "type": "function",
                                                                         "function": call[0]["function"]}]},
                 {"role": "tool", "tool_call_id": call[0]["id"], "name": "get_weather", "content": "sunny"}]
    assert chat(gemma_server, messages, tools=TOOLS, max_tokens=8, ignore_eos=True)["finish_reason"] == "length"


def test_json_under_a_reasoning_parser_with_thinking_off(gemma_server):
    """Catches structured outputs refused on a server with a reasoning parser (a 400 until
    2026-11-29), or left unconstrained: with thinking off the chat template closes the thought
    channel in the prompt, so the grammar applies from the first token, as in vLLM."""
    reply = chat(gemma_server, [{"role": "user", "content": "A trip"}], max_tokens=300,
                 response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    value = json.loads(reply["message"]["content"], strict=False)
    assert set(value) == {"city", "days"} and 1 <= value["days"] <= 9 and reply["finish_reason"] == "stop"
    assert not reply["message"]["reasoning"]


def test_the_grammar_starts_after_the_reasoning(model):
    """Catches a grammar applied inside a thinking model's reasoning (vLLM leaves it free), one
    not applied after it, or the worker and vLLM's engine core disagreeing on where the
    reasoning ends (the engine core would then reject the canvas: finish_reason error): the
    reasoning is what the model writes unconstrained up to its end marker, the rest is JSON.
    The end marker is a token the model writes; the test parser takes it per request."""
    plugin = str(Path(__file__).with_name("marker_reasoning_parser.py"))
    server = OpenAIServer(str(model), "--max-model-len", "1024", "--served-model-name", "tiny",
                          "--reasoning-parser-plugin", plugin, "--reasoning-parser", "marker")
    try:
        messages = [{"role": "user", "content": "Plan a trip"}]
        thinking = {"enable_thinking": True}
        free = chat(server, messages, max_tokens=CANVAS, ignore_eos=True, return_token_ids=True,
                    chat_template_kwargs=thinking)
        tokenizer = AutoTokenizer.from_pretrained(model)
        ids = free["token_ids"]
        # The end marker: a word token whose text first appears at its position (the API
        # server's parser splits the text at the marker's first occurrence).
        end = next(k for k in range(3, CANVAS) if tokenizer.convert_ids_to_tokens(ids[k]).isalpha()
                   and tokenizer.convert_ids_to_tokens(ids[k]) not in tokenizer.decode(ids[:k]))
        marker = tokenizer.convert_ids_to_tokens(ids[end])
        reply = chat(server, messages, max_tokens=300, return_token_ids=True,
                     chat_template_kwargs={**thinking, "reasoning_end": marker},
                     response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
        assert reply["token_ids"][:end + 1] == ids[:end + 1]
        assert reply["message"]["reasoning"] == tokenizer.decode(ids[:end])
        value = json.loads(reply["message"]["content"], strict=False)
        assert set(value) == {"city", "days"} and reply["finish_reason"] == "stop"
        assert reply["token_ids"][end + 1:] != ids[end + 1:len(reply["token_ids"])]  # the grammar did change it
    finally:
        server.stop()
