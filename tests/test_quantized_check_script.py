"""benchmarks/quantized_check.py's verdicts, on made-up engine outputs (no engine here)."""

from __future__ import annotations

import json

from benchmarks.quantized_check import FLOORS, parity, summarize


def run(tokens, prefill):
    return {"prefill": prefill, "tokens": tokens}


def test_parity_and_floors_pass_a_close_model_and_fail_a_misloaded_one(tmp_path):
    """Catches a GPU parity check that would pass a misloaded model (agreement near chance) or
    fail a faithful one, and metrics computed on the wrong token (the bf16 top-1)."""
    ref = run([[1, 2, 3, 4]], [[{"5": -0.1, "6": -2.0}, {"7": -0.5, "8": -0.9}]])
    close = run([[1, 2, 3, 9]], [[{"5": -0.2, "6": -1.9}, {"7": -0.55, "8": -0.95}]])
    wrong = run([[9, 9, 9, 9]], [[{"6": -0.1, "9": -1.0}, {"8": -0.2, "7": -3.0}]])
    (tmp_path / "bf16.json").write_text(json.dumps(ref))
    got = parity(ref, close)
    assert got["prefill_top1_agreement"] == 1.0 and abs(got["prefill_top1_logprob_err_mean"] - 0.075) < 1e-9
    assert got["generation_token_agreement"] == 0.75 and got["generation_identical_canvases"] == 0
    assert summarize("fp8_dynamic", {"stage": "fp8_dynamic", **close}, tmp_path)["ok"]
    bad = summarize("fp8_dynamic", {"stage": "fp8_dynamic", **wrong}, tmp_path)
    assert not bad["ok"] and bad["parity"]["prefill_top1_outside_top_k"] == 1
    assert set(FLOORS) == {"fp8_online", "fp8_dynamic", "nvfp4", "nvfp4_modelopt"}
