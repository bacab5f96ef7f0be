"""The worker step's counters on their way to vLLM's Prometheus `/metrics`.

Served metrics (all prefixed `diffusion_`, labelled with the served model name):
- `diffusion_passes_per_canvas` (histogram): denoise passes each finished canvas took;
- `diffusion_canvases_per_pass` (histogram): canvases advanced together by one pass;
- `diffusion_pending_canvases` (gauge): canvases held between steps (`passes_per_step`, or
  halted and waiting for their grammar);
- `diffusion_denoise_seconds` (histogram): the denoise part of each scheduler step.

vLLM exports only what its API-server process records, while the counters arise in the worker
(the engine-core process, or a worker process below it). They travel in-band with the step:
1. the worker step accumulates them (`StepMetrics`) and the runner attaches the step's share to
   its `ModelRunnerOutput` as `diffusion_metrics` (model_runner.py; a plain attribute, which
   pickles across the worker process boundary);
2. the scheduler (scheduler.py) copies them into the step's `SchedulerStats`, into its one
   open `dict[str, int]`, `num_kv_fetch_reqs_by_stage`, under keys starting `diffusion:`
   (SchedulerStats is a fixed struct: an extra field would not survive the trip to the front
   end; tests/test_vllm_contract.py pins this);
3. `DiffusionStatLogger`, a `vllm.stat_logger_plugins` entry point (pyproject.toml), runs in the
   API server before vLLM's own loggers: it removes those keys (vLLM's log line would print
   them as KV fetches) and records them in Prometheus' default registry, which `/metrics`
   serves.
Scheduler stats exist only while stats logging is on (the default for `vllm serve`); offline
`LLM` keeps `collective_rpc("diffusion_stats")` (worker_rpcs.py).
"""

from __future__ import annotations

from collections import Counter

from vllm.v1.metrics.loggers import StatLoggerBase

KEY_PREFIX = "diffusion:"
PASS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 1024)
CANVAS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class StepMetrics:
    """Worker side: what happened since the runner last took the counters, as integers
    (the stats dict carries ints only)."""

    def __init__(self):
        self.canvas_passes: Counter[int] = Counter()
        self.pass_canvases: Counter[int] = Counter()
        self.pending = 0
        self.denoise_us = 0
        self.steps = 0
        self.recorded = False

    def record_step(self, canvas_passes: list[int], pass_canvases: list[int], pending: int, seconds: float):
        self.canvas_passes.update(canvas_passes)
        self.pass_canvases.update(pass_canvases)
        self.record_pending(pending)
        if pass_canvases:  # not a step that only committed canvases held for their grammars
            self.denoise_us += round(seconds * 1e6)
            self.steps += 1

    def record_pending(self, pending: int):
        """The canvases held between steps, also when no step denoised (requests aborted)."""
        self.pending = pending
        self.recorded = True

    def take(self) -> dict[str, int]:
        """The counters as `diffusion:` keys (empty if nothing was recorded), and reset."""
        if not self.recorded:
            return {}
        out = {f"{KEY_PREFIX}canvas_passes:{n}": count for n, count in self.canvas_passes.items()}
        out.update({f"{KEY_PREFIX}pass_canvases:{n}": count for n, count in self.pass_canvases.items()})
        out.update({f"{KEY_PREFIX}pending": self.pending, f"{KEY_PREFIX}denoise_us": self.denoise_us,
                    f"{KEY_PREFIX}steps": self.steps})
        self.__init__()
        return out


def attach_to_stats(engine_core_outputs: dict, metrics: dict[str, int] | None) -> None:
    """Scheduler side: put a step's counters into the stats it returns, if it returns any."""
    if not metrics:
        return
    for outputs in engine_core_outputs.values():
        if outputs.scheduler_stats is not None:
            outputs.scheduler_stats.num_kv_fetch_reqs_by_stage.update(metrics)
            return


_prometheus = None


def _metrics():
    """The Prometheus metrics, created once per process (the registry refuses duplicates)."""
    global _prometheus
    if _prometheus is None:
        from prometheus_client import Gauge, Histogram

        labels = ["model_name"]
        _prometheus = {
            "canvas_passes": Histogram("diffusion_passes_per_canvas", "Denoise passes each finished canvas took.",
                                       labels, buckets=PASS_BUCKETS),
            "pass_canvases": Histogram("diffusion_canvases_per_pass", "Canvases advanced together by one denoise pass.",
                                       labels, buckets=CANVAS_BUCKETS),
            "pending": Gauge("diffusion_pending_canvases", "Canvases held between scheduler steps.", labels,
                             multiprocess_mode="mostrecent"),
            "denoise": Histogram("diffusion_denoise_seconds", "Denoise time of each scheduler step that denoised.",
                                 labels),
        }
    return _prometheus


class DiffusionStatLogger(StatLoggerBase):
    """Front end: records the `diffusion:` counters of each step's stats in Prometheus."""

    def __init__(self, vllm_config, engine_index: int = 0):
        model_name = vllm_config.model_config.served_model_name
        self.metrics = {name: metric.labels(model_name=str(model_name)) for name, metric in _metrics().items()}

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        stats = scheduler_stats.num_kv_fetch_reqs_by_stage
        counters = {key[len(KEY_PREFIX):]: stats.pop(key) for key in [k for k in stats if k.startswith(KEY_PREFIX)]}
        if not counters:
            return
        for key, count in counters.items():
            kind, _, value = key.partition(":")
            if kind in ("canvas_passes", "pass_canvases"):
                for _ in range(count):
                    self.metrics[kind].observe(int(value))
        self.metrics["pending"].set(counters["pending"])
        steps = counters["steps"]
        for _ in range(steps):  # the steps' total, spread evenly: the stats carry no per-step split
            self.metrics["denoise"].observe(counters["denoise_us"] / 1e6 / steps)

    def log_engine_initialized(self):
        pass
