"""Live drafts, worker side: a denoising canvas's current argmax, published every N passes.

A request opts in with `extra_args={"draft_every": N, "draft_key": KEY}` (over HTTP the
endpoint plugin, drafts/endpoints.py, sets the key on streamed requests that ask for
`draft_every`). While its canvas denoises, after every pass whose number is a multiple of N
the worker publishes the canvas's argmax, the tokens the canvas would commit if it halted
then, cut where vLLM's scheduler would cut it (max_tokens, max_model_len, EOS and stop token
ids; `cut_length`), and a close message when the canvas halts. Drafts only read the canvas
state: committed tokens are the same with or without them.

Why a side channel: nothing on vLLM's worker -> engine core -> API server path carries
per-request data in the middle of a step (ModelRunnerOutput and EngineCoreOutput are fixed
structs, and a whole canvas is denoised inside one step). So the worker publishes on a ZeroMQ
PUB socket (pyzmq is a vLLM dependency) bound to the address in `DIFFUSIONGEMMA_DRAFTS`, and
each API server process subscribes to it (drafts/stream.py, wired in by drafts/endpoints.py).
`register()` sets that variable in the first vLLM process (the API server, or the `LLM`
process) before vLLM starts its engine, whose processes inherit it; each server gets its own
`ipc://` address. The worker binds at start-up, not at the first draft, so subscribers are
connected before any request can ask (a PUB socket drops what it sends before a subscriber's
subscription arrives).

Wire format, one ZeroMQ multipart message per event: [key, header, tokens], header
`HEADER` = (kind, block, pass, text tokens, prompt tokens, output tokens), tokens int32 (empty
for a close). `text tokens` is how many leading tokens have text: a draft cut at a stop token
keeps that token in its ids, as vLLM's output ids do, but not in its text. Prompt and output
tokens (those committed before the canvas) are the request's usage so far, which a stream
asking for continuous usage stats shows on every chunk.

Cost when no request asks: one idle socket bound at start-up; the denoise loop gets no
callback (denoise.denoise_canvases' `on_pass` stays None), so no copy and no extra
synchronisation. For a drafting canvas: a read of its pass counter after each pass and one
device-to-host copy of its argmax every N passes.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffusiongemma_vllm import DRAFTS_ENV as ENV

DRAFT_ARGS = ("draft_every", "draft_key")
HEADER = struct.Struct("<Bqqqqq")  # kind, block, pass, text tokens, prompt tokens, output tokens
DRAFT, CLOSE = 0, 1
SEND_HWM = 10_000  # messages queued per subscriber before the PUB socket drops (never blocks)

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures


def check_draft_args(extra_args: dict) -> None:
    """Admission (request_validator.py): raise ValueError naming a bad draft setting."""
    every = extra_args.get("draft_every")
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"draft_every must be an integer >= 1 (passes between drafts), got {every!r}")
    key = extra_args.get("draft_key")
    if not isinstance(key, str) or not key:
        raise ValueError("draft_every needs a streamed request (stream=true) to /v1/completions or "
                         "/v1/chat/completions (the routes that carry drafts) on a server started with "
                         "VLLM_PLUGINS=diffusiongemma (offline: also set extra_args draft_key and subscribe to $"
                         + ENV + ")")


@dataclass(frozen=True)
class Message:
    key: bytes
    kind: int
    block: int
    pass_: int  # the canvas's passes so far (for a close: in all)
    tokens: np.ndarray  # int32 [n]
    text_tokens: int
    prompt_tokens: int = 0
    output_tokens: int = 0  # committed before this canvas

    def encode(self) -> list[bytes]:
        return [self.key, HEADER.pack(self.kind, self.block, self.pass_, self.text_tokens, self.prompt_tokens,
                                      self.output_tokens), self.tokens.astype(np.int32).tobytes()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> "Message":
        key, header, tokens = frames
        kind, block, pass_, text_tokens, prompt_tokens, output_tokens = HEADER.unpack(header)
        return cls(bytes(key), kind, block, pass_, np.frombuffer(tokens, dtype=np.int32), text_tokens,
                   prompt_tokens, output_tokens)


def cut_length(tokens: np.ndarray, limit: int, stop_ids: frozenset[int]) -> tuple[int, int]:
    """(tokens kept, tokens with text) of a canvas as vLLM's scheduler would emit it: at most
    `limit` (what max_tokens and max_model_len leave), through the first stop token, which
    keeps its id but has no text (vLLM's check_stop and detokenizer)."""
    head = tokens[:max(limit, 0)]
    stops = np.flatnonzero(np.isin(head, list(stop_ids))) if stop_ids else ()
    if len(stops):
        return int(stops[0]) + 1, int(stops[0])
    return len(head), len(head)


@dataclass(frozen=True)
class CanvasDraft:
    """What the worker needs to publish one request's canvas."""

    key: bytes
    every: int
    block: int
    limit: int  # tokens max_tokens and max_model_len leave for this canvas
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and stop_token_ids
    prompt_tokens: int = 0
    output_tokens: int = 0  # committed before this canvas


class DraftPublisher:
    """The worker's PUB socket, bound at start-up to `$DIFFUSIONGEMMA_DRAFTS`."""

    def __init__(self, address: str):
        import zmq

        self.zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)

    @classmethod
    def from_env(cls, tensor_parallel_rank: int = 0) -> "DraftPublisher | None":
        """The publisher of a worker, bound to the address `register()` set; None when none is set,
        and on every tensor-parallel rank but the first (all ranks hold the same canvases)."""
        address = os.environ.get(ENV)
        if not address or tensor_parallel_rank != 0:
            return None
        try:
            return cls(address)
        except Exception as error:  # noqa: BLE001 - drafts off, serving on
            logger.warning("DiffusionGemma live drafts off: cannot bind %s (%s)", address, error)
            return None

    def canvas(self, sampling_params, block: int, context: int, num_output: int,
               max_model_len: int) -> CanvasDraft | None:
        """The draft settings of a request's canvas at `block`, or None if it asked for none."""
        extra_args = sampling_params.extra_args or {}
        if extra_args.get("draft_every") is None or not extra_args.get("draft_key"):
            return None
        limit = min(sampling_params.max_tokens - num_output, max_model_len - context)
        stop_ids = set(sampling_params.stop_token_ids or ())
        if sampling_params.eos_token_id is not None:
            stop_ids.add(sampling_params.eos_token_id)
        return CanvasDraft(str(extra_args["draft_key"]).encode(), int(extra_args["draft_every"]), block, limit,
                           frozenset(stop_ids), context - num_output, num_output)

    def watch(self, canvases: list[CanvasDraft | None]) -> Callable | None:
        """denoise_canvases' `on_pass` for jobs `canvases` (None: no callback at all)."""
        if not any(canvases):
            return None

        def on_pass(batch, slots) -> None:
            rows = [row for row, job in enumerate(slots.tolist()) if canvases[job] is not None]
            if not rows:
                return
            index = torch.tensor(rows, device=batch.steps.device)
            steps, halted = batch.steps[index].tolist(), batch.halted[index].tolist()
            due = [n for n, row in enumerate(rows) if steps[n] % canvases[int(slots[row])].every == 0]
            argmax = batch.argmax[index[due]].cpu().numpy() if due else None
            for n, row in enumerate(rows):
                canvas = canvases[int(slots[row])]
                if n in due:
                    tokens = argmax[due.index(n)]
                    keep, text = cut_length(tokens, canvas.limit, canvas.stop_ids)
                    self._send(Message(canvas.key, DRAFT, canvas.block, steps[n], tokens[:keep], text,
                                       canvas.prompt_tokens, canvas.output_tokens))
                if halted[n]:
                    self._send(Message(canvas.key, CLOSE, canvas.block, steps[n], np.empty(0, np.int32), 0))

        return on_pass

    def _send(self, message: Message) -> None:
        try:
            self.socket.send_multipart(message.encode(), flags=self.zmq.NOBLOCK)
        except self.zmq.Again:  # a subscriber that stopped reading: drafts are best effort
            pass

