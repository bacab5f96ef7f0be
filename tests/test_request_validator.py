"""Admission-time checks (request_validator.py): what the block sampler cannot honour is a
400 / ValueError naming the field, and knobs are judged against the served checkpoint's
defaults, the ones the worker applies."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from diffusiongemma_vllm.model.config import SAMPLER_FIELDS, SamplerConfig
from diffusiongemma_vllm.engine.request_validator import check_request, validator_for


class ModelConfigStandIn:
    """Anything weak-referenceable stands for the engine's ModelConfig here (one that loads no
    tokenizer)."""

    skip_tokenizer_init = True


def test_unknown_knob_names_the_key_and_lists_the_accepted_ones():
    """Catches a typo such as `max_denoising_step` being accepted and silently ignored."""
    with pytest.raises(ValueError, match="'max_denoising_step'") as error:
        check_request(SamplingParams(extra_args={"max_denoising_step": 4}))
    assert all(name in str(error.value) for name in SAMPLER_FIELDS)


def test_vllm_own_extra_args_pass():
    """Catches the unknown-key check refusing the keys vLLM itself reads (disaggregated prefill,
    the OpenAI server's `vllm_xargs.session_id`)."""
    check_request(SamplingParams(extra_args={"kv_transfer_params": {"do_remote_prefill": False},
                                             "ec_transfer_params": None, "kv_cache_report_mode": "full",
                                             "session_id": "conversation-1"}))


@pytest.mark.parametrize("extra_args, field", [({"kv_transfer_params": "x"}, "kv_transfer_params"),
                                               ({"ec_transfer_params": [1]}, "ec_transfer_params"),
                                               ({"kv_cache_report_mode": 3}, "kv_cache_report_mode"),
                                               ({"session_id": 7}, "session_id")])
def test_vllm_own_extra_args_of_the_wrong_type_name_the_field(extra_args, field):
    """Catches a value vLLM cannot use passing admission: a string kv_transfer_params reached
    vLLM's output processor, which calls .get on it (an HTTP 500 with an empty message)."""
    with pytest.raises(ValueError, match=field):
        check_request(SamplingParams(extra_args=extra_args))


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -0.2), ("repetition_penalty", 1.3), ("min_p", 0.1),
    ("logprobs", -1),
])
def test_unimplemented_sampling_fields_name_the_field(field, value):
    """Catches a sampling field the block sampler ignores being answered as if it applied."""
    with pytest.raises(ValueError, match=field):
        check_request(SamplingParams(**{field: value}))


def test_a_thinking_budget_refusal_names_the_anthropic_field():
    """Catches a refusal an Anthropic client cannot act on: /v1/messages turns extended
    thinking's budget_tokens into thinking_token_budget, which the client never named."""
    with pytest.raises(ValueError, match="thinking.budget_tokens: ask for thinking with type adaptive"):
        check_request(SamplingParams(thinking_token_budget=1024))


def test_defaults_and_documented_no_ops_pass():
    """Catches the checks refusing untouched fields or temperature/top_p/top_k, which are
    documented as not applying (as in transformers)."""
    check_request(SamplingParams(temperature=0.3, top_p=0.9, top_k=40, seed=1, stop=["x"], n=2,
                                 extra_args={"max_denoising_steps": 8}))


def bound(model_config, *args, **kwargs):
    """The validator class the config hook lists for an engine (`validator_for`), loaded as vLLM loads it."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(validator_for(model_config, *args, **kwargs).replace(":", "."))


def test_knobs_are_judged_against_the_served_checkpoint_defaults():
    """Catches admission judging knobs against the release defaults while the worker applies
    the checkpoint's (a request setting only t_max below the checkpoint's t_min would pass
    admission and then raise in the engine, and the reverse case would be refused), and an
    engine's requests judged against another engine of the same process: a red-team run found
    a second `LLM` refusing what its checkpoint serves, and cutting read-only replies to the
    first one's canvas, while the first one's config had not been collected."""
    high = bound(ModelConfigStandIn(), SamplerConfig(t_min=0.7, t_max=0.9), canvas=(32, 512))
    low = bound(ModelConfigStandIn(), SamplerConfig(t_min=0.2, t_max=0.3), canvas=(256, 512))
    with pytest.raises(ValueError, match="t_max.*t_min is the served model's default"):
        high.validate_params(SamplingParams(extra_args={"t_max": 0.6}))
    high.validate_params(SamplingParams(extra_args={"t_max": 0.75}))
    high.validate_params(SamplingParams(extra_args={"t_max": 0.6, "t_min": 0.5}))
    low.validate_params(SamplingParams(extra_args={"t_max": 0.25}))  # below the release's t_min 0.4 and high's
    with pytest.raises(ValueError, match="t_max"):  # no engine bound: the release's defaults
        check_request(SamplingParams(extra_args={"t_max": 0.25}))
    read = SamplingParams(max_tokens=300, extra_args={"diffusion_read_only": True})
    low.validate_params(read)
    assert read.max_tokens == 256
    low.validate_params(SamplingParams(extra_args={"diffusion_canvas_length": 100}))
    with pytest.raises(ValueError, match="diffusion_canvas_length"):
        high.validate_params(SamplingParams(extra_args={"diffusion_canvas_length": 100}))


def test_a_process_that_did_not_bind_an_engine_loads_its_validator_unbound():
    """Catches a worker (which builds the logits processors its engine's config lists, by
    name) failing to load the bound validator's name: there it is the same class, unbound."""
    from diffusiongemma_vllm.engine import request_validator

    unbound = getattr(request_validator, request_validator.BOUND + "999999")
    assert issubclass(unbound, request_validator.DiffusionRequestValidator)
    assert unbound.served is request_validator.RELEASE
    with pytest.raises(AttributeError):
        request_validator.NotAValidator


def test_structured_outputs_are_refused_where_the_worker_cannot_follow_vllm():
    """Catches a structured request admitted by an engine whose backend the worker does not
    build (outlines, lm-format-enforcer), and one refused under a reasoning parser, where the
    worker starts the grammar after the reasoning as vLLM does (reasoning_bounds.py)."""
    from types import SimpleNamespace

    from vllm.config import StructuredOutputsConfig
    from vllm.sampling_params import StructuredOutputsParams

    from diffusiongemma_vllm.engine.config_hook import structured_refusal

    def engine(**settings):
        return SimpleNamespace(structured_outputs_config=StructuredOutputsConfig(**{"backend": "xgrammar", **settings}))

    assert structured_refusal(engine()) is None and structured_refusal(engine(backend="guidance")) is None
    assert structured_refusal(engine(reasoning_parser="gemma4")) is None
    refusal = structured_refusal(engine(backend="outlines"))
    assert "'outlines' backend" in refusal
    validator = bound(ModelConfigStandIn(), SamplerConfig(), refusal)
    with pytest.raises(ValueError, match="'outlines' backend"):
        validator.validate_params(SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")))
    validator.validate_params(SamplingParams(max_tokens=5))  # other requests pass


def test_logprob_token_ids_are_checked():
    """Catches ids outside the vocabulary reaching the logprobs sweep, more logprobs asked beside
    them than there are ids (vLLM would then read padding as tokens), and as many refused
    (vLLM's generative scoring asks so)."""
    check_request(SamplingParams(logprob_token_ids=[0, 5, 262143]))
    with pytest.raises(ValueError, match=r"logprob_token_ids must be token ids in \[0, 262144\)"):
        check_request(SamplingParams(logprob_token_ids=[5, 262144]))
    with pytest.raises(ValueError, match="logprobs=2 beside 1 logprob_token_ids"):
        check_request(SamplingParams(logprob_token_ids=[5], logprobs=2))
    check_request(SamplingParams(logprob_token_ids=[5, 7], logprobs=2))  # vLLM's generative scoring asks so


def test_bad_words_must_be_single_tokens_of_the_served_tokenizer(tiny_dir):
    """Catches a bad word of several tokens being accepted (the canvas would ban none of it, as
    request_biases.py bans single tokens only), and single-token words (with their
    space-prefixed form, as vLLM tokenizes them) refused."""
    from vllm.tokenizers import get_tokenizer

    from diffusiongemma_vllm.engine import request_validator

    tokenizer = get_tokenizer(tiny_dir)  # what cached_tokenizer_from_config loads
    single = next(w for w in ("the", "a", "and", "of") if len(tokenizer.encode(w, add_special_tokens=False)) == 1
                  and len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1)
    longer = next(w for w in ("quietly", "riverbank", "unbelievable")
                  if len(tokenizer.encode(w, add_special_tokens=False)) > 1)
    served = request_validator._ServedModel(SamplerConfig(), None, (256, len(tokenizer)), lambda: tokenizer)
    check_request(SamplingParams(bad_words=[single]), served)
    with pytest.raises(ValueError, match=f"bad_words: '{longer}' is"):
        check_request(SamplingParams(bad_words=[single, longer]), served)


@pytest.mark.parametrize("field, value", [("logit_bias", {7: 3.0}), ("bad_words", ["x"]), ("min_tokens", 4),
                                          ("allowed_token_ids", [3, 4])])
def test_logit_biases_beside_structured_outputs_are_refused(field, value):
    """Catches a biased request under a grammar being accepted: the grammar's commit ranks the
    model's unbiased logits, so the bias would not hold in what is committed."""
    from vllm.sampling_params import StructuredOutputsParams

    check_request(SamplingParams(**{field: value}))
    with pytest.raises(ValueError, match="cannot be combined with structured outputs"):
        check_request(SamplingParams(**{field: value}, structured_outputs=StructuredOutputsParams(json={})))


def test_allowed_token_ids_beside_a_constrained_read_is_refused():
    """Catches two allowed sets on one request being accepted (the read would use one)."""
    constrained = {"diffusion_constrained": True}
    check_request(SamplingParams(logprob_token_ids=[5, 6], extra_args=constrained))
    with pytest.raises(ValueError, match="allowed_token_ids cannot be combined with diffusion_constrained"):
        check_request(SamplingParams(allowed_token_ids=[5], logprob_token_ids=[5, 6], extra_args=constrained))
