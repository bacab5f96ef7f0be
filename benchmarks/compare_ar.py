"""DiffusionGemma through this plugin vs autoregressive Gemma 4 of the same backbone, side by side.

Every system runs in its own subprocess (a fresh vLLM engine, its own plugin setting), on the
same seeded prompt set, at each concurrency level, in one invocation of this script:
- `plugin`: DiffusionGemma served by this plugin;
- `ar`: the autoregressive Gemma 4 twin (same layers, experts, vocabulary);
- `in-tree`: vLLM's own DiffusionGemma (plugin disabled with VLLM_PLUGINS=""), GPU only:
  it needs Model Runner V2, which needs Triton on a GPU;
- `plugin-pps<N>` (with `--passes-per-step N`): the plugin with at most N denoise passes per
  scheduler step (`additional_config`), so requests arriving mid-block start sooner.

Regimes. Concurrency c keeps c requests in flight (closed loop: a finished request is
replaced at once) until `--requests` per level have finished. Offline mode drives
`LLM.llm_engine` step by step and time-stamps each request's first and last tokens; with
`--server`, each system is an OpenAI server and clients stream over HTTP (TTFT includes
HTTP and detokenization). Reported per system and level: output tokens/s (all requests),
per-request generation tokens/s (tokens / latency, mean), time to first token p50,
end-to-end latency p50/p99, and for diffusion, denoise passes per canvas (histogram) and per
output token. Output: a table, a PNG (tokens/s vs concurrency; passes per canvas), and one
JSON line last.

CPU example (tiny twins built on the fly):  python benchmarks/compare_ar.py --tiny
GPU example:  python benchmarks/compare_ar.py --diffusion-model google/diffusiongemma-26B-A4B-it
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULT_TAG = "RESULT_JSON "


def prompt_set(count: int, seed: int, vocab_words: list[str]) -> list[str]:
    """Seeded prompts with a realistic length spread (log-normal, median ~60 words)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 0.8, count), 4, 600).astype(int)
    return [" ".join(rng.choice(vocab_words, size=n)) for n in lengths]


def percentile(values, q):
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

    extra = {"max_denoising_steps": args.max_denoising_steps} if args.system != "ar" else None
    return SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, seed=index, extra_args=extra)


def _passes(llm, args) -> list[int]:
    return llm.collective_rpc("diffusion_stats")[0]["canvas_passes"] if args.system.startswith("plugin") else []


def run_offline(args, prompts: list[str]) -> dict:
    from tqdm import tqdm
    from vllm import LLM

    additional = {"passes_per_step": args.passes_per_step} if args.system.startswith("plugin-pps") else {}
    llm = LLM(model=args.model, max_model_len=args.max_model_len, max_num_seqs=max(args.levels),
              enforce_eager=args.enforce_eager, seed=0, additional_config=additional)
    llm.generate(prompts[:1], _params(args, 0), use_tqdm=False)  # warm-up
    engine, results = llm.llm_engine, {}
    for level in args.levels:
        before = len(_passes(llm, args))
        pending, live, records, issued = list(range(args.requests)), {}, [], 0
        start = time.perf_counter()
        with tqdm(total=args.requests, desc=f"{args.system} c={level}", file=sys.stderr) as bar:
            while pending or live:
                while pending and len(live) < level:
                    i = pending.pop(0)
                    engine.add_request(f"r{level}-{i}", prompts[i % len(prompts)], _params(args, i))
                    live[f"r{level}-{i}"] = {"start": time.perf_counter(), "ttft": None}
                    issued += 1
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
        results[level] = summarize(records, time.perf_counter() - start, _passes(llm, args)[before:])
    return results


def run_server(args, prompts: list[str]) -> dict:
    import requests

    from benchmarks.openai_server import OpenAIServer

    server = OpenAIServer(args.model, "--max-model-len", str(args.max_model_len), "--served-model-name", "m",
                          *(["--enforce-eager"] if args.enforce_eager else []),
                          *(["--additional-config", json.dumps({"passes_per_step": args.passes_per_step})]
                            if args.system.startswith("plugin-pps") else []))
    extra = {} if args.system == "ar" else {"vllm_xargs": {"max_denoising_steps": args.max_denoising_steps}}

    def one(i: int) -> dict:
        start = time.perf_counter()
        ttft, tokens = None, 0
        body = {"model": "m", "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens, "seed": i,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}
        with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=3600) as response:
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
        for level in args.levels:
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                records = list(pool.map(one, range(args.requests)))
            results[level] = summarize(records, time.perf_counter() - start, [])
        return results
    finally:
        server.stop()


def child_main(args) -> None:
    prompts = prompt_set(max(args.requests, 64), args.seed, _WORDS)
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


def run_system(system: str, model: str, args, env_extra: dict) -> dict:
    cmd = [sys.executable, __file__, "--system-worker", system, "--model", model,
           "--concurrency", args.concurrency, "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--max-denoising-steps", str(args.max_denoising_steps), "--max-model-len", str(args.max_model_len),
           "--seed", str(args.seed)] + (["--server"] if args.server else []) + \
          (["--enforce-eager"] if args.enforce_eager else []) + \
          (["--passes-per-step", str(args.passes_per_step)] if args.passes_per_step else [])
    env = {**os.environ, **env_extra, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{system} run failed (exit {proc.returncode}); see its stderr above")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system, levels in results.items():
        xs = sorted(int(c) for c in levels)
        left.plot(xs, [levels[str(c)]["output_tokens_per_s"] for c in xs], marker="o", label=system)
        passes = [p for c in xs for p in levels[str(c)]["passes_per_canvas"]]
        if passes:
            right.hist(passes, bins=range(1, max(passes) + 2), alpha=0.6, label=system)
    left.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    levels = sorted({int(c) for system in results.values() for c in system})
    left.set_xticks(levels, [str(c) for c in levels])
    left.minorticks_off()
    right.set(xlabel="denoise passes per canvas", ylabel="canvases", title="Passes to halt")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(results: dict) -> None:
    header = f"{'system':12} {'conc':>4} {'tok/s':>9} {'req tok/s':>9} {'TTFT p50':>9} {'lat p50':>8} " \
             f"{'lat p99':>8} {'pass/canvas':>11} {'pass/token':>10}"
    print(header)
    print("-" * len(header))
    for system, levels in results.items():
        for c in sorted(levels, key=int):
            r = levels[c]
            passes = r["passes_per_canvas"]
            per_canvas = f"{np.mean(passes):.1f}" if passes else "-"
            per_token = f"{r['passes_per_output_token']:.3f}" if r["passes_per_output_token"] else "-"
            print(f"{system:12} {c:>4} {r['output_tokens_per_s']:9.1f} {r['per_request_tokens_per_s']:9.1f} "
                  f"{r['ttft_p50_s']:9.3f} {r['latency_p50_s']:8.3f} {r['latency_p99_s']:8.3f} "
                  f"{per_canvas:>11} {per_token:>10}")


def parent_main(args) -> None:
    import torch

    info = machine_info()
    print("machine:", json.dumps(info))
    workdir = Path(args.out_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from diffusiongemma_vllm.tiny_checkpoint import TinySpec, build_ar_twin, build_tiny_checkpoint

        spec = TinySpec(canvas_length=256, sliding_window=128,
                        layer_types=("sliding_attention",) * 5 + ("full_attention",))
        args.diffusion_model = str(build_tiny_checkpoint(workdir / "tiny-diffusion", spec, seed=0))
        args.ar_model = str(build_ar_twin(workdir / "tiny-ar", spec, seed=0))
    systems = {"plugin": (args.diffusion_model, {}), "ar": (args.ar_model, {})}
    if args.passes_per_step:
        systems[f"plugin-pps{args.passes_per_step}"] = (args.diffusion_model, {})
    skipped = {}
    if args.include_in_tree:
        if torch.cuda.is_available():
            systems["in-tree"] = (args.diffusion_model, {"VLLM_PLUGINS": ""})
        else:
            skipped["in-tree"] = "vLLM's in-tree DiffusionGemma needs Model Runner V2, i.e. Triton on a GPU"
    results = {name: run_system(name, model, args, env) for name, (model, env) in systems.items()}
    print_table(results)
    png = workdir / "compare_ar.png"
    plot(results, png)
    levels = sorted(results["plugin"], key=int)
    ratios = {c: results["plugin"][c]["output_tokens_per_s"] / results["ar"][c]["output_tokens_per_s"] for c in levels}
    print("plugin / AR output tokens/s:", ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios.items()))
    print(json.dumps({"machine": info, "mode": "server" if args.server else "offline",
                      "settings": {k: getattr(args, k) for k in ("concurrency", "requests", "max_tokens",
                                                               "max_denoising_steps", "seed", "passes_per_step")},
                      "models": {name: model for name, (model, _) in systems.items()}, "skipped": skipped,
                      "results": results, "plugin_over_ar": ratios, "plot": str(png)}))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion-model", help="DiffusionGemma checkpoint (dir or HF id)")
    parser.add_argument("--ar-model", help="autoregressive Gemma 4 checkpoint of the same backbone")
    parser.add_argument("--tiny", action="store_true", help="build random tiny twins (CPU) instead of real models")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated in-flight request counts")
    parser.add_argument("--requests", type=int, default=64, help="requests finished per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=512, help="output tokens per request (EOS ignored)")
    parser.add_argument("--max-denoising-steps", type=int, default=16, help="diffusion pass cap per canvas")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="prompt-set and request seed")
    parser.add_argument("--server", action="store_true", help="measure through the OpenAI server (streaming)")
    parser.add_argument("--include-in-tree", action="store_true", help="also run vLLM's in-tree DiffusionGemma (GPU)")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs / compilation")
    parser.add_argument("--passes-per-step", type=int, help="also run the plugin with this passes_per_step")
    parser.add_argument("--out-dir", default=tempfile.gettempdir() + "/compare_ar", help="PNG and tiny models go here")
    parser.add_argument("--system-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.system = args.system_worker
    if not args.system_worker and not args.tiny and not (args.diffusion_model and args.ar_model):
        parser.error("give --diffusion-model and --ar-model, or --tiny")
    return args


if __name__ == "__main__":
    parsed = parse_args()
    child_main(parsed) if parsed.system_worker else parent_main(parsed)
