"""Tune vLLM's fused-MoE Triton kernel for DiffusionGemma's experts on this GPU (issue 14).

vLLM runs the experts with one Triton kernel whose tiles it looks up, per token count M, in a
JSON file named for the layer and the card (`E=128,N=704,device_name=NVIDIA_H200.json`, N the
expert width per rank): in `VLLM_TUNED_CONFIG_FOLDER` first, then among its own files. vLLM
0.32 ships none for the release's experts in bf16, and none at all for them on an H200, so it
logs "Using default MoE config" and takes tiles from a size heuristic. This script measures
better ones:

- token counts (`BATCH_SIZES`): a denoise pass runs the experts at M = 256 x canvases (256 to
  16384), a commit at 256 per canvas, a resumed step at one token per waiting request;
- candidates: vLLM's default tiles for each M (the baseline), then the tiles that vLLM's own
  tuned files for layers with as many experts on Hopper chose at the grid point nearest each M,
  the most often chosen first, taken round-robin over the token counts (`--per-m` per M);
- cost: the tiles are the kernel's compile-time constants, so each candidate compiles once
  and is timed at every M. Compiling dominates; `--budget-s` stops the search between
  candidates, keeping the best found so far;
- timing: a CUDA graph of `--reps` calls of vLLM's `fused_experts` with the tiles forced
  (vLLM's `override_config`), median of 3 replays, on random tokens routed uniformly;
- check: a candidate's output must match the baseline's to within the dtype's rounding; one
  that does not (or fails to compile) is dropped and reported.

Output: vLLM's JSON in `--out` and a table of each M's default time, best time and their
ratio, both measured in this process, then one JSON line. Serve with the result:
`VLLM_TUNED_CONFIG_FOLDER=DIR vllm serve MODEL`. Also stage c_moe_tune of gpu_e2e.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BATCH_SIZES = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DTYPES = ("bf16", "fp8_w8a8")
TOLERANCE = {"bf16": 2e-2, "fp8_w8a8": 6e-2}  # max |out - baseline| over max |baseline|
HOPPER = ("NVIDIA_H100", "NVIDIA_H200", "NVIDIA_H20", "NVIDIA_H800")


@dataclass(frozen=True)
class ExpertShape:
    experts: int
    hidden: int  # K of the first GEMM
    width: int  # the expert's intermediate size on one rank: vLLM's N
    top_k: int

    @classmethod
    def of_model(cls, model: str | None, tensor_parallel_size: int = 1) -> "ExpertShape":
        """The experts of `model`'s config.json (a directory), else the release's."""
        if model:
            config = json.loads((Path(model) / "config.json").read_text())
        else:
            from diffusiongemma_vllm.testing.tiny_checkpoint import release_checkpoint_config

            config = release_checkpoint_config()
        text = config.get("text_config", config)
        width = text["moe_intermediate_size"]
        if width % tensor_parallel_size:
            raise SystemExit(f"moe_intermediate_size {width} does not split over {tensor_parallel_size} ranks")
        return cls(text["num_experts"], text["hidden_size"], width // tensor_parallel_size, text["top_k_experts"])


def tile_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def vllm_tuned_files(experts: int, dtype: str, folder: str | None = None) -> list[dict[int, dict]]:
    """vLLM's shipped tunings for layers with `experts` experts on Hopper cards, of `dtype`
    (bf16 files carry no dtype in their name), without block-quantized ones: {M: tiles} each."""
    if folder is None:
        from vllm.model_executor.layers.fused_moe import fused_moe

        folder = os.path.join(os.path.dirname(fused_moe.__file__), "configs")
    tunings = []
    for path in sorted(glob.glob(os.path.join(folder, f"E={experts},N=*,device_name=*.json"))):
        name = os.path.basename(path)[:-len(".json")]
        if "block_shape=" in name:  # its list holds a comma
            continue
        fields = dict(part.split("=", 1) for part in name.split(","))
        if not fields["device_name"].startswith(HOPPER):
            continue
        if fields.get("dtype", "bf16") != dtype:
            continue
        table = json.loads(Path(path).read_text())
        table.pop("triton_version", None)
        tunings.append({int(m): tiles for m, tiles in table.items()})
    return tunings


def candidates(tunings: list[dict[int, dict]], batch_sizes, per_m: int) -> list[dict]:
    """Tiles the tunings chose at the grid point nearest each M, most often first per M,
    interleaved over the token counts so that a budget cut leaves every M some candidates."""
    ranked = []
    for m in batch_sizes:
        counts = collections.Counter(tile_key(table[min(table, key=lambda grid: abs(grid - m))]) for table in tunings)
        ranked.append([key for key, _ in counts.most_common(per_m)])
    ordered, seen = [], set()
    for rank in range(per_m):
        for per_size in ranked:
            if rank < len(per_size) and per_size[rank] not in seen:
                seen.add(per_size[rank])
                ordered.append(dict(per_size[rank]))
    return ordered


@dataclass
class Search:
    """Per M: the baseline's time and the best tiles with their time; what was dropped."""

    baseline_ms: dict
    best: dict  # M -> (ms, tiles)
    tried: int = 0
    dropped: list = field(default_factory=list)  # {"tiles", "reason"} of candidates left out
    stopped_by_budget: bool = False

    def table(self) -> dict[int, dict]:
        return {m: self.best[m][1] for m in sorted(self.best)}

    def rows(self) -> list[dict]:
        return [{"m": m, "default_ms": round(self.baseline_ms[m], 4), "best_ms": round(self.best[m][0], 4),
                 "default_over_best": round(self.baseline_ms[m] / self.best[m][0], 3), "tiles": self.best[m][1]}
                for m in sorted(self.best)]


def search(batch_sizes, default_tiles: Callable[[int], dict], pool: list[dict],
           measure: Callable[[dict, int], tuple[float, float]], tolerance: float, budget_s: float,
           clock: Callable[[], float] = time.monotonic) -> Search:
    """Time vLLM's default tiles at every M, then each candidate of `pool` at every M until
    `budget_s` has passed. `measure(tiles, m)` returns (milliseconds, error of its output
    against the default tiles' output at m); it raises for tiles that do not compile or run."""
    start = clock()
    baseline = {m: measure(default_tiles(m), m)[0] for m in batch_sizes}
    result = Search(baseline_ms=baseline, best={m: (baseline[m], default_tiles(m)) for m in batch_sizes})
    for tiles in pool:
        if clock() - start > budget_s:
            result.stopped_by_budget = True
            break
        result.tried += 1
        try:
            timed = {m: measure(tiles, m) for m in batch_sizes}
        except Exception as error:  # noqa: BLE001 - a tile shape that does not compile or fit is skipped
            result.dropped.append({"tiles": tiles, "reason": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        worst = max(error for _, error in timed.values())
        if worst > tolerance:
            result.dropped.append({"tiles": tiles, "reason": f"output differs from the default tiles' by {worst:.3g}"})
            continue
        for m, (ms, _) in timed.items():
            if ms < result.best[m][0]:
                result.best[m] = (ms, tiles)
    return result


def write_vllm_json(table: dict[int, dict], folder: str, file_name: str, triton_version: str) -> Path:
    """The table as vLLM's get_moe_configs reads it: {"triton_version": ..., "M": tiles}."""
    path = Path(folder) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"triton_version": triton_version, **{str(m): table[m] for m in sorted(table)}},
                               indent=4) + "\n")
    return path


class ExpertsProblem:
    """Random experts of `shape` on the GPU and vLLM's fused_experts over the first m tokens
    of a routed batch, timed as a CUDA graph of `reps` calls."""

    def __init__(self, shape: ExpertShape, dtype: str, max_m: int, reps: int, seed: int = 0):
        import torch
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

        self.torch, self.reps, self.dtype = torch, reps, dtype
        generator = torch.Generator(device="cuda").manual_seed(seed)
        randn = lambda *size: torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=generator)  # noqa: E731
        e, k, n = shape.experts, shape.hidden, shape.width
        self.x = randn(max_m, k)
        w1, w2 = randn(e, 2 * n, k) / k ** 0.5, randn(e, k, n) / n ** 0.5
        scores = torch.rand(max_m, e, device="cuda", generator=generator)
        weights, self.topk_ids = torch.topk(scores, shape.top_k, dim=-1)
        self.topk_weights = (weights / weights.sum(-1, keepdim=True)).float()
        self.topk_ids = self.topk_ids.to(torch.int32)
        self.quant_config = None
        if dtype == "fp8_w8a8":  # vLLM's online FP8: per-tensor scales per expert, dynamic activations
            fp8 = torch.float8_e4m3fn
            s1 = w1.abs().amax(dim=(1, 2)).float() / torch.finfo(fp8).max
            s2 = w2.abs().amax(dim=(1, 2)).float() / torch.finfo(fp8).max
            w1, w2 = (w1 / s1[:, None, None]).to(fp8), (w2 / s2[:, None, None]).to(fp8)
            self.quant_config = fp8_w8a8_moe_quant_config(w1_scale=s1, w2_scale=s2)
        self.w1, self.w2, self.activation = w1, w2, MoEActivation.GELU_TANH
        self.reference: dict[int, object] = {}

    def _call(self, m: int):
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        return fused_experts(self.x[:m], self.w1, self.w2, self.topk_weights[:m], self.topk_ids[:m],
                             activation=self.activation, quant_config=self.quant_config)

    def measure(self, tiles: dict, m: int) -> tuple[float, float]:
        torch = self.torch
        from vllm.model_executor.layers.fused_moe import override_config

        with override_config(tiles):
            out = self._call(m)  # compiles the tiles' kernels outside the capture
            torch.cuda.synchronize()
            # The first tiles timed at m are the default's (search); a copy, as vLLM may reuse its buffers.
            reference = self.reference.setdefault(m, out.clone())
            error = ((out.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-6))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.reps):
                    self._call(m)
        graph.replay()
        times = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / self.reps)
        del graph
        return statistics.median(times), float(error)


def tune(shape: ExpertShape, dtype: str, batch_sizes, per_m: int, budget_s: float, reps: int, out: str | None) -> dict:
    """Search on this GPU; write vLLM's JSON to `out`; the report as a dict."""
    import torch
    import triton
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name, get_default_config

    if not torch.cuda.is_available():
        raise SystemExit("tune_moe needs a CUDA GPU (vLLM's fused-MoE kernel)")
    config_dtype = None if dtype == "bf16" else dtype
    pool = candidates(vllm_tuned_files(shape.experts, dtype), batch_sizes, per_m)
    problem = ExpertsProblem(shape, dtype, max(batch_sizes), reps)
    default = lambda m: get_default_config(m, shape.experts, shape.width, shape.hidden, shape.top_k,  # noqa: E731
                                           config_dtype)
    found = search(batch_sizes, default, pool, problem.measure, TOLERANCE[dtype], budget_s)
    file_name = get_config_file_name(shape.experts, shape.width, config_dtype)
    report = {"device": torch.cuda.get_device_name(), "dtype": dtype, "shape": shape.__dict__, "file": file_name,
              "candidates": len(pool), "tried": found.tried, "stopped_by_budget": found.stopped_by_budget,
              "dropped": found.dropped, "rows": found.rows()}
    if out:
        report["written"] = str(write_vllm_json(found.table(), out, file_name, triton.__version__))
    return report


def print_report(report: dict) -> None:
    print(f"{report['device']} {report['dtype']} {report['file']}: {report['tried']} of {report['candidates']} "
          f"candidates tried{' (budget)' if report['stopped_by_budget'] else ''}, {len(report['dropped'])} dropped")
    print(f"{'M':>6} {'default ms':>11} {'best ms':>9} {'ratio':>6}  tiles")
    for row in report["rows"]:
        tiles = row["tiles"]
        print(f"{row['m']:>6} {row['default_ms']:>11.4f} {row['best_ms']:>9.4f} {row['default_over_best']:>6.2f}  "
              f"M{tiles['BLOCK_SIZE_M']} N{tiles['BLOCK_SIZE_N']} K{tiles['BLOCK_SIZE_K']} G{tiles['GROUP_SIZE_M']} "
              f"w{tiles.get('num_warps', '-')} s{tiles.get('num_stages', '-')}")


def tune_stage(checks, settings) -> None:
    """gpu_e2e stage c_moe_tune: the release's experts in bf16, then FP8, within the stage's
    time; vLLM's JSON files land in OUT/moe_configs."""
    stage_s = float(os.environ.get("E2E_STAGE_TIMEOUT_S", 300))
    shape = ExpertShape.of_model(None)
    for dtype, share in (("bf16", 0.5), ("fp8_w8a8", 0.3)):  # the rest: allocation, reference runs, margin
        report = tune(shape, dtype, BATCH_SIZES, per_m=6, budget_s=share * stage_s, reps=10,
                      out=str(Path(settings.out) / "moe_configs"))
        print_report(report)
        checks.measure(dtype, report)
        checks.check(f"{dtype}: at least one candidate beyond the default ran",
                     report["tried"] > len(report["dropped"]), {"tried": report["tried"], "dropped": report["dropped"]})
    checks.measure("headline", {dtype: {row["m"]: row["default_over_best"] for row in checks.data[dtype]["rows"]}
                                for dtype in DTYPES if dtype in checks.data})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint directory whose config.json gives the experts (default: the release)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="each rank's experts are this much narrower")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="fp8_w8a8: vLLM's online FP8 (--quantization fp8)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="token counts M to tune")
    parser.add_argument("--per-m", type=int, default=8, help="candidates taken from vLLM's tunings per M")
    parser.add_argument("--budget-s", type=float, default=300, help="stop starting new candidates after this")
    parser.add_argument("--reps", type=int, default=10, help="calls per timed CUDA graph")
    parser.add_argument("--out", default="moe_configs", help="folder for vLLM's JSON (VLLM_TUNED_CONFIG_FOLDER)")
    args = parser.parse_args(argv)
    shape = ExpertShape.of_model(args.model, args.tensor_parallel_size)
    report = tune(shape, args.dtype, [int(m) for m in args.batch_sizes.split(",")], args.per_m, args.budget_s,
                  args.reps, args.out)
    print_report(report)
    print(json.dumps(report, default=str))
    return 0


BODIES = {"c_moe_tune": tune_stage}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in BODIES:  # run by gpu_e2e.py
        from benchmarks.gpu_e2e import stage_main

        stage_main(BODIES)
    sys.exit(main())
