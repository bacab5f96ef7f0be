"""Timing work on a device: median call time, the profiler's view of one call, copy bandwidth,
and the datasheet bandwidth of known cards.

Shared by the engine's pass profile (pass_profile.py) and benchmarks/gpu_check.py, which runs
without vLLM: this module imports only torch.
"""

from __future__ import annotations

import re
import statistics
import time

import torch

# NVIDIA's datasheet memory bandwidth (bytes/s) of the cards this project measures on; the
# first pattern that matches torch.cuda.get_device_name() wins (word-bounded: no GH200 here).
SPEC_BANDWIDTH = (
    (r"\bH200\b", 4.8e12),  # SXM and NVL, HBM3e
    (r"\bH100 NVL\b", 3.9e12),
    (r"\bH100 PCIe\b", 2.0e12),
    (r"\bH100\b", 3.35e12),  # SXM5, "NVIDIA H100 80GB HBM3"
)
COPY_BYTES = 2**28  # per buffer: far beyond any L2


def spec_bandwidth(device_name: str) -> float | None:
    return next((rate for pattern, rate in SPEC_BANDWIDTH if re.search(pattern, device_name)), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fns, device: torch.device, warmup: int, reps: int, budget_ms: float = 3000.0) -> float:
    """Median time of one call, cycling through `fns` (the same call on different inputs):
    CUDA events on a GPU, wall time elsewhere. Slow calls get fewer repeats (at least 3) so
    that one measurement stays near `budget_ms`."""
    fns = fns if isinstance(fns, (list, tuple)) else [fns]
    last_ms = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        synchronize(device)
        last_ms = (time.perf_counter() - t0) * 1e3
    reps = max(min(reps, 3), min(reps, int(budget_ms / max(last_ms, 1e-3))))
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_busy(fn) -> tuple[float | None, int | None]:
    """(summed device ms, device activities) of what one call launches, from the profiler;
    (None, None) when unavailable. Activities are kernels plus copies and memsets."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if (getattr(e, "self_device_time_total", 0) or 0) > 0]
    except Exception:  # noqa: BLE001 - no CUPTI here: the graph gap stays unknown
        return None, None
    total_us = sum(e.self_device_time_total for e in events)
    return (total_us / 1e3 or None), sum(e.count for e in events)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second read plus written by a device-to-device copy of COPY_BYTES."""
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * COPY_BYTES / ms * 1e3
