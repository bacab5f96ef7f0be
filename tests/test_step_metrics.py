"""engine/step_metrics.py without an engine: the worker's counters as they reach Prometheus.
Through vLLM's own stats path: tests/test_vllm_contract.py; through a server: test_openai_server.py."""

from __future__ import annotations

from types import SimpleNamespace

from diffusiongemma_vllm.engine.step_metrics import DiffusionStatLogger, StepMetrics


def record(logger: DiffusionStatLogger, metrics: dict[str, int]) -> None:
    logger.record(SimpleNamespace(num_kv_fetch_reqs_by_stage=dict(metrics)), None)


def test_pending_gauge_falls_when_an_abort_frees_a_canvas_in_a_step_that_denoised_nothing():
    """Catches the pending gauge staying up after the only held canvas's request was aborted:
    that step denoises nothing, and its counters were dropped as empty."""
    from prometheus_client import REGISTRY

    logger = DiffusionStatLogger(SimpleNamespace(model_config=SimpleNamespace(served_model_name="metrics-test")))
    labels = {"model_name": "metrics-test"}
    metrics = StepMetrics()
    assert metrics.take() == {}  # nothing happened: nothing to send
    metrics.record_step([], [1], pending=1, seconds=0.01)
    record(logger, metrics.take())
    assert REGISTRY.get_sample_value("diffusion_pending_canvases", labels) == 1
    denoised = REGISTRY.get_sample_value("diffusion_denoise_seconds_count", labels)
    metrics.record_pending(0)
    record(logger, metrics.take())
    assert REGISTRY.get_sample_value("diffusion_pending_canvases", labels) == 0
    assert REGISTRY.get_sample_value("diffusion_denoise_seconds_count", labels) == denoised  # no step counted


def test_a_step_that_only_commits_canvases_held_for_grammars_counts_them_but_not_as_denoising():
    """Catches a step that ran no pass (it committed canvases that had waited for their grammars,
    after waiting up to 50 ms for one) entering the denoise-time histogram, whose samples would
    then include that wait."""
    metrics = StepMetrics()
    metrics.record_step([12], [], pending=0, seconds=0.05)
    taken = metrics.take()
    assert taken["diffusion:canvas_passes:12"] == 1
    assert taken["diffusion:steps"] == 0 and taken["diffusion:denoise_us"] == 0
