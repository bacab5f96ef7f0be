"""benchmarks/compare_ar.py runs end to end on CPU with the smallest settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def test_compare_ar_prints_every_field_and_a_plot(tmp_path):
    """Catches a benchmark that silently drops a system or a metric, or never writes its plot."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_ar.py"), "--tiny", "--concurrency", "1,2",
         "--requests", "2", "--max-tokens", "64", "--max-denoising-steps", "3", "--enforce-eager",
         "--passes-per-step", "2",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"machine", "mode", "settings", "models", "results", "plugin_over_ar", "plot"}
    assert set(result["results"]) == {"plugin", "ar", "plugin-pps2"}
    for system, levels in result["results"].items():
        assert set(levels) == {"1", "2"}
        for level in levels.values():
            assert level["output_tokens"] == 2 * 64
            for key in ("output_tokens_per_s", "per_request_tokens_per_s", "ttft_p50_s", "latency_p50_s",
                        "latency_p99_s"):
                assert level[key] > 0, (system, key)
    for system in ("plugin", "plugin-pps2"):  # canvases spanning steps still take 3 passes each
        assert all(p == 3 for p in result["results"][system]["1"]["passes_per_canvas"])
    assert result["results"]["plugin"]["1"]["passes_per_output_token"] == pytest.approx(3 / 64)
    assert Path(result["plot"]).stat().st_size > 10_000


def test_grammar_stall_reports_each_delay_against_the_plain_baseline():
    """Catches the slow-grammar benchmark losing a delay's row, its baseline or its ratios."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grammar_stall.py"), "--tiny", "--properties", "50",
         "--delays", "0,0.5", "--max-tokens", "64", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["plain_alone_s"] > 0 and [row["delay_s"] for row in result["rows"]] == [0, 0.5]
    for row in result["rows"]:
        assert row["plain_s"] > 0 and row["structured_s"] > 0
        assert row["plain_over_alone"] == pytest.approx(row["plain_s"] / result["plain_alone_s"], abs=0.01)
