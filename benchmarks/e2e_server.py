"""Stage b_server of gpu_e2e.py: vLLM's OpenAI server on the tiny `gpu_friendly` checkpoint.

One server with vLLM's defaults (bf16, CUDA graphs; eager on CPU), then, in order: a completion
over two canvases, a chat, a stream (one chunk per canvas, equal to the same request
unstreamed), a JSON-schema chat (its reply parses), a bad knob and an unsupported field (400
naming it), logprobs of every token (and -1, the whole vocabulary, refused), eight concurrent
requests, and a client that disconnects mid-stream, after which the server must still answer
and run no request. The server's log is appended to the stage's log (start-up times).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.e2e_offline import MAX_MODEL_LEN, PERSON, checkpoint, follows_person
from benchmarks.gpu_e2e import Checks, Settings, stage_main
from benchmarks.openai_server import OpenAIServer


def complete(server, **body) -> requests.Response:
    return requests.post(server.url + "/v1/completions", timeout=300,
                         json={"model": "tiny", "prompt": "Write an essay", **body})


def stream(server, **body) -> tuple[list[str], float | None]:
    """The streamed text chunks and the time to the first one with text."""
    start, first, texts = time.time(), None, []
    with requests.post(server.url + "/v1/completions", stream=True, timeout=300,
                       json={"model": "tiny", "prompt": "Write an essay", "stream": True, **body}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    first = first if first is not None else time.time() - start
                    texts.append(choices[0]["text"])
    return texts, first


def running_requests(server) -> list[str]:
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    return [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]


def server_stage(checks: Checks, settings: Settings) -> None:
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny", "--dtype", settings.dtype,
            "--max-num-seqs", "16", "--seed", "0"]
    if settings.attention_backend:
        args += ["--attention-backend", settings.attention_backend]
    if settings.cpu:
        args.append("--enforce-eager")
    start = time.time()
    server = OpenAIServer(checkpoint("gpu_friendly", settings), *args, startup_timeout=240)
    checks.measure("server", {"args": args, "ready_s": round(time.time() - start, 1)})
    try:
        run_checks(server, checks, settings)
    finally:
        server.stop()
        print(f"===== server log {server.log.name} =====\n" + Path(server.log.name).read_text(errors="replace"))


def run_checks(server, checks: Checks, settings: Settings) -> None:
    steps = {"max_denoising_steps": settings.steps}
    body = complete(server, max_tokens=300, ignore_eos=True, seed=1, vllm_xargs=steps).json()
    checks.check("completion_300_tokens", body.get("usage", {}).get("completion_tokens") == 300
                 and body["choices"][0]["finish_reason"] == "length", body.get("usage") or body)

    chat = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Write a story"}], "max_tokens": 40, "seed": 2,
        "vllm_xargs": steps})
    checks.check("chat", chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant",
                 chat.status_code)

    texts, ttft = stream(server, max_tokens=300, ignore_eos=True, seed=4, vllm_xargs=steps)
    whole = complete(server, max_tokens=300, ignore_eos=True, seed=4, vllm_xargs=steps).json()["choices"][0]["text"]
    checks.check("stream_one_chunk_per_canvas", len(texts) >= 2 and "".join(texts) == whole,
                 {"chunks": len(texts), "streamed_chars": len("".join(texts)), "whole_chars": len(whole)})
    checks.measure("stream_ttft_s", round(ttft, 3) if ttft is not None else None)

    structured = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Describe a person"}], "max_tokens": 600, "seed": 5,
        "vllm_xargs": steps,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    reply = structured.json()["choices"][0] if structured.status_code == 200 else {}
    parsed = follows_person(reply.get("message", {}).get("content") or "")
    checks.check("chat_json_schema", parsed and reply.get("finish_reason") == "stop",
                 [structured.status_code, structured.text[:200]])

    bad = complete(server, max_tokens=8, vllm_xargs={"entropy_bound": -1})
    checks.check("bad_knob_400", bad.status_code == 400 and "entropy_bound" in bad.text, [bad.status_code, bad.text[:200]])
    unsupported = complete(server, max_tokens=8, min_p=0.1)
    checks.check("unsupported_field_400", unsupported.status_code == 400 and "min_p" in unsupported.text,
                 [unsupported.status_code, unsupported.text[:200]])
    logprobs = complete(server, max_tokens=40, ignore_eos=True, seed=3, logprobs=2, vllm_xargs=steps,
                        return_tokens_as_token_ids=True)
    entries = (logprobs.json()["choices"][0].get("logprobs") or {}) if logprobs.status_code == 200 else {}
    values = entries.get("token_logprobs") or []
    checks.check("logprobs_of_every_token", len(values) == 40 and all(v <= 0 for v in values),
                 [logprobs.status_code, len(values)])
    # The committed token is its pass's argmax: it must head its own alternatives (rows aligned,
    # logits from the sampler's products).
    heads = [top.get(token) == max(top.values()) == value for token, value, top in
             zip(entries.get("tokens") or [], values, entries.get("top_logprobs") or [])]
    checks.check("committed_token_heads_its_top_logprobs", len(heads) == 40 and all(heads), sum(heads))
    checks.check("whole_vocabulary_logprobs_400", complete(server, max_tokens=8, logprobs=-1).status_code == 400)

    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: complete(server, max_tokens=64, seed=i, vllm_xargs=steps).status_code, range(8)))
    checks.check("eight_concurrent", codes == [200] * 8, codes)
    checks.measure("eight_concurrent_s", round(time.time() - start, 2))

    with requests.post(server.url + "/v1/completions", stream=True, timeout=300, json={
            "model": "tiny", "prompt": "Write", "stream": True, "max_tokens": 1500, "ignore_eos": True,
            "vllm_xargs": steps}) as response:
        next(response.iter_lines())
    after = [complete(server, max_tokens=40, seed=seed, vllm_xargs=steps).status_code for seed in range(3)]
    deadline, running = time.time() + 20, running_requests(server)
    while time.time() < deadline and not all(line.rstrip().endswith(" 0.0") for line in running):
        time.sleep(1)
        running = running_requests(server)
    checks.check("disconnect_leaves_server_serving", after == [200] * 3 and bool(running)
                 and all(line.rstrip().endswith(" 0.0") for line in running), {"after": after, "running": running})
    checks.measure("headline", {"passed": sum(c["passed"] for c in checks.data["checks"].values()),
                                "checks": len(checks.data["checks"]), "stream_ttft_s": checks.data["stream_ttft_s"]})


BODIES = {"b_server": server_stage}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage_main(BODIES)
