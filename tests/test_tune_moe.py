"""benchmarks/tune_moe.py on CPU: the candidates it draws from vLLM's tunings, the search's
choices and budget, and the file it writes, read back by vLLM's own lookup.

The timing itself needs vLLM's CUDA kernels (stage c_moe_tune of gpu_e2e.py); here a stand-in
`measure` drives the same search, so these tests pin the logic a GPU run cannot afford to get
wrong: a file vLLM never finds (wrong name or format) or reads at the wrong M, a faster tile
shape that computes something else kept, a budget that is not honoured.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import tune_moe
from benchmarks.tune_moe import BATCH_SIZES, ExpertShape, candidates, search, vllm_tuned_files, write_vllm_json

TILES = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def tiles(m: int, n: int = 64, k: int = 64) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": 1, "num_warps": 4,
            "num_stages": 3}


def test_candidates_come_from_vllms_hopper_tunings_for_128_experts():
    """Catches a pool drawn from the wrong files (block-quantized, FP8 for a bf16 search, other
    cards or expert counts), duplicates that cost a compile each, or an order in which a budget
    cut leaves some token counts without their most likely tiles."""
    for dtype in ("bf16", "fp8_w8a8"):
        tunings = vllm_tuned_files(128, dtype)
        assert len(tunings) >= 3, dtype  # vLLM 0.32 ships several of each for 128-expert layers on Hopper
        pool = candidates(tunings, BATCH_SIZES, per_m=6)
        keys = [tune_moe.tile_key(c) for c in pool]
        assert len(keys) == len(set(keys))
        assert all(set(TILES) <= set(c) for c in pool)
        for m in BATCH_SIZES:  # each M's favourite is within the first round
            chosen = [t[min(t, key=lambda g: abs(g - m))] for t in tunings]
            favourite = max(chosen, key=lambda c: sum(tune_moe.tile_key(o) == tune_moe.tile_key(c) for o in chosen))
            assert tune_moe.tile_key(favourite) in keys[:len(BATCH_SIZES)], m


def test_vllm_tuned_files_filters_by_name(tmp_path):
    """Catches a filter that lets block-quantized, non-Hopper or other-dtype tables in."""
    table = json.dumps({"triton_version": "3.5.0", "1": tiles(16), "64": tiles(64)})
    for name in ("E=128,N=704,device_name=NVIDIA_H100_80GB_HBM3", "E=128,N=512,device_name=NVIDIA_H200,dtype=fp8_w8a8",
                 "E=128,N=512,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128]",
                 "E=128,N=512,device_name=NVIDIA_A100-SXM4-80GB", "E=64,N=512,device_name=NVIDIA_H200"):
        (tmp_path / f"{name}.json").write_text(table)
    assert vllm_tuned_files(128, "bf16", str(tmp_path)) == [{1: tiles(16), 64: tiles(64)}]
    assert len(vllm_tuned_files(128, "fp8_w8a8", str(tmp_path))) == 1


def test_search_keeps_the_fastest_correct_tiles_per_m():
    """Catches a search that keeps a faster tile shape whose output is wrong, dies on a shape
    that does not compile, or replaces the default where nothing beat it."""
    default = lambda m: tiles(16)  # noqa: E731
    speed = {32: {8: 0.5, 4096: 3.0}, 64: {8: 2.0, 4096: 0.25}, 128: {8: 0.1, 4096: 0.1}, 256: None}

    def measure(t, m):
        block = t["BLOCK_SIZE_M"]
        if block == 16:
            return 1.0, 0.0
        if speed[block] is None:
            raise RuntimeError("out of shared memory")
        return speed[block][m], (0.5 if block == 128 else 0.001)  # 128 is fast and wrong

    found = search((8, 4096), default, [tiles(32), tiles(64), tiles(128), tiles(256)], measure, 0.02, budget_s=60)
    assert found.table() == {8: tiles(32), 4096: tiles(64)}
    assert found.baseline_ms == {8: 1.0, 4096: 1.0}
    assert [d["tiles"]["BLOCK_SIZE_M"] for d in found.dropped] == [128, 256]
    assert "differs" in found.dropped[0]["reason"] and "shared memory" in found.dropped[1]["reason"]
    rows = {row["m"]: row for row in found.rows()}
    assert rows[8]["default_over_best"] == 2.0 and rows[4096]["default_over_best"] == 4.0

    slower = search((8,), default, [tiles(64)], measure, 0.02, budget_s=60)
    assert slower.table() == {8: tiles(16)}


def test_search_stops_at_the_budget_but_always_times_the_default():
    """Catches a budget that is ignored (the stage would be killed, losing the tables) or one
    that also skips the baseline."""
    now = [0.0]

    def measure(t, m):
        now[0] += 10.0  # each timing takes 10 s of the clock
        return float(t["BLOCK_SIZE_M"]), 0.0

    found = search((8, 64), lambda m: tiles(128), [tiles(64), tiles(32), tiles(16)], measure, 0.02,
                   budget_s=35, clock=lambda: now[0])
    assert found.tried == 1 and found.stopped_by_budget  # baseline 20 s, first candidate to 40 s
    assert found.table() == {8: tiles(64), 64: tiles(64)}


def test_written_table_is_what_vllm_reads(tmp_path, monkeypatch):
    """Catches a file vLLM would never open (name, folder, format) or reads at another M: the
    written table goes through vLLM's own get_moe_configs and try_get_optimal_moe_config."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H200_NVL")
    table = {1: tiles(16), 256: tiles(32, 128), 4096: tiles(64, 128, 128)}
    name = fused_moe.get_config_file_name(128, 704, None)
    assert name == "E=128,N=704,device_name=NVIDIA_H200.json"
    write_vllm_json(table, str(tmp_path), name, "3.6.0")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    fused_moe.get_moe_configs.cache_clear()
    try:
        assert fused_moe.get_moe_configs(128, 704, None) == table
        w1, w2 = (128, 1408, 2816), (128, 2816, 704)
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 8, None, 300) == tiles(32, 128)
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 8, None, 16384) == tiles(64, 128, 128)
    finally:
        fused_moe.get_moe_configs.cache_clear()


def test_expert_shape_from_config_and_ranks(tmp_path):
    """Catches tuning the wrong N: vLLM names and looks up the table by each rank's expert width."""
    from diffusiongemma_vllm.testing.tiny_checkpoint import release_checkpoint_config

    assert ExpertShape.of_model(None) == ExpertShape(128, 2816, 704, 8)
    (tmp_path / "config.json").write_text(json.dumps(release_checkpoint_config()))
    assert ExpertShape.of_model(str(tmp_path), tensor_parallel_size=2) == ExpertShape(128, 2816, 352, 8)
    with pytest.raises(SystemExit, match="does not split"):
        ExpertShape.of_model(str(tmp_path), tensor_parallel_size=3)
