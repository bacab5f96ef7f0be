"""A request's own canvas (engine/canvas_options.py): admission checks, and the denoise loop
with a seeded start, pinned positions and a pass cap, on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from diffusiongemma_vllm.denoise.loop import CanvasJob, denoise_canvases
from diffusiongemma_vllm.engine.canvas_options import CanvasOptions
from diffusiongemma_vllm.engine.request_validator import check_request
from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.testing.standalone import load_standalone
from tests.test_denoise_resume import prefilled

C, VOCAB = 8, 100


@pytest.mark.parametrize("extra_args, message", [
    ({"diffusion_seed_canvas": [1] * 7}, "exactly 8 ids, got 7"),
    ({"diffusion_seed_canvas": [1] * 7 + [100]}, r"ids must be in \[0, 100\)"),
    ({"diffusion_seed_canvas": "12345678"}, "list of token ids"),
    ({"diffusion_seed_canvas": [True] * 8}, "list of token ids"),
    ({"diffusion_pinned": [0]}, "needs a diffusion_seed_canvas"),
    ({"diffusion_seed_canvas": [1] * 8, "diffusion_pinned": [8]}, r"inside the canvas \[0, 8\)"),
    ({"diffusion_seed_canvas": [1] * 8, "diffusion_pinned": 3}, "list of canvas positions"),
    ({"diffusion_max_steps": 0}, "positive integer"),
    ({"diffusion_max_steps": 1.5}, "positive integer"),
    ({"diffusion_read_only": 2}, "boolean"),
    ({"diffusion_canvas_length": 16}, r"no larger than the served canvas \(8\)"),
    ({"diffusion_canvas_length": -8}, "positive integer"),
    ({"diffusion_canvas_length": 4, "diffusion_seed_canvas": [1] * 8}, "exactly 4 ids, got 8"),
    ({"diffusion_canvas_length": 4, "diffusion_seed_canvas": [1] * 4, "diffusion_pinned": [4]},
     r"inside the canvas \[0, 4\)"),
    ({"diffusion_constrained": True}, "diffusion_constrained needs logprob_token_ids"),
    ({"diffusion_constrained": "yes"}, "diffusion_constrained must be a boolean"),
])
def test_bad_canvas_options_are_refused_naming_the_option(extra_args, message):
    """Catches a malformed option reaching the worker (where it would fail the engine step)."""
    with pytest.raises(ValueError, match=message):
        CanvasOptions.from_extra_args(extra_args, C, VOCAB)


def test_good_canvas_options_parse():
    options = CanvasOptions.from_extra_args({"diffusion_seed_canvas": list(range(8)), "diffusion_pinned": [5, 1, 5],
                                             "diffusion_max_steps": 3, "diffusion_read_only": 1,
                                             "diffusion_canvas_length": 8}, C, VOCAB)
    assert options == CanvasOptions(8, tuple(range(8)), (1, 5), 3, True)
    assert CanvasOptions.from_extra_args(None, C, VOCAB) == CanvasOptions()
    constrained = CanvasOptions.from_extra_args({"diffusion_constrained": 1}, C, VOCAB, [9, 2, 9, 40])
    assert constrained.allowed == (2, 9, 40)
    assert CanvasOptions.from_extra_args({"diffusion_constrained": False}, C, VOCAB, [9]).allowed == ()


def test_admission_makes_a_read_only_request_one_canvas_long():
    """Catches a read-only request that would go on past its canvas, or end early at an EOS
    drawn into it (vLLM's in-tree model normalises it the same way), and options judged
    against another canvas than the served one's."""
    from diffusiongemma_vllm.engine.request_validator import _ServedModel

    served = _ServedModel(SamplerConfig(), None, (C, VOCAB))
    long = SamplingParams(max_tokens=1000, extra_args={"diffusion_read_only": True})
    check_request(long, served)
    assert long.max_tokens == C and long.ignore_eos
    short = SamplingParams(max_tokens=2, extra_args={"diffusion_read_only": 1})
    check_request(short, served)
    assert short.max_tokens == 2 and short.ignore_eos
    with pytest.raises(ValueError, match="diffusion_seed_canvas must hold exactly 8 ids"):
        check_request(SamplingParams(extra_args={"diffusion_seed_canvas": [1, 2]}), served)
    narrow = SamplingParams(max_tokens=1000, extra_args={"diffusion_read_only": True, "diffusion_canvas_length": 3})
    check_request(narrow, served)
    assert narrow.max_tokens == 3
    # A red-team run: min_tokens beyond the read-only reply killed the engine core's input thread.
    with pytest.raises(ValueError, match="min_tokens=5 beyond the 3 tokens of a diffusion_read_only reply"):
        check_request(SamplingParams(max_tokens=64, min_tokens=5, extra_args=narrow.extra_args), served)
    from vllm.sampling_params import StructuredOutputsParams

    with pytest.raises(ValueError, match="below the served canvas cannot be combined with structured outputs"):
        check_request(SamplingParams(extra_args={"diffusion_canvas_length": 3},
                                     structured_outputs=StructuredOutputsParams(regex="a+")), served)
    with pytest.raises(ValueError, match="below the served canvas cannot be combined with draft_every"):
        check_request(SamplingParams(extra_args={"diffusion_canvas_length": 3, "draft_every": 2, "draft_key": "k"}),
                      served)
    check_request(SamplingParams(extra_args={"diffusion_canvas_length": C},
                                 structured_outputs=StructuredOutputsParams(regex="a+")), served)


def test_pins_or_a_constrained_read_under_a_grammar_are_refused():
    """Catches a pinned canvas committed under a grammar, which may replace the pinned ids, or a
    constrained read's canvas committed from the whole vocabulary by its grammar; and a
    constrained read without its allowed ids, or with ids outside the vocabulary (the
    release's, with no engine bound)."""
    from vllm.sampling_params import StructuredOutputsParams

    pinned = {"diffusion_seed_canvas": [1] * 256, "diffusion_pinned": [0]}
    with pytest.raises(ValueError, match="diffusion_pinned cannot be combined with structured outputs"):
        check_request(SamplingParams(extra_args=pinned, structured_outputs=StructuredOutputsParams(regex="a+")))
    constrained = {"diffusion_constrained": True}
    with pytest.raises(ValueError, match="diffusion_constrained cannot be combined with structured outputs"):
        check_request(SamplingParams(extra_args=constrained, logprob_token_ids=[5, 6],
                                     structured_outputs=StructuredOutputsParams(regex="a+")))
    with pytest.raises(ValueError, match="diffusion_constrained needs logprob_token_ids"):
        check_request(SamplingParams(extra_args=constrained))
    with pytest.raises(ValueError, match=r"logprob_token_ids must be token ids in \[0, 262144\)"):
        check_request(SamplingParams(extra_args=constrained, logprob_token_ids=[5, 262144]))
    check_request(SamplingParams(extra_args=constrained, logprob_token_ids=[5, 6]))
    check_request(SamplingParams(extra_args={"diffusion_seed_canvas": [1] * 256},
                                 structured_outputs=StructuredOutputsParams(regex="a+")))
    for ban in ({"bad_words": ["a"]}, {"min_tokens": 3}, {"allowed_token_ids": [1, 2]}):  # a pin would overrule it
        with pytest.raises(ValueError, match="diffusion_pinned cannot be combined with bad_words"):
            check_request(SamplingParams(extra_args=pinned, **ban))
    check_request(SamplingParams(extra_args=pinned, logit_bias={1: 2.0}))


@pytest.fixture(scope="module")
def standalone(tiny_dir):
    return load_standalone(tiny_dir)


def run(standalone, jobs):
    """The jobs over the test prompts; also each pass's input canvases and self-conditioning."""
    model, cfg = standalone, standalone.model.cfg
    store_rows, context = prefilled(model)
    inputs = []

    def run_pass(rows, canvas, soft):
        inputs.append((rows.clone(), canvas.clone(), soft.clone()))
        return model.denoise(store_rows[rows], canvas, context[rows], soft)

    result = denoise_canvases(jobs, cfg.canvas_length, run_pass, model.model.unembedding())
    return result, inputs


def test_seeded_canvas_starts_from_its_ids_and_holds_its_pins(standalone):
    """Catches a seed ignored (noise instead), a pinned position overwritten by a renoise or
    by the model's argmax (in an input or the committed canvas), a pin's self-conditioning
    leaking the model's guess, and a seeded canvas changing its unseeded batch mates."""
    cfg = standalone.model.cfg
    length, sampler = cfg.canvas_length, SamplerConfig(max_denoising_steps=6, stability_threshold=100)
    seed = [(7 * i + 3) % cfg.vocab_size for i in range(length)]
    pins = (0, 3, length - 1)
    plain = [CanvasJob(0, sampler, seed=40 + i) for i in range(3)]
    seeded = CanvasJob(0, sampler, seed=41, seed_canvas=tuple(seed), pinned=pins)
    alone, _ = run(standalone, plain)
    mixed, inputs = run(standalone, [plain[0], seeded, plain[2]])

    assert torch.equal(mixed.tokens[[0, 2]], alone.tokens[[0, 2]])  # batch mates unchanged
    assert mixed.passes.tolist() == [6, 6, 6]
    first_rows, first_canvas, _ = inputs[0]
    assert first_canvas[1].tolist() == seed  # the whole seed is the first input
    for rows, canvas, soft in inputs:
        row = rows.tolist().index(1)
        assert canvas[row, list(pins)].tolist() == [seed[p] for p in pins]
        assert not soft[row, list(pins)].any()
    assert inputs[1][1][1].tolist() != seed  # unpinned positions moved on
    assert mixed.tokens[1, list(pins)].tolist() == [seed[p] for p in pins]
    assert not torch.equal(mixed.tokens[1], alone.tokens[1])  # the seed changed the canvas


def test_pass_cap_halts_early_under_the_full_schedule(standalone):
    """Catches diffusion_max_steps changing the temperature schedule (it only stops the canvas
    early: its passes equal the first passes of the uncapped run) or not stopping it."""
    sampler = SamplerConfig(max_denoising_steps=6, stability_threshold=100)
    capped, capped_inputs = run(standalone, [CanvasJob(0, sampler, seed=5, max_passes=2)])
    full, full_inputs = run(standalone, [CanvasJob(0, sampler, seed=5)])
    assert capped.passes.tolist() == [2] and full.passes.tolist() == [6]
    assert len(capped_inputs) == 2
    for (_, canvas, soft), (_, full_canvas, full_soft) in zip(capped_inputs, full_inputs):
        assert torch.equal(canvas, full_canvas) and torch.equal(soft, full_soft)
    assert run(standalone, [CanvasJob(0, sampler, seed=5, max_passes=50)])[0].passes.tolist() == [6]


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_canvas_options_through_vllm(tiny_dir):
    """Catches the options lost between admission and the worker: through `LLM.generate`, a
    seeded, pinned, capped first canvas commits its pins, runs its cap (as does the request's
    second canvas) and leaves its batch mates as they were; a read-only request ends with its
    canvas; a bad option fails its request only."""
    import gc

    from vllm import LLM
    from vllm.exceptions import VLLMValidationError

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    seed = [(11 * i + 5) % 512 for i in range(32)]
    pins = [0, 1, 2, 20, 31]
    options = {"diffusion_seed_canvas": seed, "diffusion_pinned": pins, "diffusion_max_steps": 2,
               "max_denoising_steps": 8}
    prompts = ["the model writes", "a long essay about Portugal", "and its rivers"]
    plain = [SamplingParams(max_tokens=64, ignore_eos=True, seed=s, extra_args={"max_denoising_steps": 8})
             for s in range(3)]
    before = dict(llm.collective_rpc("diffusion_stats")[0]["canvas_passes"])
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    seeded = SamplingParams(max_tokens=64, ignore_eos=True, seed=1, extra_args=options)
    mixed = [o.outputs[0].token_ids for o in llm.generate(prompts, [plain[0], seeded, plain[2]])]
    assert mixed[0] == alone[0] and mixed[2] == alone[2]
    assert [mixed[1][p] for p in pins] == [seed[p] for p in pins]
    passes = llm.collective_rpc("diffusion_stats")[0]["canvas_passes"]
    assert passes.get(2, 0) - before.get(2, 0) == 2  # both canvases of the seeded request, capped

    read = SamplingParams(max_tokens=500, seed=3, extra_args={"diffusion_read_only": True, "diffusion_max_steps": 1})
    out = llm.generate(prompts[:1], read)[0].outputs[0]
    assert len(out.token_ids) == 32 and out.finish_reason == "length"
    assert llm.collective_rpc("diffusion_stats")[0]["canvas_passes"].get(1, 0) == 1
    with pytest.raises((ValueError, VLLMValidationError), match="diffusion_seed_canvas must hold exactly 32 ids"):
        llm.generate(prompts[:1], SamplingParams(extra_args={"diffusion_seed_canvas": seed[:5]}))
    assert llm.generate(prompts[:1], plain[0])[0].outputs[0].token_ids == alone[0]
    del llm
    gc.collect()


def test_a_session_turn_with_new_parameters_gets_new_settings():
    """Catches the worker keeping a request's first settings when a streaming input session's
    next turn brings new sampling parameters (its seed canvas, its knobs)."""
    from types import SimpleNamespace

    from diffusiongemma_vllm.engine.worker_step import DenoiseStep

    step = SimpleNamespace(settings={}, default_sampler=SamplerConfig(), canvas_length=C,
                           model=SimpleNamespace(cfg=SimpleNamespace(vocab_size=VOCAB)))
    first = SamplingParams(seed=1, extra_args={"diffusion_seed_canvas": [1] * 8})
    assert DenoiseStep._settings(step, "r", first).canvas.seed_canvas == (1,) * 8
    assert DenoiseStep._settings(step, "r", first) is step.settings["r"]  # kept while the parameters are
    turn = SamplingParams(seed=1, extra_args={"max_denoising_steps": 3})
    settings = DenoiseStep._settings(step, "r", turn)
    assert settings.canvas.seed_canvas is None and settings.sampler.max_denoising_steps == 3


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_narrower_canvases_equal_transformers_with_that_canvas_length(tiny_dir):
    """Catches a `diffusion_canvas_length` request denoised at the checkpoint's length, keyed
    to the wrong block, emitting past its canvas or disturbing a full-length batch mate: its
    tokens must be transformers' generate with `canvas_length` set to that width (same draws),
    beside a full-length request that must equal its own reference; its logprobs must be
    those of transformers' halting passes (a narrower canvas's rows in vLLM's logprobs grid
    once stopped the engine)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from diffusiongemma_vllm.testing.reference import reference_generate
    from tests.test_reference_equivalence import prompt_ids

    knobs = {"max_denoising_steps": 3}
    sampler = SamplerConfig().with_request_overrides(knobs)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    full_length = model.config.canvas_length
    full = reference_generate(model, prompt_ids(23, 12), 12, 2, sampler)
    model.config.canvas_length = 8
    narrow = reference_generate(model, prompt_ids(5, 11), 11, 3, sampler)

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(5, 11)), TokensPrompt(prompt_token_ids=prompt_ids(23, 12))],
        [SamplingParams(max_tokens=3 * 8, ignore_eos=True, seed=11, logprobs=2,
                        extra_args={**knobs, "diffusion_canvas_length": 8}),
         SamplingParams(max_tokens=2 * full_length, ignore_eos=True, seed=12, extra_args=knobs)])
    assert list(outs[0].outputs[0].token_ids) == narrow.sequences[0, 5:].tolist()
    assert list(outs[1].outputs[0].token_ids) == full.sequences[0, 23:].tolist()
    want = torch.log_softmax(torch.cat(narrow.final_logits), dim=-1)  # the halting passes' logits
    for position, (token, entry) in enumerate(zip(outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs)):
        assert set(entry) == {token, *want[position].topk(2).indices.tolist()}
        assert all(abs(lp.logprob - want[position, t].item()) < 1e-4 for t, lp in entry.items())
    del llm


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_constrained_reads_equal_transformers_masked_to_the_allowed_ids(tiny_dir):
    """Catches a constrained request drawing, accepting or committing ids outside its set,
    reading it with the whole vocabulary's entropy or self-conditioning signal, sharing passes
    (and so an unembedding) with an unconstrained request, or reporting logprobs normalised
    over the whole vocabulary: its tokens must be transformers' generate with every logit
    outside the set at -inf (same draws; the allowed ids' noise keyed by their index among
    them), and its logprobs those of the masked halting passes; an unconstrained request in
    the same steps must equal its own reference, its top-10 logprobs (more than the read's 7
    ids) leaving the read's alone."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from diffusiongemma_vllm.testing.reference import reference_generate
    from tests.test_reference_equivalence import prompt_ids

    allowed = [300, 7, 45, 7, 511, 2, 260, 88]  # unsorted, 7 twice
    knobs = {"max_denoising_steps": 4}
    sampler = SamplerConfig().with_request_overrides(knobs)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    length = model.config.canvas_length
    constrained = reference_generate(model, prompt_ids(9, 21), 21, 2, sampler, allowed=allowed)
    free = reference_generate(model, prompt_ids(14, 22), 22, 2, sampler)

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(9, 21)), TokensPrompt(prompt_token_ids=prompt_ids(14, 22))],
        [SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=21, logprob_token_ids=allowed,
                        extra_args={**knobs, "diffusion_constrained": True}),
         SamplingParams(max_tokens=2 * length, ignore_eos=True, seed=22, extra_args=knobs, logprobs=10)])
    tokens = list(outs[0].outputs[0].token_ids)
    assert tokens == constrained.sequences[0, 9:].tolist() and set(tokens) <= set(allowed)
    assert list(outs[1].outputs[0].token_ids) == free.sequences[0, 14:].tolist()
    assert all(len(entry) >= 10 for entry in outs[1].outputs[0].logprobs)
    want = torch.log_softmax(torch.cat(constrained.final_logits), dim=-1)  # -inf outside the set
    for position, (token, entry) in enumerate(zip(tokens, outs[0].outputs[0].logprobs)):
        assert set(entry) == set(allowed)
        assert all(abs(lp.logprob - want[position, t].item()) < 1e-4 for t, lp in entry.items())
    assert abs(torch.logsumexp(want[0, sorted(set(allowed))], 0).item()) < 1e-5  # renormalised over the 7 ids
    del llm


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_a_decision_read_is_the_first_pass_over_its_seeded_canvas(tiny_dir, standalone):
    """Catches the composition vLLM's structured decisions API sends (tests/test_structured_
    decisions.py) drifting from the model: a one-pass, read-only, 16-token canvas seeded with
    [noise, end of turn, pad...] whose first position's logprob_token_ids are the answer must
    report log softmax of the model's first pass over exactly that canvas (no self-conditioning
    yet), after the prompt."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from tests.test_reference_equivalence import prompt_ids

    prompt, width, labels = prompt_ids(23, 5), 16, [150, 151, 152, 300]
    canvas = [397, 106] + [0] * (width - 2)
    model = standalone
    model.allocate(1, 256)
    rows = torch.tensor([0])
    model.prefill(rows, torch.tensor([prompt]), torch.tensor([0]))
    hidden = model.denoise(rows, torch.tensor([canvas]), torch.tensor([len(prompt)]), None)
    want = torch.log_softmax(model.logits(hidden)[0, 0].float(), dim=-1)[labels]

    llm = LLM(model=tiny_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    read = SamplingParams(max_tokens=2, logprob_token_ids=labels, extra_args={
        "diffusion_seed_canvas": canvas, "diffusion_canvas_length": width, "diffusion_max_steps": 1,
        "diffusion_read_only": True})
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], read)[0].outputs[0]
    got = torch.tensor([out.logprobs[0][label].logprob for label in labels])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(out.token_ids) == 2 and llm.collective_rpc("diffusion_stats")[0]["canvas_passes"] == {1: 1}
    del llm
