"""Stage c_release of gpu_e2e.py: the release shapes inside vLLM, with random weights.

The config.json of google/diffusiongemma-26B-A4B-it (tiny_checkpoint.write_release_config),
`load_format="dummy"`, bf16, max_model_len 8192, 64 sequences and 16384 batched tokens (64
canvases per denoise pass): the engine starts (its log gives the split into weights, vLLM's
capture and the denoise graph ladder; gpu_e2e.startup_split), then one 512-token request, then
64 concurrent ones, 16 passes per canvas (random weights never halt early), then one denoise
pass profiled in the engine at 1 and 64 canvases (`pass_profile`: time, launch gaps, over the
bandwidth floor; issue 14's per-pass goals). Device memory is sampled all along (NVML, no
CUDA context in this process) and compared with what vLLM planned: a denoise at 64 canvases
must fit what its profiling reserved, without OOM.

Stage c_compile runs the same with the layer stack under vLLM's torch.compile (compilation
mode VLLM_COMPILE: Inductor's fusions between attention calls, vLLM's piecewise CUDA graphs for
the commit passes) and reports its figures over c_release's from the same run: the
torch.compile lever of issue 14, measured before and after.

On CPU the same body runs at tiny sizes (8 requests), to check the stage, not the numbers.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.compare_ar import canvas_passes
from benchmarks.gpu_e2e import Checks, Settings, ratios_over, stage_main

CANVAS_LENGTH = 256  # the release's, and the CPU stand-in's
GPU = dict(concurrency=64, max_tokens=512, steps=16, max_model_len=8192, max_num_batched_tokens=16384,
           gpu_memory_utilization=0.9)
CPU = dict(concurrency=8, max_tokens=512, steps=3, max_model_len=2048, max_num_batched_tokens=2048)


class MemorySampler:
    """Peak device memory in use (all processes) while the engine runs, from NVML (no CUDA
    context here) or else nvidia-smi; RSS of this process tree on CPU. A reader that fails
    leaves the peak unknown, never the stage."""

    def __init__(self, cpu: bool, period_s: float = 0.25):
        self.period_s, self.peak, self.samples, self.total, self.source = period_s, 0, 0, None, None
        for source, make in ((("rss", self._rss),) if cpu else (("nvml", self._nvml), ("nvidia-smi", self._smi))):
            try:
                self.read = make()
                self.peak, self.source = self.read(), source
                break
            except Exception as e:  # noqa: BLE001
                print(f"memory sampler: {source} unavailable: {e!r}", flush=True)
        self.stop = threading.Event()
        if self.source:
            threading.Thread(target=self._run, daemon=True).start()

    def _nvml(self):
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-")) \
            else pynvml.nvmlDeviceGetHandleByIndex(int(visible or 0))
        self.total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used

    def _smi(self):
        def query(field: str) -> int:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return int(out.split()[0]) * 2**20

        self.total = query("memory.total")
        return lambda: query("memory.used")

    @staticmethod
    def _rss():
        import psutil

        me = psutil.Process()
        return lambda: sum(p.memory_info().rss for p in [me, *me.children(recursive=True)] if p.is_running())

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.read())
                self.samples += 1
            except Exception:  # noqa: BLE001 - a process that ended between listing and reading
                pass
            time.sleep(self.period_s)

    def gib(self) -> dict:
        out = {"peak_used_gib": round(self.peak / 2**30, 2), "samples": self.samples, "source": self.source}
        if self.total:
            out["total_gib"] = round(self.total / 2**30, 2)
        return out


def release_model(settings: Settings, steps: int) -> str:
    from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_SPEC, TinySpec, write_release_config

    spec = RELEASE_SPEC if not settings.cpu else TinySpec(
        canvas_length=CANVAS_LENGTH, sliding_window=128, layer_types=("sliding_attention",) * 5 + ("full_attention",))
    out = Path(settings.work) / ("release_diffusion" if not settings.cpu else "release_structure_tiny")
    if not (out / "config.json").exists():
        write_release_config(out, replace(spec, generation={"max_denoising_steps": steps}))
    return str(out)


def release_stage(checks: Checks, settings: Settings, compiled: bool = False) -> None:
    """`compiled`: the layer stack under vLLM's torch.compile (mode VLLM_COMPILE), compared
    with c_release's numbers from the same run's summary."""
    from vllm import LLM, SamplingParams

    size = CPU if settings.cpu else GPU
    model = release_model(settings, size["steps"])
    memory = MemorySampler(settings.cpu)
    args = dict(model=model, load_format="dummy", dtype=settings.dtype, max_model_len=size["max_model_len"],
                max_num_seqs=size["concurrency"], max_num_batched_tokens=size["max_num_batched_tokens"], seed=0,
                enforce_eager=settings.cpu and not compiled)
    if compiled:
        args["compilation_config"] = {"mode": 3}  # CompilationMode.VLLM_COMPILE
    if not settings.cpu:
        args["gpu_memory_utilization"] = size["gpu_memory_utilization"]
    if settings.attention_backend:
        args["attention_backend"] = settings.attention_backend
    start = time.time()
    llm = LLM(**args)
    checks.measure("engine", {**{k: v for k, v in args.items() if k != "model"}, "init_s": round(time.time() - start, 1),
                              "memory_after_start": memory.gib()})

    def run(count: int, tokens: int, steps: int) -> dict:
        sampling = [SamplingParams(max_tokens=tokens, ignore_eos=True, seed=i, extra_args={"max_denoising_steps": steps})
                    for i in range(count)]
        prompts = [f"Request {i}: write a long story about the sea and the mountains." for i in range(count)]
        start = time.time()
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.time() - start
        produced = [len(o.outputs[0].token_ids) for o in outs]
        return {"requests": count, "s": round(seconds, 2), "tokens": sum(produced),
                "tok_s": round(sum(produced) / seconds, 1), "all_complete": produced == [tokens] * count,
                "distinct_tokens_first": len(set(outs[0].outputs[0].token_ids))}

    checks.measure("warmup", run(1, 256, 2))
    single = run(1, size["max_tokens"], size["steps"])
    checks.measure("c1", single)
    # Dummy weights whose residual collapsed (testing/dummy_weights.py) commit one id everywhere,
    # and their MoE reads 8 experts per layer: the timings would not be the release's.
    checks.check("random_weights_not_collapsed", single["distinct_tokens_first"] > 16, single)
    full = run(size["concurrency"], size["max_tokens"], size["steps"])
    checks.measure("c_max", full)
    checks.check("all_concurrent_requests_complete", full["all_complete"], full)
    stats = llm.collective_rpc("diffusion_stats")[0]
    passes = canvas_passes(stats)
    checks.measure("diffusion_stats", {**stats, "canvas_passes": {p: passes.count(p) for p in sorted(set(passes))}})
    checks.check("largest_pass_is_every_canvas", stats["largest_pass"] == size["concurrency"], stats["largest_pass"])
    cap = size["steps"]  # every canvas but the warm-up's (2 passes) runs to the cap
    checks.check("random_weights_run_the_pass_cap", passes.count(cap) == len(passes) - 1, sorted(set(passes)))
    try:  # last: torch's profiler over CUDA graphs is new ground here, and must not cost the rest
        per_pass = pass_profile(checks, llm, size, single)
    except Exception as error:  # noqa: BLE001 - recorded; the memory and headline still come
        per_pass = {"pass_profile_error": f"{type(error).__name__}: {error}"[:2000]}
    memory.stop.set()
    used = memory.gib()
    checks.measure("memory", used)
    if used.get("total_gib") and used["samples"]:
        checks.check("peak_within_device", used["peak_used_gib"] < 0.99 * used["total_gib"], used)
    headline = {"init_s": checks.data["engine"]["init_s"], "c1_tok_s": single["tok_s"],
                f"c{size['concurrency']}_tok_s": full["tok_s"], "largest_pass": stats["largest_pass"], **used,
                **per_pass}
    if compiled:
        headline["over_c_release"] = ratios_over(settings, "c_release", headline, ("tok_s", "init_s", "_ms"))
    checks.measure("headline", headline)


def pass_profile(checks: Checks, llm, size: dict, single: dict) -> dict:
    """One denoise pass at 1 canvas and at the most a pass holds, timed in the engine
    (engine/pass_profile.py), against issue 14's per-pass goals: within 1.3x of the bandwidth
    floor at 1 canvas, under 0.5 ms of launch gaps per pass with graphs; the fused kernels'
    lever, the pass at 1 canvas with them off over on (each captured afresh; under
    torch.compile only the router's kernel is switched, the other fusions being Inductor's
    there); and the c1 run's wall time per denoise pass (its prefill and commit passes
    included), whose excess over the pass is the host's share."""
    runs = {"c1": (1, None), f"c{size['concurrency']}": (size["concurrency"], None),
            "c1_fused": (1, True), "c1_unfused": (1, False)}
    profiles = {}
    for name, (canvases, fused_kernels) in runs.items():  # recorded one by one: a crash keeps the rest
        profiles[name] = llm.collective_rpc("profile_denoise_pass",
                                            kwargs={"canvases": canvases, "fused_kernels": fused_kernels})[0]
        checks.measure("pass_profile", profiles)
    one, most = profiles["c1"], profiles[f"c{size['concurrency']}"]
    fused, unfused = profiles["c1_fused"], profiles["c1_unfused"]
    canvases = -(-size["max_tokens"] // CANVAS_LENGTH)
    served = single["s"] * 1e3 / (canvases * size["steps"])
    headline = {"pass_c1_ms": one["pass_ms"], f"pass_c{size['concurrency']}_ms": most["pass_ms"],
                "gaps_c1_ms": one["gaps_ms"], "activities_c1": one["activities"],
                "served_per_pass_c1_ms": served, "weight_bytes": one["weight_bytes"],
                "over_floor_copy_c1": one.get("over_floor_copy"), "over_floor_spec_c1": one.get("over_floor_spec"),
                "fused_kernels_c1": {"unfused_over_fused_pass": unfused["pass_ms"] / fused["pass_ms"],
                                     "activities_fused": fused["activities"],
                                     "activities_unfused": unfused["activities"]}}
    goals = {"pass within 1.3x of the spec floor at 1 canvas": (one.get("over_floor_spec"), 1.3),
             "launch gaps under 0.5 ms per pass": (one["gaps_ms"], 0.5)}
    headline["goals"] = {name: {"value": value, "goal": goal, "met": None if value is None else value <= goal}
                         for name, (value, goal) in goals.items()}
    return headline


BODIES = {"c_release": release_stage, "c_compile": functools.partial(release_stage, compiled=True)}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage_main(BODIES)
