"""engine/pass_profile.py and engine/device_timing.py without an engine: which pass a profile
times, when it refuses, and the datasheet bandwidths its floor uses. The RPC through a running
engine is in test_generate_offline.py; the CUDA figures come from benchmarks/gpu_e2e.py."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch

from diffusiongemma_vllm.denoise.graphs import DenoiseGraphs
from diffusiongemma_vllm.engine import pass_profile
from diffusiongemma_vllm.engine.device_timing import spec_bandwidth
from diffusiongemma_vllm.engine.pass_profile import one_pass, profile_denoise_pass
from diffusiongemma_vllm.model.config import SamplerConfig


class RecordingGraph:
    def __init__(self, size: int):
        self.size, self.replays = size, 0

    def replay(self) -> None:
        self.replays += 1


def step_with_graphs(captured: tuple[int, ...], context_lens: list[int]) -> SimpleNamespace:
    graphs = DenoiseGraphs(run_pass=None, unembedding=None, row_stats=None, ladder=(1, 2, 4, 8),
                           graph_factory=lambda pool: None)
    graphs.captured = {size: (RecordingGraph(size), None) for size in captured}
    return SimpleNamespace(graphs=graphs, paged_inputs=SimpleNamespace(context_lens=torch.tensor(context_lens)),
                           pending={}, largest_pass=8, canvas_length=16, capture_context=nullcontext)


def test_a_profile_replays_the_graph_serving_would_use_on_empty_prefixes():
    """Catches timing another ladder size than the one a batch of that many canvases replays,
    or a replay that reads the last step's prefixes (its KV pages would count against a floor
    of weights alone)."""
    step = step_with_graphs(captured=(1, 2, 4, 8), context_lens=[300, 17, 5, 0, 9])
    call, size, mode = one_pass(step, runner=None, canvases=3)
    call()
    assert (size, mode) == (4, "ladder graph")
    assert {s: g.replays for s, (g, _) in step.graphs.captured.items()} == {1: 0, 2: 0, 4: 1, 8: 0}
    assert step.paged_inputs.context_lens.tolist() == [0] * 5


class SwitchableModel:
    """The model's `fused_kernels` switch, recording which setting each pass ran under."""

    cfg = SimpleNamespace(vocab_size=11, hidden_size=4)

    def __init__(self):
        self.fused = True

    @contextmanager
    def fused_kernels(self, enabled: bool):
        saved, self.fused = self.fused, enabled
        try:
            yield
        finally:
            self.fused = saved


class RunOnCapture:
    """CudaGraph's interface: capture runs the work (as its warm-up does), replay reruns it."""

    def __init__(self, pool):
        self.work = None

    def capture(self, work) -> None:
        self.work = work
        work()

    def replay(self) -> None:
        self.work()


def test_a_profile_with_fused_kernels_set_captures_that_pass_afresh(monkeypatch):
    """Catches the before/after of the fused kernels timing the ladder's graph (captured with
    them on) instead of a capture under the asked setting, a capture over the last step's
    prefixes, or a static batch the capture does not keep alive (the replays would read freed
    memory)."""
    step = step_with_graphs(captured=(1, 2, 4, 8), context_lens=[300, 17])
    step.model = SwitchableModel()
    step.default_sampler, step.device = SamplerConfig(), torch.device("cpu")
    step.unembedding = SimpleNamespace(weight=torch.zeros(11, 4))
    step.paged_run_pass = step.row_stats = None
    passes = []
    monkeypatch.setattr(pass_profile, "CudaGraph", RunOnCapture)
    monkeypatch.setattr(pass_profile, "denoise_pass",
                        lambda batch, *rest: passes.append((len(batch), step.model.fused)))
    call, size, mode = one_pass(step, runner=None, canvases=2, fused_kernels=False)
    assert (size, mode) == (2, "graph") and passes == [(2, False)]
    assert step.model.fused and step.paged_inputs.context_lens.tolist() == [0, 0]
    assert len(call.__self__.batch) == 2
    assert all(g.replays == 0 for g, _ in step.graphs.captured.values())


def test_a_profile_refuses_while_canvases_wait_between_steps():
    """Catches a profile replaying a graph while passes_per_step keeps canvases mid-denoise."""
    step = step_with_graphs(captured=(1,), context_lens=[7])
    step.pending = {"request-0": (7, object())}
    with pytest.raises(ValueError, match="1 canvases are mid-denoise"):
        profile_denoise_pass(SimpleNamespace(denoise_step=step), canvases=1)
    assert step.paged_inputs.context_lens.tolist() == [7]


@pytest.mark.parametrize("canvases", [0, 9])
def test_a_profile_refuses_more_canvases_than_a_pass_holds(canvases):
    """Catches a profile at a batch no serving pass runs (above max_num_seqs or the token budget)."""
    step = step_with_graphs(captured=(1,), context_lens=[7])
    with pytest.raises(ValueError, match="between 1 and 8"):
        profile_denoise_pass(SimpleNamespace(denoise_step=step), canvases=canvases)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA H200 NVL", 4.8e12),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA A100-SXM4-80GB", None),
])
def test_datasheet_bandwidth_by_device_name(name, expected):
    """Catches a floor taken at another card's bandwidth (an H100 PCIe at the SXM's 3.35 TB/s,
    a GH200 matched as an H200)."""
    assert spec_bandwidth(name) == expected
