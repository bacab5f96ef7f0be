"""Time to first token of requests that arrive while others are mid-block, by passes_per_step.

Without `passes_per_step` a scheduler step denoises every ready canvas to its halt, so a
request that arrives meanwhile waits for the whole step before its prompt is even prefilled.
With it, a step stops after that many passes and the canvases resume in the next step
(engine/worker_step.py, scheduler.py), so the new prompt joins within a few passes. This script
measures both in one run, on the same engine settings and requests:
- background: `--background` requests of `--background-tokens` tokens each, started together;
- probes: `--probes` one-canvas requests, the i-th arriving `i * --interval` seconds after the
  background starts (open loop: its TTFT counts from that moment, whatever the engine is doing).
Reported per setting: probe TTFT p50 and max, background output tokens/s, and each setting's
ratios against whole-canvas steps (the first row). Ends with one JSON line.

CPU example (tiny random checkpoint):  python benchmarks/arrival_latency.py --tiny
GPU example:  python benchmarks/arrival_latency.py --model google/diffusiongemma-26B-A4B-it
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def run_setting(args, passes_per_step: int | None) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.background + args.probes,
              enforce_eager=args.enforce_eager, seed=0,
              additional_config={"passes_per_step": passes_per_step} if passes_per_step else {})
    knobs = {"max_denoising_steps": args.max_denoising_steps}
    llm.generate(["warm up"], SamplingParams(max_tokens=8, seed=0, extra_args=knobs), use_tqdm=False)
    engine = llm.llm_engine
    words = "the model writes a long essay about rivers cities music and light".split()
    for i in range(args.background):
        engine.add_request(f"bg{i}", " ".join(words[: 3 + i % 8]),
                           SamplingParams(max_tokens=args.background_tokens, ignore_eos=True, seed=i, extra_args=knobs))
    start = time.perf_counter()
    arrivals = {f"probe{i}": start + (i + 1) * args.interval for i in range(args.probes)}
    added, ttft, background, background_done = set(), {}, {f"bg{i}" for i in range(args.background)}, None
    while len(ttft) < args.probes or background:
        now = time.perf_counter()
        for rid, at in arrivals.items():
            if rid not in added and now >= at:
                engine.add_request(rid, " ".join(words[: 2 + len(added)]),
                                   SamplingParams(max_tokens=args.probe_tokens, ignore_eos=True,
                                                  seed=100 + len(added), extra_args=knobs))
                added.add(rid)
        if not engine.has_unfinished_requests():
            time.sleep(0.001)  # idle until the next probe arrives
        for out in engine.step():
            if out.request_id in arrivals and out.request_id not in ttft and out.outputs[0].token_ids:
                ttft[out.request_id] = time.perf_counter() - arrivals[out.request_id]
            if out.request_id in background and out.finished:
                background.discard(out.request_id)
                background_done = time.perf_counter()
    stats = llm.collective_rpc("diffusion_stats")[0]
    del llm
    gc.collect()
    values = list(ttft.values())
    return {"passes_per_step": passes_per_step, "probe_ttft_p50_s": float(np.median(values)),
            "probe_ttft_max_s": float(max(values)),
            "background_tokens_per_s": args.background * args.background_tokens / (background_done - start),
            "passes_per_scheduler_step": stats["passes_per_step"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="DiffusionGemma checkpoint (dir or HF id)")
    parser.add_argument("--tiny", action="store_true", help="build a random tiny checkpoint (CPU)")
    parser.add_argument("--settings", default="0,4,8", help="passes_per_step values; 0 = whole canvases per step")
    parser.add_argument("--background", type=int, default=4)
    parser.add_argument("--background-tokens", type=int, default=2048)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--probe-tokens", type=int, default=256)
    parser.add_argument("--interval", type=float, default=0.7, help="seconds between probe arrivals")
    parser.add_argument("--max-denoising-steps", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out-dir", default=tempfile.gettempdir() + "/arrival_latency")
    args = parser.parse_args(argv)
    if args.tiny:
        from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

        spec = TinySpec(canvas_length=256, sliding_window=128,
                        layer_types=("sliding_attention",) * 5 + ("full_attention",))
        args.model = str(build_tiny_checkpoint(Path(args.out_dir) / "tiny-diffusion", spec, seed=0))
    elif not args.model:
        parser.error("give --model or --tiny")
    rows = [run_setting(args, int(s) or None) for s in args.settings.split(",")]
    base = rows[0]
    print(f"{'passes/step':>11} {'probe TTFT p50':>14} {'max':>7} {'bg tok/s':>9} {'TTFT x':>7} {'tok/s x':>7}")
    for row in rows:
        row["ttft_p50_ratio"] = row["probe_ttft_p50_s"] / base["probe_ttft_p50_s"]
        row["background_tokens_per_s_ratio"] = row["background_tokens_per_s"] / base["background_tokens_per_s"]
        print(f"{row['passes_per_step'] or 'whole':>11} {row['probe_ttft_p50_s']:14.3f} {row['probe_ttft_max_s']:7.3f} "
              f"{row['background_tokens_per_s']:9.1f} {row['ttft_p50_ratio']:7.2f} "
              f"{row['background_tokens_per_s_ratio']:7.2f}")
    print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "tiny"}, "rows": rows}))


if __name__ == "__main__":
    main()
