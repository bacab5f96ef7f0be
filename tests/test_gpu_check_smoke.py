"""benchmarks/gpu_check.py --smoke: every section runs on the CPU with toy shapes.

The GPU check gets one short run on a lent GPU; a crash there wastes the lease. This runs
the same code paths here first (Triton kernels in the interpreter, no CUDA graphs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "attention_parity", "sampler_parity", "attention", "sampler", "router", "backbone", "plugin_loop",
            "ar_decode", "roofline", "transformers", "block_sweep", "sampler_sweep", "goals")


def test_smoke_run_fills_every_section(tmp_path):
    """Catches a GPU check that crashes, drops a section, imports vLLM (absent on the GPU
    machine), or writes no Markdown report, before a lent GPU's minutes are spent on it."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--smoke"],
                   env=env, check=True, capture_output=True, text=True, timeout=300)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["meta"]["vllm_imported"] is False
    assert set(data["sections"]) == set(SECTIONS)
    for name, rec in data["sections"].items():
        assert "error" not in rec, (name, rec.get("traceback"))
        assert "rows" in rec or "skipped" in rec or name == "environment", (name, rec)
    assert data["sections"]["environment"]["copy_gbps"] > 0
    assert all(row["ok"] for row in data["sections"]["attention_parity"]["rows"])
    assert {row["layer"] for row in data["sections"]["attention_parity"]["rows"]} == {"sliding", "full"}
    for row in data["sections"]["backbone"]["rows"] + data["sections"]["ar_decode"]["rows"]:
        assert row["eager_ms_30"] > row["eager_ms"] > 0
    assert all(row["ok"] for row in data["sections"]["sampler_parity"]["rows"])
    assert data["sections"]["sampler_parity"]["philox_tokens_equal_torch_philox"] is True
    assert all(row["same_experts"] and row["weights_max_rel_err"] < 1e-5 for row in data["sections"]["router"]["rows"])
    loop_rows = data["sections"]["plugin_loop"]["rows"]
    assert loop_rows[0]["eager_repeat_agreement"] == 1.0
    assert all(row["eager_ms_per_pass"] > 0 for row in loop_rows)
    assert len(data["sections"]["goals"]["rows"]) == 4
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: cpu")
