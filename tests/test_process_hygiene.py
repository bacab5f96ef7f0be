"""Each engine process imports only its own platform's worker and runner modules.

vLLM's CPU worker (`vllm.v1.worker.cpu_worker`, through `vllm.v1.worker.cpu.shm`) replaces
`torch.cuda.Stream`, `Event`, `set_stream`, `current_stream`, the `torch.accelerator`
memory functions and `Tensor.pin_memory` for the whole process when imported. A GPU worker
that imports it cannot capture CUDA graphs and misreads its memory (seen on an H200 when one
module held both platforms' classes). Each check runs in a fresh interpreter, since an
earlier test in this process may already have imported either platform.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PATCHED = ("torch.cuda.Stream", "torch.cuda.Event", "torch.cuda.set_stream", "torch.cuda.current_stream",
           "torch.accelerator.synchronize", "torch.accelerator.empty_cache", "torch.Tensor.pin_memory")
CPU_ONLY = ("vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu_model_runner", "vllm.v1.worker.cpu.shm",
            "diffusiongemma_vllm.engine.cpu_worker", "diffusiongemma_vllm.engine.cpu_runner")
TESTING = tuple(f"diffusiongemma_vllm.testing.{name}" for name in
                ("reference", "standalone", "tiny_checkpoint", "tiny_tokenizer", "tiny_quantized"))
GPU_ONLY = ("diffusiongemma_vllm.engine.gpu_worker", "diffusiongemma_vllm.engine.gpu_runner")

# Records which of PATCHED an import replaced (after vLLM's own set_stream wrapper, which every
# vLLM process installs and the CPU worker's no-op then replaces) and which watched modules it
# loaded.
PROBE = """
import functools, json, sys, importlib
import torch
import vllm.utils.torch_utils  # vLLM's own set_stream wrapper, installed in every process
def lookup(path):
    return functools.reduce(getattr, path.split(".")[1:], torch)
before = {{path: lookup(path) for path in {patched!r}}}
for module in {modules!r}:
    importlib.import_module(module)
print(json.dumps({{"replaced": [p for p in before if lookup(p) is not before[p]],
                  "loaded": [m for m in {watched!r} if m in sys.modules]}}))
"""


def probe(*modules: str) -> dict:
    code = PROBE.format(patched=PATCHED, modules=modules, watched=CPU_ONLY + GPU_ONLY + TESTING)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_sees_the_cpu_worker_patch():
    """Catches a probe that cannot fail: importing vLLM's CPU worker must show as replaced
    torch.cuda functions, or the GPU check below proves nothing (e.g. after a vLLM upgrade
    moved the patch elsewhere)."""
    seen = probe("vllm.v1.worker.cpu_worker")
    assert "torch.cuda.set_stream" in seen["replaced"] and "vllm.v1.worker.cpu.shm" in seen["loaded"], seen


def test_gpu_side_imports_leave_torch_cuda_alone():
    """Catches a GPU-side module that imports vLLM's CPU worker or runner, which broke the
    engine's CUDA-graph capture (`current_stream` AttributeError) on a GPU: everything a GPU
    engine process loads from the plugin (the worker pulls in the runner and the step; vLLM
    loads the model class and the stat logger by name)."""
    seen = probe("diffusiongemma_vllm.engine.gpu_worker", "diffusiongemma_vllm.model.diffusion_gemma", "diffusiongemma_vllm.engine.step_metrics",
                 "diffusiongemma_vllm.engine.config_hook", "diffusiongemma_vllm.engine.scheduler")
    assert seen["replaced"] == [], seen
    assert not set(seen["loaded"]) & set(CPU_ONLY + TESTING), seen  # nor test helpers


def test_cpu_worker_does_not_import_gpu_side_classes():
    """Catches the CPU worker module pulling in the plugin's GPU runner (and vLLM's GPU
    runner's CUDA-only setup with it) into CPU processes."""
    seen = probe("diffusiongemma_vllm.engine.cpu_worker")
    assert not set(seen["loaded"]) & set(GPU_ONLY + TESTING), seen

