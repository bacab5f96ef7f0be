"""Live drafts, API-server side: the worker's drafts received and woven into an SSE stream.

`DraftSubscriber` is one ZeroMQ SUB socket per API-server process, connected at start-up to
the worker's PUB socket (`$DIFFUSIONGEMMA_DRAFTS`, drafts/publisher.py); one task reads it and hands
each message to the queue of the request whose key it carries (messages for keys nobody
waits for, e.g. a stream whose client left, are dropped).

`with_drafts` wraps vLLM's own SSE stream of a request: vLLM's chunks pass through unchanged
(so `text` / `delta.content` stay the committed text, byte for byte), and between them come
draft chunks, which carry the same `id`, `object`, `created` and `model`, one choice with
empty text (completions) or an empty delta (chat; `{"role": "assistant"}` until vLLM's first
chunk, which names the role, so that a chat stream opens with it), under continuous usage
stats the usage so far (prompt, and the tokens committed before the canvas), and the draft in
an extra field:

    "diffusion_draft": {"block": 0, "pass": 4, "text": "...", "token_ids": [...]}

`text` is the canvas's current argmax decoded alone (so a character whose bytes straddle two
canvases shows as U+FFFD in a draft), cut as vLLM would cut the committed canvas: at
max_tokens, at EOS and stop token ids, and at the first stop string inside the canvas (a
stop string that straddles two canvases is not seen by either canvas's drafts: each is
decoded alone); `token_ids` (only when the request set `return_token_ids`) are cut with it.
Drafts of a canvas whose close came before a committed chunk are dropped after it, and none
follows the chunk with a finish_reason. The worker publishes a canvas's drafts and close before the step that commits
it returns, so in practice every draft of a canvas precedes its committed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from diffusiongemma_vllm.drafts.publisher import CLOSE, Message
from diffusiongemma_vllm.engine.stop_strings import fewest_tokens

QUEUE_SIZE = 4096  # drafts held for one stream whose client reads slowly; more are dropped
logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures


class DraftSubscriber:
    """The API server's SUB socket and the per-request queues it fills (needs a running loop)."""

    def __init__(self, address: str):
        import zmq
        import zmq.asyncio

        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(address)
        self.queues: dict[bytes, asyncio.Queue] = {}
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                message = Message.decode(frames)
            except Exception:  # noqa: BLE001 - a malformed message must not stop the reader
                logger.exception("DiffusionGemma drafts: dropped a malformed message")
                continue
            queue = self.queues.get(message.key)
            if queue is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(message)

    @contextlib.contextmanager
    def subscribe(self, key: bytes):
        """The queue of `key`'s messages while the block runs."""
        self.queues[key] = queue = asyncio.Queue(QUEUE_SIZE)
        try:
            yield queue
        finally:
            self.queues.pop(key, None)

    def close(self) -> None:
        self.task.cancel()
        self.socket.close()


@dataclass
class DraftFormat:
    """How one request's drafts become SSE chunks."""

    chat: bool
    id: str
    model: str
    decode: object  # token ids -> text (the server's tokenizer, the request's skip_special_tokens)
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    min_tokens: int = 0  # stop strings count past this many output tokens
    token_ids: bool = False
    usage: bool = False  # continuous usage stats: every chunk carries the usage so far, as vLLM's do
    created: int = field(default_factory=lambda: int(time.time()))

    def cut(self, message: Message) -> tuple[str, list[int]]:
        """The draft's text and token ids, cut at its first stop string as vLLM cuts a reply:
        the text before the string (with it under include_stop_str), the ids through the one
        that completes it. As vLLM's detokenizer, only a string that ends past the request's
        first `min_tokens` output tokens counts."""
        ids = message.tokens.tolist()
        text = self.decode(ids[:message.text_tokens])
        floor = max(self.min_tokens - message.output_tokens, 0)  # canvas tokens a stop string must end after
        if floor >= message.text_tokens:
            return text, ids
        old = len(self.decode(ids[:floor])) if floor else 0

        def find(stop: str, within: str) -> int:
            return within.find(stop, max(old - len(stop) + 1, 0))

        hits = [(at, stop) for stop in self.stop if stop and (at := find(stop, text)) >= 0]
        if not hits:
            return text, ids
        at, stop = min(hits)
        kept = fewest_tokens(message.text_tokens,
                             lambda count: count > floor and find(stop, self.decode(ids[:count])) >= 0)
        return text[:at + len(stop) if self.include_stop_str else at], ids[:kept]

    def chunk(self, message: Message, opening: bool = False) -> str:
        """The draft's SSE event; `opening`: no chunk of vLLM's has been sent yet."""
        choice = {"index": 0, "delta": {"role": "assistant"} if opening else {}} if self.chat \
            else {"index": 0, "text": ""}
        text, ids = self.cut(message)
        draft = {"block": message.block, "pass": message.pass_, "text": text}
        if self.token_ids:
            draft["token_ids"] = ids
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [{**choice, "logprobs": None, "finish_reason": None}], "diffusion_draft": draft}
        if self.usage:  # what the request has used so far: its prompt and the tokens committed
            body["usage"] = {"prompt_tokens": message.prompt_tokens, "completion_tokens": message.output_tokens,
                             "total_tokens": message.prompt_tokens + message.output_tokens}
        return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Weave:
    """The state of one stream: which canvases closed, which are committed, whether finished."""

    def __init__(self, form: DraftFormat):
        self.form = form
        self.closed = -1  # highest block whose close arrived
        self.committed = -1  # drafts of blocks up to this one are dropped
        self.finished = False
        self.opened = False  # one of vLLM's chunks has been sent

    def draft(self, message: Message) -> str | None:
        if message.kind == CLOSE:
            self.closed = max(self.closed, message.block)
            return None
        if self.finished or message.block <= self.committed:
            return None
        return self.form.chunk(message, opening=not self.opened)

    def committed_chunk(self, sse: str) -> None:
        """Read one of vLLM's SSE events: adopt its id/created/model, note commits and the end."""
        if not sse.startswith("data: ") or sse.startswith("data: [DONE]"):
            return
        try:
            body = json.loads(sse[len("data: "):])
        except ValueError:
            return
        self.opened = True
        self.form.id = body.get("id", self.form.id)
        self.form.created = body.get("created", self.form.created)
        self.form.model = body.get("model", self.form.model)
        for choice in body.get("choices") or ():
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                self.committed = self.closed
            if choice.get("finish_reason") is not None:
                self.finished = True
        if "error" in body:
            self.finished = True


async def with_drafts(body: AsyncIterator[str], subscriber: DraftSubscriber, key: bytes,
                      form: DraftFormat) -> AsyncIterator[str]:
    """vLLM's SSE events `body`, unchanged, with the drafts published under `key` woven in.
    Subscribes before the first read of `body`, which is what submits the request to the engine
    (vLLM's stream generators start it lazily), and unsubscribes however the stream ends."""
    weave = _Weave(form)
    with subscriber.subscribe(key) as queue:
        next_event = asyncio.ensure_future(anext(body))
        next_draft = asyncio.ensure_future(queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({next_event, next_draft}, return_when=asyncio.FIRST_COMPLETED)
                if next_draft in done:
                    for out in map(weave.draft, [next_draft.result(), *_drain(queue)]):
                        if out:
                            yield out
                    next_draft = asyncio.ensure_future(queue.get())
                if next_event in done:
                    try:
                        event = next_event.result()
                    except StopAsyncIteration:
                        return
                    for out in map(weave.draft, _drain(queue)):  # drafts already here go first
                        if out:
                            yield out
                    weave.committed_chunk(event)
                    yield event
                    next_event = asyncio.ensure_future(anext(body))
        finally:
            # On a client disconnect this runs inside a cancelled scope: cancel, never await.
            # The cancelled read raises inside vLLM's generator, which aborts the request.
            next_draft.cancel()
            next_event.cancel()


def _drain(queue: asyncio.Queue) -> list[Message]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
