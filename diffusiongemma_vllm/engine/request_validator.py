"""Admission-time validation of DiffusionGemma requests (a 400 / ValueError, never a crash).

vLLM calls a logits processor's `validate_params` for every request in the front-end
process before it reaches the engine, for the classes the engine's config lists;
engine/config_hook.py lists one bound to that engine (`validator_for`: its checkpoint's
defaults, canvas, vocabulary, tokenizer and structured-outputs refusal), for the DiffusionGemma
architecture only, so each engine's requests are judged against that engine alone. It changes
no logits. It rejects, naming the field:
- a bad diffusion knob (`extra_args` / `vllm_xargs`, named like generation_config.json's
  fields), judged against the defaults the worker will combine it with: the served
  checkpoint's generation_config.json;
- an `extra_args` key that is neither a knob, a live-draft setting (drafts/publisher.py), a
  canvas option (canvas_options.py, checked against the served canvas and vocabulary) nor
  one vLLM itself reads (a typo would otherwise be ignored without a word);
- a sampling feature the block-diffusion sampler does not implement, a bad word of more than
  one token (request_biases.py), logit biases or `allowed_token_ids` beside structured
  outputs, `allowed_token_ids` beside a constrained read, bans beside pinned positions,
  `min_tokens` beyond a read-only reply, and
  `logprob_token_ids` outside the vocabulary or beside more `logprobs` than there are ids;
- structured outputs on an engine that cannot serve them (config_hook.structured_refusal:
  a backend the worker does not build).
`temperature`, `top_p` and `top_k` are accepted and do not apply (the knobs' schedule is the
sampling temperature), as in transformers' DiffusionGemma; the README says so.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from diffusiongemma_vllm.model.config import SAMPLER_FIELDS, SamplerConfig
from diffusiongemma_vllm.drafts.publisher import DRAFT_ARGS, check_draft_args
from diffusiongemma_vllm.engine.canvas_options import CANVAS_ARGS, CanvasOptions, apply_read_only, is_int
from diffusiongemma_vllm.engine.request_biases import BIASING_FIELDS, biases_requested

# extra_args keys vLLM reads itself (v1/request.py: disaggregated prefill and KV reporting; the
# OpenAI server: `vllm_xargs.session_id`, a fallback for the request's session), with the values
# it can use: it calls .get on the transfer params (a string was a 500 with an empty message),
# compares the report mode with "full" and takes a session id only as a string.
VLLM_EXTRA_ARGS = ("kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode", "session_id")
KV_CACHE_REPORT_MODES = ("incremental", "full")
ACCEPTED_EXTRA_ARGS = SAMPLER_FIELDS + DRAFT_ARGS + CANVAS_ARGS + VLLM_EXTRA_ARGS

# Sampling fields the block sampler does not implement, with the value that means "off".
UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "thinking_token_budget": None,
    "repetition_detection": None,
}

# How clients that do not name a field set it, for its refusal to say.
ALSO_KNOWN_AS = {"thinking_token_budget": " (the Anthropic API's thinking.budget_tokens: ask for thinking "
                                          "with type adaptive instead)"}

RELEASE_CANVAS = (256, 262144)  # canvas length and vocabulary of google/diffusiongemma-26B-A4B-it


@dataclass(frozen=True)
class _ServedModel:
    defaults: SamplerConfig  # what the worker combines a request's knobs with
    structured_refusal: str | None  # why structured outputs are refused there (None: accepted)
    canvas: tuple[int, int]  # canvas length, vocabulary size
    tokenizer: Callable[[], object] | None = None  # the served tokenizer, loaded on first use; None: none served


RELEASE = _ServedModel(SamplerConfig(), None, RELEASE_CANVAS)  # where no engine is bound (another process)
BOUND = "DiffusionRequestValidatorOf"  # the name of an engine's own validator class, before its number
_engines = itertools.count()


def validator_for(model_config, defaults: SamplerConfig, structured_refusal: str | None = None,
                  canvas: tuple[int, int] = RELEASE_CANVAS) -> str:
    """The name (vLLM's `module:Class`) of a validator class bound to one engine, for its
    `model_config.logits_processors`: requests are judged against `defaults` and the `canvas`
    geometry, and structured outputs refused, saying why, if `structured_refusal`. A process
    that loads the name without having bound it (a worker builds the logits processors it
    lists) gets the same class with no engine bound (`__getattr__`)."""
    name = f"{BOUND}{next(_engines)}"
    served = _ServedModel(defaults, structured_refusal, canvas, _tokenizer_of(weakref.ref(model_config)))
    globals()[name] = type(name, (DiffusionRequestValidator,), {"served": served})
    return f"{__name__}:{name}"


def is_bound_validator(processor) -> bool:
    return isinstance(processor, str) and processor.startswith(f"{__name__}:{BOUND}")


def __getattr__(name: str):
    """An engine's validator class loaded by name in a process that did not bind it."""
    if not name.startswith(BOUND):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = type(name, (DiffusionRequestValidator,), {})
    return globals()[name]


def _tokenizer_of(model_config_ref) -> Callable[[], object] | None:
    """A loader of the engine's tokenizer (vLLM caches it per process), or None when the
    engine runs without one (`skip_tokenizer_init`: vLLM then tokenizes no bad words)."""
    if model_config_ref().skip_tokenizer_init:
        return None

    def load():
        from vllm.tokenizers import cached_tokenizer_from_config

        return cached_tokenizer_from_config(model_config=model_config_ref())

    return load


def check_request(sampling_params, model: _ServedModel = RELEASE) -> None:
    """Raise ValueError naming the first field the DiffusionGemma sampler cannot honour on the
    served `model`; a read-only canvas request (canvas_options.py) gets its max_tokens and
    ignore_eos set."""
    extra_args = sampling_params.extra_args or {}
    unknown = sorted(set(extra_args) - set(ACCEPTED_EXTRA_ARGS))
    if unknown:
        raise ValueError(f"unknown DiffusionGemma request setting {unknown[0]!r} (vllm_xargs / extra_args); "
                         f"accepted: {', '.join(SAMPLER_FIELDS + DRAFT_ARGS[:1] + CANVAS_ARGS)}")
    check_draft_args(extra_args)
    for name in ("kv_transfer_params", "ec_transfer_params"):
        if extra_args.get(name) is not None and not isinstance(extra_args[name], dict):
            raise ValueError(f"{name} must be an object, got {extra_args[name]!r}")
    if not isinstance(extra_args.get("session_id", ""), str):
        raise ValueError(f"session_id must be a string, got {extra_args['session_id']!r}")
    if extra_args.get("kv_cache_report_mode", "incremental") not in KV_CACHE_REPORT_MODES:
        raise ValueError(f"kv_cache_report_mode must be one of {', '.join(KV_CACHE_REPORT_MODES)}, "
                         f"got {extra_args['kv_cache_report_mode']!r}")
    for name, off in UNSUPPORTED.items():
        value = getattr(sampling_params, name, off)
        if value != off and value not in ({}, []):
            raise ValueError(f"{name}{ALSO_KNOWN_AS.get(name, '')} is not supported by the DiffusionGemma block "
                             f"sampler (got {value!r})")
    if sampling_params.logprobs is not None and sampling_params.logprobs < 0:
        raise ValueError("logprobs=-1 (the whole vocabulary per token) is not supported by DiffusionGemma; "
                         "ask for at most max_logprobs alternatives")
    structured = sampling_params.structured_outputs
    model.defaults.with_request_overrides(extra_args)
    if structured is not None and model.structured_refusal:
        raise ValueError(model.structured_refusal)
    check_logprob_ids(sampling_params, vocab_size=model.canvas[1])
    if sampling_params.bad_words and model.tokenizer is not None:
        check_bad_words(sampling_params, model.tokenizer())
    options = CanvasOptions.from_extra_args(extra_args, *model.canvas, sampling_params.logprob_token_ids)
    if structured is not None and (biases_requested(sampling_params) or sampling_params.allowed_token_ids):
        raise ValueError(f"{', '.join(BIASING_FIELDS)} and allowed_token_ids cannot be combined with structured "
                         "outputs: the grammar commits from the model's unbiased logits over the whole vocabulary")
    if sampling_params.allowed_token_ids and options.allowed:
        raise ValueError("allowed_token_ids cannot be combined with diffusion_constrained, whose allowed ids are "
                         "its logprob_token_ids")
    if options.pinned and (sampling_params.bad_words or sampling_params.min_tokens
                           or sampling_params.allowed_token_ids):
        raise ValueError("diffusion_pinned cannot be combined with bad_words, min_tokens or allowed_token_ids: a "
                         "pinned position commits its seed id, whatever they ban")
    if structured is not None and options.pinned:
        raise ValueError("diffusion_pinned cannot be combined with structured outputs: the grammar would "
                         "overrule the pinned ids")
    if structured is not None and options.allowed:
        raise ValueError("diffusion_constrained cannot be combined with structured outputs: the grammar "
                         "chooses among the whole vocabulary")
    served_canvas = model.canvas[0]
    if options.width is not None and options.width < served_canvas:
        for name, value in (("structured outputs", structured), ("draft_every", extra_args.get("draft_every"))):
            if value is not None:
                raise ValueError(f"diffusion_canvas_length below the served canvas cannot be combined with {name}")
    if options.read_only:
        apply_read_only(sampling_params, options.width or served_canvas)


def check_bad_words(sampling_params, tokenizer) -> None:
    """Bad words as vLLM tokenizes them (`update_from_tokenizer`, which raises vLLM's own error
    for a word of no tokens): each must be one token, the only kind a canvas can ban
    (request_biases.py)."""
    probe = sampling_params.clone()
    probe.update_from_tokenizer(tokenizer)
    longer = [ids for ids in probe.bad_words_token_ids if len(ids) > 1]
    if longer:
        raise ValueError(f"bad_words: {tokenizer.decode(longer[0])!r} is {len(longer[0])} tokens; DiffusionGemma "
                         "bans single-token words only (vLLM bans a longer word's last token after the tokens "
                         "before it, which a canvas does not fix until it is committed)")


def check_logprob_ids(sampling_params, vocab_size: int) -> None:
    """`logprob_token_ids`: ids of the vocabulary, asked for instead of a top-k. vLLM then
    reports these ids, as many as `logprobs` says when it is set too (its generative scoring
    endpoint sets it to their count): more than there are ids would show padding as tokens."""
    ids = sampling_params.logprob_token_ids
    if ids is None:
        return
    if not all(is_int(t) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"logprob_token_ids must be token ids in [0, {vocab_size})")
    if sampling_params.logprobs is not None and not 0 <= sampling_params.logprobs <= len(ids):
        raise ValueError(f"logprobs={sampling_params.logprobs} beside {len(ids)} logprob_token_ids: "
                         "ask for at most as many logprobs as ids, or for one of the two")


class DiffusionRequestValidator(LogitsProcessor):
    served: _ServedModel = RELEASE  # the engine a subclass is bound to (validator_for)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check_request(sampling_params, cls.served)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
