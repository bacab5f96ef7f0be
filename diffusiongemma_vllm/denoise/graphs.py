"""CUDA graphs of the denoise loop: captured runs of passes, one per batch size of a ladder.

A denoise pass launches hundreds of kernels (30 layers of attention, MoE and norms, then the
sampler); launched one by one from Python they cost milliseconds of host time per pass. Here
`passes_per_replay` consecutive `denoise.denoise_pass` calls are captured once per ladder size
(1, 2, 4, ..., up to 64 canvases, `ladder_for`) into a graph that reads and writes one static
`CanvasBatch`, and each later run of passes is one replay.

- Halting is masking: a canvas that halts inside a replay stays frozen for the remaining
  passes (denoise_pass only updates running canvases), so nothing in a replay waits on the
  host. Between replays `denoise_canvases` reads which canvases halted (one small device to
  host copy) and drops them; the batch then moves to the smallest ladder size that holds it.
- A batch smaller than its ladder size is padded with copies of its first canvas, marked
  halted: valid inputs, frozen, never read back.
- `run_pass` must read only tensors that outlive the graphs (the model's weights, the KV cache,
  the caller's static per-step inputs indexed by `rows`): a replay re-runs exactly the
  captured kernels on exactly the captured addresses.
- The default is one pass per replay: the check between replays costs one device to host
  copy, tens of microseconds against a pass of 15 ms or more on the release model, while each
  extra pass per replay wastes, on average, half a pass of the whole batch after its last
  canvas halts. `benchmarks/gpu_check.py` times both.
Batches above the ladder run eagerly (`ready_for`). A capture that fails (an op that cannot be
captured, memory) turns the graphs off with a warning naming the error: the engine keeps
serving with eager passes instead of failing to start or dropping the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from diffusiongemma_vllm.denoise.loop import CanvasBatch, RowStatsFn, RunPass, Unembedding, denoise_pass

LADDER = (1, 2, 4, 8, 16, 32, 64)
logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, the one vLLM configures


def ladder_for(max_canvases: int) -> tuple[int, ...]:
    """The ladder sizes a step of at most `max_canvases` canvases can need, topped by that
    count itself (up to LADDER[-1]; larger steps run their passes eagerly until enough
    canvases halt). The top is exact, not the next power of two: a pass never holds more
    canvases than vLLM sized its activation memory and locked workspaces for
    (max_num_batched_tokens // canvas length), and a capture beyond them would fail."""
    top = min(max_canvases, LADDER[-1])
    return tuple(size for size in LADDER if size < top) + (top,)


class CudaGraph:
    """torch.cuda.CUDAGraph with the warm-up a capture needs (lazy inits, Triton compiles)."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, work: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            work()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            work()

    def replay(self) -> None:
        self.graph.replay()


class DenoiseGraphs:
    def __init__(self, run_pass: RunPass, unembedding: Unembedding, row_stats: RowStatsFn,
                 ladder: tuple[int, ...] = LADDER, passes_per_replay: int = 1,
                 graph_factory: Callable[[object], object] | None = None,
                 agree: Callable[[bool], bool] = bool):
        assert list(ladder) == sorted(set(ladder)) and ladder[0] >= 1, ladder
        assert passes_per_replay >= 1
        self.run_pass, self.unembedding, self.row_stats = run_pass, unembedding, row_stats
        self.ladder, self.passes_per_replay = ladder, passes_per_replay
        self.graph_factory = graph_factory or CudaGraph
        # Under tensor parallelism, whether every rank's capture succeeded (each passes its own):
        # the graphs go off on all ranks or none, so their passes run the same collectives.
        self.agree = agree
        self.pool = torch.cuda.graph_pool_handle() if graph_factory is None else None
        self.captured: dict[int, tuple[object, CanvasBatch]] = {}  # ladder size -> (graph, static batch)
        self.replays = 0
        self.disabled: str | None = None  # why the graphs are off, after a failed capture

    def covers(self, canvases: int) -> bool:
        return self.disabled is None and canvases <= self.ladder[-1]

    def ready_for(self, batch: CanvasBatch) -> bool:
        """Whether `advance` can run `batch`: graphs on, its size within the ladder, and that
        size captured (now, if this is the first batch that needs it)."""
        if not self.covers(len(batch)):
            return False
        size = self.size_for(len(batch))
        return size in self.captured or self._try_capture(size, batch)

    def size_for(self, canvases: int) -> int:
        return next(size for size in self.ladder if size >= canvases)

    def capture_ladder(self, like: CanvasBatch) -> None:
        """Capture every ladder size now (largest first, so the smaller graphs reuse its memory
        pool), from canvases shaped like `like`'s first; `advance` would otherwise capture a
        size the first time a batch needs it, in the middle of serving."""
        for size in reversed(self.ladder):
            if size not in self.captured and not self._try_capture(size, like):
                return

    def advance(self, batch: CanvasBatch) -> CanvasBatch:
        """Run `passes_per_replay` passes over `batch` (`ready_for` it); returns the batch that
        now holds its state (a view of the static batch of its ladder size, which the next call
        reuses)."""
        n = len(batch)
        graph, static = self.captured[self.size_for(n)]
        if batch.rows.data_ptr() != static.rows.data_ptr():
            static.copy_(batch)
            static.pad_(n)
        graph.replay()
        self.replays += 1
        return static.take(slice(0, n))

    def _try_capture(self, size: int, like: CanvasBatch) -> bool:
        failure = None
        try:
            self.captured[size] = self._capture(size, like)
        except Exception as error:  # noqa: BLE001 - any capture failure: serve eagerly
            failure = f"{type(error).__name__}: {error}"
        if not self.agree(failure is None):
            self.disabled = f"capturing {size} canvases failed: {failure or 'on another tensor-parallel rank'}"
            logger.warning("DiffusionGemma denoise CUDA graphs off, passes run eagerly (%s)", self.disabled)
            self.captured.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return False
        return True

    def _capture(self, size: int, like: CanvasBatch) -> tuple[object, CanvasBatch]:
        static = like.take(torch.zeros(size, dtype=torch.long, device=like.rows.device))
        static.pad_(1)

        def passes() -> None:
            for _ in range(self.passes_per_replay):
                denoise_pass(static, self.run_pass, self.unembedding, self.row_stats)

        graph = self.graph_factory(self.pool)
        graph.capture(passes)
        return graph, static
