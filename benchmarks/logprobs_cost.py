"""What logprobs cost the denoise loop, measured beside the pass they add to.

Logprobs are computed once per finished canvas (kernels/top_logprobs.py), from the halting
pass's hidden states, which every pass now keeps in the canvas state (one [n, C, H] select
per pass, paid whether or not a request asks). This script times, at 1 and 64 canvases of
256 positions, in one process:
- `sampler`: one pass's sampler statistics (vocab-tiled, with the self-conditioning signal),
  the vocabulary-wide part of every pass;
- `keep_hidden`: the per-pass select that keeps the hidden states;
- `logprobs`: top-k logprobs of every position, once per canvas;
and prints each as a ratio to the sampler pass, then the logprobs cost per canvas relative to
a canvas's sampler work over `--passes` passes. Stand-in shapes (CPU): random hidden states
and embedding, vocabulary `--vocab`, width `--hidden`; the model's layers are not included,
so the ratios overstate the share of a real pass (which also runs 30 layers). On a GPU
(`--device cuda --vocab 262144 --hidden 2816 --dtype bfloat16`: the release's shapes) the
sampler is the GEMM sampler the plugin uses there.

    .venv/bin/python benchmarks/logprobs_cost.py [--canvases 1,64] [--vocab 8192] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from diffusiongemma_vllm.denoise.loop import row_stats_for
from diffusiongemma_vllm.kernels.top_logprobs import top_logprobs


def seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(canvases: int, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = 256 * canvases
    hidden = torch.randn(rows, args.hidden, generator=gen).to(device, dtype)
    embedding = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5).to(device, dtype)
    temperature, keys = torch.full((rows,), 0.7, device=device), torch.arange(rows, device=device)
    live = torch.ones(canvases, dtype=torch.bool, device=device)
    state = torch.zeros(canvases, 256, args.hidden, device=device, dtype=dtype)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    repeats = max(1, 8 // canvases) if device.type == "cpu" else 10
    row_stats = row_stats_for(device)
    sampler = seconds(lambda: row_stats(hidden, embedding, 30.0, temperature, keys, True), repeats, device)
    keep = seconds(lambda: state.copy_(torch.where(live[:, None, None], hidden.view(state.shape), state)), 20, device)
    logprobs = seconds(lambda: top_logprobs(hidden, embedding, 30.0, tokens, args.top_k), repeats, device)
    return {"canvases": canvases, "sampler_s": sampler, "keep_hidden_s": keep, "logprobs_s": logprobs,
            "keep_hidden_per_sampler_pass": keep / sampler, "logprobs_per_sampler_pass": logprobs / sampler,
            "logprobs_per_canvas_sampler_work": logprobs / (sampler * args.passes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvases", default="1,64", help="comma-separated canvas counts")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--passes", type=int, default=16, help="passes per canvas the logprobs amortise over")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    results = [measure(int(c), args) for c in args.canvases.split(",")]
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"stand-in inputs on {where}: vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, top-{args.top_k}")
    print(f"{'canvases':>8} {'sampler ms':>11} {'keep ms':>8} {'logprobs ms':>12} {'keep/pass':>10} "
          f"{'logprobs/pass':>14} {'logprobs/canvas work':>21}")
    for r in results:
        print(f"{r['canvases']:>8} {r['sampler_s'] * 1e3:>11.1f} {r['keep_hidden_s'] * 1e3:>8.2f} "
              f"{r['logprobs_s'] * 1e3:>12.1f} {r['keep_hidden_per_sampler_pass']:>10.4f} "
              f"{r['logprobs_per_sampler_pass']:>14.3f} {r['logprobs_per_canvas_sampler_work']:>21.4f}")
    print(json.dumps({"benchmark": "logprobs_cost", "device": where, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden,
                      "top_k": args.top_k, "passes": args.passes, "results": results}))


if __name__ == "__main__":
    main()
