"""Live drafts without a server: the worker's publishing (drafts/publisher.py), the wire format, the
admission checks and the SSE weaving (drafts/stream.py). End to end: test_drafts_server.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from diffusiongemma_vllm import DRAFTS_ENV, register
from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.loop import CanvasJob, denoise_canvases, row_stats_for
from diffusiongemma_vllm.denoise.graphs import DenoiseGraphs
from diffusiongemma_vllm.drafts.stream import DraftFormat, DraftSubscriber, with_drafts
from diffusiongemma_vllm.drafts.publisher import CLOSE, DRAFT, CanvasDraft, DraftPublisher, Message, check_draft_args, cut_length
from diffusiongemma_vllm.engine.request_validator import check_request
from diffusiongemma_vllm.testing.standalone import load_standalone
from tests.test_denoise_graphs import KNOBS, RecordedGraph, short_prompt_requests


class RecordingPublisher(DraftPublisher):
    """DraftPublisher with its socket replaced by a list."""

    def __init__(self):
        self.sent: list[Message] = []

    def _send(self, message: Message) -> None:
        self.sent.append(message)


def test_cut_length_stops_like_vllm():
    """Catches drafts longer than what the canvas would commit: past max_tokens, past an EOS
    or stop token (kept in the ids, without text, as vLLM emits it)."""
    tokens = np.array([5, 6, 1, 7, 8])
    assert cut_length(tokens, 5, frozenset()) == (5, 5)
    assert cut_length(tokens, 2, frozenset({1})) == (2, 2)
    assert cut_length(tokens, 5, frozenset({1, 7})) == (3, 2)
    assert cut_length(tokens, 0, frozenset()) == (0, 0)


def test_message_round_trip():
    """Catches a header or token encoding that the subscriber reads differently."""
    message = Message(b"k" * 32, DRAFT, 3, 12, np.array([0, 262143, 7], dtype=np.int32), 2, 4097, 768)
    back = Message.decode(message.encode())
    assert (back.key, back.kind, back.block, back.pass_, back.text_tokens, back.prompt_tokens,
            back.output_tokens) == (b"k" * 32, DRAFT, 3, 12, 2, 4097, 768)
    assert back.tokens.tolist() == [0, 262143, 7]


@pytest.mark.parametrize("value", [0, -1, True, "2", 1.5])
def test_bad_draft_every_is_refused_by_name(value):
    """Catches a draft interval that would divide by zero in the worker or never fire."""
    with pytest.raises(ValueError, match="draft_every"):
        check_request(SamplingParams(extra_args={"draft_every": value, "draft_key": "k"}))


def test_draft_every_without_the_endpoint_says_how_to_get_drafts():
    """Catches a request asking for drafts on a server without the endpoint plugin (or not
    streamed) being answered without drafts and without a word."""
    with pytest.raises(ValueError, match="VLLM_PLUGINS=diffusiongemma"):
        check_request(SamplingParams(extra_args={"draft_every": 2}))
    check_request(SamplingParams(extra_args={"draft_every": 2, "draft_key": "abc", "max_denoising_steps": 8}))
    check_draft_args({})


def test_register_names_one_draft_address_per_server(monkeypatch):
    """Catches the worker and the API server disagreeing on the draft address: register()
    runs first in the API server and its engine processes inherit the variable, so it must
    set it once and never replace an inherited one."""
    monkeypatch.delenv(DRAFTS_ENV, raising=False)
    register()
    address = os.environ[DRAFTS_ENV]
    assert address.startswith("ipc://")
    register()
    assert os.environ[DRAFTS_ENV] == address
    monkeypatch.setenv(DRAFTS_ENV, "ipc:///tmp/inherited")
    register()
    assert os.environ[DRAFTS_ENV] == "ipc:///tmp/inherited"


def test_the_process_that_names_the_draft_address_removes_its_socket_file_at_exit():
    """Catches one leftover socket file in the temp folder per server start (the worker binds
    the ipc:// address, which creates the file; nothing removed it)."""
    script = ("import os, pathlib, diffusiongemma_vllm as d; d.register(); "
              "path = os.environ[d.DRAFTS_ENV].removeprefix('ipc://'); pathlib.Path(path).touch(); print(path)")
    env = {k: v for k, v in os.environ.items() if k != DRAFTS_ENV}
    path = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert path and not os.path.exists(path)


@pytest.fixture(scope="module")
def standalone(tiny_dir):
    return load_standalone(tiny_dir)


@pytest.mark.parametrize("mode", ["eager", "graphs", "resumed"])
def test_drafts_read_only_and_end_with_the_committed_canvas(standalone, mode):
    """Catches drafts that change tokens (same seeds, same result with and without them),
    drafts missing or repeated across graph replays and across resumed calls
    (passes_per_step), pass numbers that restart per call, a last draft that is not what the
    canvas commits, and drafts published for canvases that did not ask."""
    model, cfg = standalone, standalone.model.cfg
    run_pass = short_prompt_requests(model, 3)
    unembedding = model.model.unembedding()
    jobs = [CanvasJob(0, SamplerConfig().with_request_overrides(k), seed=11 + i) for i, k in enumerate(KNOBS)]
    every = {0: 1, 1: 2}  # job 2 asks for no drafts
    canvases = [CanvasDraft(f"key{j}".encode(), every[j], 0, cfg.canvas_length, frozenset()) if j in every else None
                for j in range(3)]
    plain = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding)

    publisher = RecordingPublisher()
    graphs = None
    if mode == "graphs":
        graphs = DenoiseGraphs(run_pass, unembedding, row_stats_for(torch.device("cpu")), ladder=(1, 2, 4),
                               graph_factory=RecordedGraph)
    if mode == "resumed":  # two passes per call, as passes_per_step=2 runs them
        tokens, held = {}, {}
        while len(tokens) < 3:
            todo = [j for j in range(3) if j not in tokens]
            part = denoise_canvases([jobs[j] for j in todo], cfg.canvas_length, run_pass, unembedding, max_passes=2,
                                    resumed={i: held.pop(j) for i, j in enumerate(todo) if j in held},
                                    on_pass=publisher.watch([canvases[j] for j in todo]))
            tokens.update({j: part.tokens[i] for i, j in enumerate(todo) if part.passes[i] >= 0})
            held.update({todo[i]: state for i, state in part.pending.items()})
        drafted = torch.stack([tokens[j] for j in range(3)])
    else:
        drafted = denoise_canvases(jobs, cfg.canvas_length, run_pass, unembedding, graphs=graphs,
                                   on_pass=publisher.watch(canvases)).tokens
    assert torch.equal(drafted, plain.tokens)
    assert {m.key for m in publisher.sent} == {b"key0", b"key1"}
    for job, n in every.items():
        mine = [m for m in publisher.sent if m.key == f"key{job}".encode()]
        drafts = [m for m in mine if m.kind == DRAFT]
        passes = int(plain.passes[job])
        assert [m.pass_ for m in drafts] == list(range(n, passes + 1, n))
        assert mine[-1].kind == CLOSE and mine[-1].pass_ == passes and len([m for m in mine if m.kind == CLOSE]) == 1
        if passes % n == 0:
            assert drafts[-1].tokens.tolist() == plain.tokens[job].tolist()
    if mode == "graphs":
        assert graphs.replays > 0


def test_no_drafting_canvas_means_no_callback():
    """Catches the no-drafts path paying for drafts: without a drafting canvas the denoise
    loop gets no callback at all (no host copies, no extra synchronisation)."""
    assert RecordingPublisher().watch([None, None]) is None


def test_publisher_reaches_a_subscriber_over_the_socket(tmp_path):
    """Catches a socket pair that never connects (bind/connect sides, subscription) or a
    subscriber that hands a message to the wrong request."""
    address = f"ipc://{tmp_path}/drafts"
    publisher = DraftPublisher(address)

    async def scenario():
        subscriber = DraftSubscriber(address)
        await asyncio.sleep(0.3)  # a PUB socket drops what it sends before the subscription arrives
        with subscriber.subscribe(b"mine") as queue:
            publisher._send(Message(b"other", DRAFT, 0, 1, np.array([9], np.int32), 1))
            publisher._send(Message(b"mine", DRAFT, 0, 2, np.array([4, 5], np.int32), 2))
            message = await asyncio.wait_for(queue.get(), 10)
        assert not subscriber.queues
        subscriber.close()
        return message

    message = asyncio.run(scenario())
    assert (message.key, message.pass_, message.tokens.tolist()) == (b"mine", 2, [4, 5])
    publisher.socket.close()


def test_only_the_first_tensor_parallel_rank_publishes(tmp_path, monkeypatch):
    """Catches every rank binding the server's one draft address (all but one would fail, and
    which one publishes would be a race): the first rank binds it, the others publish nothing."""
    monkeypatch.setenv(DRAFTS_ENV, f"ipc://{tmp_path}/drafts")
    assert DraftPublisher.from_env(tensor_parallel_rank=1) is None
    first = DraftPublisher.from_env(tensor_parallel_rank=0)
    assert first is not None and first.socket.getsockopt_string(first.zmq.LAST_ENDPOINT).endswith("/drafts")
    first.socket.close()


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def committed(text: str, finish: str | None = None) -> str:
    return sse({"id": "cmpl-x", "object": "text_completion", "created": 5, "model": "m",
                "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def draft(block: int, pass_: int, tokens: list[int]) -> Message:
    return Message(b"key", DRAFT, block, pass_, np.array(tokens, np.int32), len(tokens))


def close(block: int, passes: int) -> Message:
    return Message(b"key", CLOSE, block, passes, np.empty(0, np.int32), 0)


def weave(script, form: DraftFormat | None = None, cancel_at: float | None = None):
    """Run with_drafts over a scripted vLLM stream: `script` items are SSE strings (vLLM's
    events, in order), lists of messages published before the next event, or seconds to wait;
    `cancel_at` cancels the reader then, as Starlette does when the client disconnects."""
    subscriber = DraftSubscriber.__new__(DraftSubscriber)
    subscriber.queues = {}
    form = form or DraftFormat(chat=False, id="cmpl-x", model="m", decode=lambda ids: "".join(chr(97 + i) for i in ids))
    seen = {"cancelled": False}

    async def body():
        try:
            for item in script:
                if isinstance(item, list):
                    for message in item:
                        subscriber.queues[b"key"].put_nowait(message)
                    await asyncio.sleep(0.01)
                elif isinstance(item, float):
                    await asyncio.sleep(item)
                else:
                    yield item
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    out = []

    async def consume():
        async for event in with_drafts(body(), subscriber, b"key", form):
            out.append(event)

    async def main():
        task = asyncio.ensure_future(consume())
        if cancel_at is None:
            return await task
        await asyncio.sleep(cancel_at)
        task.cancel()
        await asyncio.sleep(0.05)
        seen["cancelled_in_time"] = seen["cancelled"]  # before asyncio.run cancels whatever is left

    asyncio.run(main())
    return out, subscriber, seen


def test_weave_passes_vllm_events_unchanged_with_drafts_before_their_commit():
    """Catches a wrapper that rewrites vLLM's chunks (clients must see today's stream), puts a
    canvas's drafts after its committed text, or sends drafts after the finish_reason."""
    events = [committed("ab"), committed("c", "length"), "data: [DONE]\n\n"]
    out, subscriber, _ = weave([[draft(0, 1, [0, 0]), draft(0, 2, [0, 1]), close(0, 2)], events[0],
                                [draft(1, 1, [2]), close(1, 1)], events[1], [draft(2, 1, [3])], events[2]])
    vllm_events = [e for e in out if "diffusion_draft" not in e]
    assert vllm_events == events
    drafts = [json.loads(e[6:]) for e in out if "diffusion_draft" in e]
    assert [(d["diffusion_draft"]["block"], d["diffusion_draft"]["pass"], d["diffusion_draft"]["text"]) for d in drafts] \
        == [(0, 1, "aa"), (0, 2, "ab"), (1, 1, "c")]
    assert out.index(events[0]) == 2 and out.index(events[1]) == 4
    assert drafts[0]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}]
    assert (drafts[0]["id"], drafts[0]["object"], drafts[0]["model"]) == ("cmpl-x", "text_completion", "m")
    assert not subscriber.queues


def test_weave_drops_drafts_of_committed_canvases_and_cuts_stop_strings():
    """Catches a late draft of a canvas already committed being shown after its text, a draft
    (its text or its token ids) running past a stop string that cuts the committed canvas, and
    a chat stream whose first chunk, a draft, names no role (vLLM's first chunk does)."""
    form = DraftFormat(chat=True, id="chatcmpl-x", model="m", decode=lambda ids: "".join(chr(97 + i) for i in ids),
                       stop=("c",), token_ids=True)
    chat_event = sse({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}]})
    out, _, _ = weave([[draft(0, 1, [0, 1, 2, 3]), close(0, 1)], chat_event, [draft(0, 2, [0]), draft(1, 1, [4])]],
                      form=form)
    drafts = [json.loads(e[6:]) for e in out if "diffusion_draft" in e]
    assert [(d["diffusion_draft"]["block"], d["diffusion_draft"]["text"]) for d in drafts] == [(0, "ab"), (1, "e")]
    assert drafts[0]["diffusion_draft"]["token_ids"] == [0, 1, 2]  # through the id completing the stop string
    assert drafts[0]["object"] == "chat.completion.chunk"
    assert [d["choices"][0]["delta"] for d in drafts] == [{"role": "assistant"}, {}]  # a stream opens with the role


def test_draft_stop_strings_count_only_past_min_tokens():
    """Catches a draft cut at a stop string that vLLM's detokenizer ignores (one that ends
    within the request's first `min_tokens` output tokens, counting earlier canvases), and one
    that ends past them, though it starts before, missed (a red-team run: drafts shown empty
    while the canvas committed its text)."""
    letters = lambda ids: "".join(chr(97 + i) for i in ids)  # noqa: E731
    canvas = [2, 0, 1, 2, 3]  # "cabcd"

    def cut(stop: str, min_tokens: int, output_tokens: int = 0):
        form = DraftFormat(chat=False, id="x", model="m", decode=letters, stop=(stop,), min_tokens=min_tokens)
        return form.cut(Message(b"k", DRAFT, 0, 1, np.array(canvas, np.int32), 5, 7, output_tokens))

    assert cut("c", 0) == ("", [2])
    assert cut("c", 2) == ("cab", [2, 0, 1, 2])
    assert cut("c", 36, output_tokens=33) == ("cab", [2, 0, 1, 2])  # 3 of this canvas's tokens first
    assert cut("bc", 3) == ("ca", [2, 0, 1, 2])  # ends past the floor, starts before it
    assert cut("c", 5) == ("cabcd", canvas)


def test_weave_cancelled_by_a_disconnect_aborts_vllm_stream_and_unsubscribes():
    """Catches a client that leaves mid-draft leaving vLLM's request running (its generator
    must see the cancellation, which aborts the request) or its queue subscribed."""
    out, subscriber, seen = weave([[draft(0, 1, [0])], committed("a"), [draft(1, 1, [1])], 3600.0,
                                   committed("b", "length")], cancel_at=0.3)
    assert len(out) == 3 and seen["cancelled_in_time"]
    assert not subscriber.queues
