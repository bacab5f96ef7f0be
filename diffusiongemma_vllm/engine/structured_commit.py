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
- Once the grammar is complete it allows only the request's stop tokens; the walk takes the
  most likely of them, which ends the request there (the scheduler trims at it). Past it (a
  request with `ignore_eos`), the canvas is the argmax, unconstrained, as vLLM leaves an
  autoregressive request after its grammar completes.
- The matcher is vLLM's own: the backend its front end chose for the request (xgrammar or
  guidance), compiled from the request's `structured_outputs` with the request's stop tokens,
  as vLLM's engine compiles it. The engine core advances its own copy with every emitted
  canvas and ends a request whose tokens it rejects (`finish_reason` error), so vLLM checks
  each commit independently.
The grammar lives in the worker, one per request, advanced canvas by canvas, and is dropped
when the request leaves (worker_step.py). A grammar that fails in the worker (it cannot be
compiled there, or the matcher raises) is logged and its request's canvases commit
unconstrained from then on; vLLM's grammar check then ends the request if they break the
grammar. The engine keeps serving the others.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

from diffusiongemma_vllm.denoise.vocab_shards import VocabShards
from diffusiongemma_vllm.kernels.gemm_sampler import mm_fp32
from diffusiongemma_vllm.kernels.top_logprobs import top_logprobs

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures

CANDIDATES = 16  # per position, from the halting pass; beyond them, one product over the vocabulary


class CanvasGrammars:
    """Each structured request's grammar in this worker, built at its first canvas."""

    def __init__(self, vllm_config, vocab_size: int):
        self.vllm_config = vllm_config
        self.vocab_size = vocab_size
        self.backend = None  # vLLM's, built at the first structured request (it loads the tokenizer)
        self.grammars: dict[str, object | None] = {}  # None: failed here, committed unconstrained

    def commit(self, req_id: str, sampling_params, hidden: torch.Tensor, argmax: torch.Tensor,
               unembedding) -> torch.Tensor:
        """The canvas a structured request commits (`constrained_canvas`); its argmax if its
        grammar failed in this worker (logged once)."""
        try:
            grammar = self.grammar(req_id, sampling_params)
            if grammar is not None:
                return constrained_canvas(grammar, req_id, hidden, argmax, unembedding)
        except Exception:  # noqa: BLE001 - one request's grammar must not stop the engine
            logger.exception("DiffusionGemma: the grammar of request %s failed in the worker; its canvases commit "
                             "unconstrained and vLLM's grammar check ends it if they break the grammar", req_id)
            self.grammars[req_id] = None
        return argmax

    def grammar(self, req_id: str, sampling_params):
        """The request's matcher, compiled as vLLM's engine compiles it."""
        if req_id not in self.grammars:
            from vllm.v1.structured_output.request import get_structured_output_key

            params = sampling_params.structured_outputs
            kind, spec = get_structured_output_key(params)
            self.grammars[req_id] = self._backend(params._backend).compile_grammar(
                kind, spec, stop_token_ids=sampling_params.all_stop_token_ids)
        return self.grammars[req_id]

    def _backend(self, name: str | None):
        if self.backend is None:
            from vllm.tokenizers import cached_tokenizer_from_config

            tokenizer = cached_tokenizer_from_config(model_config=self.vllm_config.model_config)
            if name == "guidance":
                from vllm.v1.structured_output.backend_guidance import GuidanceBackend as Backend
            else:  # the front end named it; request_validator.py admits only STRUCTURED_BACKENDS
                from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend as Backend
            self.backend = Backend(self.vllm_config, tokenizer=tokenizer, vocab_size=self.vocab_size)
            logger.info("DiffusionGemma structured outputs: vLLM's %s backend in the worker", name)
        return self.backend

    def forget(self, live) -> None:
        self.grammars = {k: v for k, v in self.grammars.items() if k in live}


def constrained_canvas(grammar, req_id: str, hidden: torch.Tensor, argmax: torch.Tensor, unembedding,
                       candidates: int = CANDIDATES) -> torch.Tensor:
    """The canvas to commit ([C] int64, on the host): left to right, each position's most
    likely token the grammar allows after the ones before it, accepted into `grammar` (vLLM's
    StructuredOutputGrammar, advanced in place). `hidden` [C, H] is the halting pass's,
    `argmax` [C] its argmax (the unconstrained commit)."""
    from vllm.v1.structured_output.backend_xgrammar import xgr  # the bitmask layout every backend fills

    if grammar.is_terminated():
        return argmax.clone()
    length = hidden.shape[0]
    k = min(candidates, unembedding.vocab)
    top = top_logprobs(hidden, unembedding.weight, unembedding.softcap, argmax.to(hidden.device), k,
                       first_id=unembedding.first_id, shards=unembedding.shards).top_ids.cpu()
    bitmask = xgr.allocate_token_bitmask(1, unembedding.vocab)
    out = torch.empty(length, dtype=torch.int64)
    for position in range(length):
        grammar.fill_bitmask(bitmask, 0)
        allowed = (bitmask[0, top[position] // 32] >> (top[position] % 32)) & 1
        choice = top[position, allowed.argmax()] if allowed.any() else \
            masked_argmax(hidden[position], unembedding, unpack(bitmask[0], unembedding.vocab))
        token = int(choice)
        if not grammar.accept_tokens(req_id, [token]):
            raise RuntimeError(f"the grammar of request {req_id} refused token {token} it allowed")
        out[position] = token
        if grammar.is_terminated():  # a stop token: the request ends here, unless it ignores EOS
            out[position + 1:] = argmax[position + 1:]
            break
    return out


def unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """A grammar bitmask row (int32 words, bit b of word w is token 32 w + b) as [vocab] bools."""
    bits = (words[:, None] >> torch.arange(32, dtype=words.dtype)) & 1
    return bits.flatten()[:vocab].bool()


def masked_argmax(hidden: torch.Tensor, unembedding, allowed: torch.Tensor) -> int:
    """The most likely allowed token over the whole vocabulary at one position (the lowest id
    among equals): this rank's slice's logits, masked, merged over the slices."""
    weight, first = unembedding.weight, unembedding.first_id
    logits = mm_fp32(hidden[None], weight.T)[0]  # the softcap is monotone: the argmax of the products
    logits = logits.masked_fill(~allowed[first:first + weight.shape[0]].to(logits.device), float("-inf"))
    best = logits.argmax()
    return merge_best(torch.stack([logits[best], (first + best).float()]), unembedding.shards)


def merge_best(local: torch.Tensor, shards: VocabShards | None) -> int:
    """The token of the largest value over the vocabulary slices, from this slice's
    [value, token]: the lower rank, which holds the lower ids, on ties."""
    if shards is None:
        return int(local[1])
    gathered = shards.all_gather(local[None])  # [ranks, 1, 2]
    return int(gathered[gathered[:, 0, 0].argmax(), 0, 1])
