"""Stages d_* of gpu_e2e.py: benchmarks/compare_ar.py at the release shapes, one system per stage.

`d_<mode>_<system>` runs compare_ar.py for one system (plugin, ar, in-tree; offline or
--server) with random weights in the release's config (`--release-shapes`), 512-token
outputs at concurrency 1, 4, 16, 64 and 16 passes per canvas; `d_offline_plugin-s<N>` the
plugin at N passes. Each writes its JSON under WORK/bench, so a system that dies or times out
costs only its own stage, and runs of several device calls on one warm machine add up;
`d_report` merges every JSON there into one table per mode with issue 11's goal ratios
(compare_report.py). A copy goes to OUT/bench: runs of several sessions merge on any machine
with `python benchmarks/compare_report.py .../bench/d_*.json`. On CPU the same runs use
compare_ar's tiny twins and tiny sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_e2e import ROOT, STAGES, Checks, Settings, stage_main

GPU_ENGINE_ARGS = {"gpu_memory_utilization": 0.9, "max_num_batched_tokens": 16384}  # 64 canvases per pass


def bench_dir(settings: Settings) -> Path:
    path = Path(settings.work) / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_script(args: list[str], script: str = "compare_ar.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=str(ROOT),
                          stdout=subprocess.PIPE, text=True)


def bench_stage(checks: Checks, settings: Settings) -> None:
    name = checks.data["stage"]  # d_<mode>_<system>
    _, mode, system = name.split("_", 2)
    bench = settings.bench
    out = bench_dir(settings) / f"{name}.json"
    if system.startswith("plugin-s"):
        selection = ["--systems", "", "--extra-steps", system[len("plugin-s"):]]
    else:
        selection = ["--systems", system]
    args = [*selection, "--concurrency", bench["concurrency"], "--requests", bench["requests"],
            "--max-tokens", str(bench["max_tokens"]), "--max-denoising-steps", str(bench["steps"]),
            "--out-dir", str(bench_dir(settings)), "--results-json", str(out)]
    if bench["release"]:
        args += ["--release-shapes", "--max-model-len", "8192", "--engine-args", json.dumps(GPU_ENGINE_ARGS),
                 "--startup-timeout", "480"]
        if settings.attention_backend:
            args += ["--attention-backend", settings.attention_backend]
    else:
        args += ["--tiny", "--enforce-eager", "--max-model-len", "2048"]
    if mode == "server":
        args.append("--server")
    checks.measure("command", "compare_ar.py " + " ".join(args))
    proc = run_script(args)
    print(proc.stdout, flush=True)
    if not out.exists():
        checks.check("compare_ar_finished", False, f"exit {proc.returncode}, no {out.name}")
        return
    data = json.loads(out.read_text())
    sent = Path(settings.out) / "bench"  # comes back with the call: merge sessions with compare_report.py
    sent.mkdir(parents=True, exist_ok=True)
    (sent / out.name).write_text(out.read_text())
    checks.measure("compare_ar", data)
    label = next(iter(data["models"]), system)
    levels = data["results"].get(label, {})
    checks.check("every_level_measured", not data["failures"] and len(levels) == len(bench["concurrency"].split(",")),
                 data["failures"] or sorted(levels, key=int))
    checks.measure("headline", {f"c={c}": round(r["output_tokens_per_s"], 1) for c, r in sorted(
        levels.items(), key=lambda kv: int(kv[0]))} | {"system": label, "mode": mode})


def report_stage(checks: Checks, settings: Settings) -> None:
    files = sorted(str(p) for p in bench_dir(settings).glob("d_*.json"))
    if not files:
        checks.measure("skipped", "no d_* results in WORK/bench")
        return
    out = bench_dir(settings) / "report.json"
    proc = run_script([*files, "--results-json", str(out), "--out-dir", settings.out], script="compare_report.py")
    print(proc.stdout, flush=True)
    checks.check("report_written", out.exists(), f"exit {proc.returncode}")
    if not out.exists():
        return
    report = json.loads(out.read_text())["report"]
    checks.measure("report", report)
    checks.measure("table", "\n\n".join(f"{mode}\n{merged['table']}\n" + "\n".join(
        f"goal: {g['goal']}: {g['status']} ({g.get('measured', '-')})" for g in merged["goals"])
        for mode, merged in report.items()))
    checks.measure("headline", {mode: f"{sum(g['status'] == 'met' for g in merged['goals'])} of "
                                      f"{len(merged['goals']) - 1} goals met (table below)" for mode, merged in report.items()})


BODIES = {**{stage.name: bench_stage for stage in STAGES if stage.module == "benchmarks.e2e_bench" and stage.name != "d_report"},
          "d_report": report_stage}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage_main(BODIES)
