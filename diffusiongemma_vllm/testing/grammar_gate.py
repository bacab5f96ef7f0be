"""A gate on the worker's grammar compiles, for tests of what the engine does while one runs.

`GrammarGate` is mixed into vLLM's worker by `worker_extension_cls` and adds three RPCs:
- `close_grammar_gate()`: every grammar the worker starts to get from then on (compiled here
  or shared with the engine core, structured_commit.py) waits until the gate opens (at most
  `GATE_TIMEOUT_S`, so an engine that blocks on it fails a test instead of hanging it);
- `open_grammar_gate()`: lets them run, and compiles start ungated again;
- `worker_grammars()`: the request ids whose grammars the worker holds (compiling, compiled
  or failed), and those its runner has been scheduled.
"""

from __future__ import annotations

import threading

WORKER_EXTENSION = "diffusiongemma_vllm.testing.grammar_gate.GrammarGate"
GATE_TIMEOUT_S = 120


class GrammarGate:
    def close_grammar_gate(self) -> None:
        grammars = self.model_runner.denoise_step.grammars
        gate = self._grammar_gate = threading.Event()
        compile_grammar = type(grammars)._compile.__get__(grammars)

        def gated(req_id, sampling_params, reasoning):
            gate.wait(GATE_TIMEOUT_S)
            return compile_grammar(req_id, sampling_params, reasoning)

        grammars._compile = gated

    def open_grammar_gate(self) -> None:
        self._grammar_gate.set()
        del self.model_runner.denoise_step.grammars._compile

    def worker_grammars(self) -> dict[str, list[str]]:
        runner = self.model_runner
        return {"grammars": sorted(runner.denoise_step.grammars.grammars), "scheduled": sorted(runner.requests)}
