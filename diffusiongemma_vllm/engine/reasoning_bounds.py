"""Where a structured request's grammar starts when the engine has a reasoning parser.

vLLM leaves a reasoning model's thinking free and applies a request's grammar (JSON schema,
regex, ...) from the token after the reasoning ends (`--reasoning-parser`, unless
`--structured-outputs-config.enable_in_reasoning true` constrains it from the first token).
vLLM's engine core decides where that is as it advances its copy of the grammar with each
committed canvas (`StructuredOutputManager._get_constraint_bounds`); the worker, which
constrains whole canvases as they commit (structured_commit.py), must start its grammar at the
same token, or the engine core's check rejects the canvas. `ReasoningBounds` makes that
decision with the same parser, arguments and rules:
- the reasoning may have ended in the prompt (a chat template that closes an empty thought
  channel when thinking is off, as Gemma 4's does): the API server says so when it knows
  (`reasoning_ended`), otherwise the parser reads the prompt;
- vLLM's engine-based parsers (Gemma 4's among them) report the first reasoning end in the
  canvas and whether its token is the end marker (the grammar starts after it) or content
  that ends the reasoning implicitly (Gemma 4's `<|tool_call>`: vLLM starts the grammar at it,
  which refuses it, and ends the request in an error). Here an implicit end is committed as
  the parser's end marker, and the grammar starts after it: the reply then has a reasoning end
  that the engine core and the API server's parser both see, and constrained content after it
  (a parser without an explicit marker keeps vLLM's behaviour);
- other parsers are asked, as vLLM asks them, for the shortest prefix of the canvas whose
  tokens end the reasoning.
The decision is made on the halting pass's argmax; the positions before the grammar start
commit that argmax (with an implicit end made explicit), so the engine core, reading the
committed canvas, finds the same end. Once ended, the reasoning stays ended: later canvases
are constrained from their first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ReasoningBounds:
    reasoner: object | None  # vLLM's ReasoningParser of this request; None: the grammar applies from the start
    ended: bool | None = None  # None: not yet judged from the prompt

    def grammar_start(self, prompt: Sequence[int], tokens: Sequence[int], canvas: list[int]) -> int:
        """The first position of `canvas` (the tokens about to be committed after `tokens`, the
        request's prompt and output so far) that the grammar constrains: `len(canvas)` when the
        reasoning goes on past it. An implicit reasoning end in `canvas` is replaced by the
        parser's end marker. Latches `ended` once the reasoning has ended."""
        if self.reasoner is None or self.ended:
            return 0
        if self.ended is None:
            self.ended = bool(self.reasoner.is_reasoning_end(list(prompt)))
            if self.ended:
                return 0
        start = self._end_in(tokens, canvas)
        if start <= len(canvas):
            self.ended = True
        return min(start, len(canvas))

    def _end_in(self, tokens: Sequence[int], canvas: list[int]) -> int:
        """Where the grammar starts in `canvas` (an implicit end made explicit there);
        `len(canvas) + 1` if the reasoning does not end in it."""
        from vllm.parser.engine.adapters import ParserEngineReasoningAdapter

        reasoner, length = self.reasoner, len(canvas)
        if isinstance(reasoner, ParserEngineReasoningAdapter) and reasoner.reasoning_end_token_ids:
            end = reasoner.find_reasoning_end(canvas)
            if end is not None:
                marker = end_marker(reasoner)
                if not end.implicit or marker is None:
                    return end.offset if end.implicit else end.offset + 1
                canvas[end.offset] = marker
                return end.offset + 1
        sequence, delta = [*tokens, *canvas], list(canvas)
        if not delta or not reasoner.is_reasoning_end_streaming(sequence, delta):
            return length + 1
        for kept in range(length - 1, 0, -1):  # the shortest prefix of the canvas that ends the reasoning
            sequence.pop()
            delta.pop()
            if not reasoner.is_reasoning_end_streaming(sequence, delta):
                return kept + 1
        return 1


def end_marker(reasoner) -> int | None:
    """The token that ends an engine-based parser's reasoning explicitly (Gemma 4's
    `<channel|>`), not as content; None if it has none."""
    explicit = [t for t in sorted(reasoner.reasoning_end_token_ids) if not reasoner.find_reasoning_end([t]).implicit]
    return explicit[0] if explicit else None


def reasoning_parser_class(vllm_config):
    """The engine's reasoning parser class, resolved once as vLLM's engine core resolves it (its
    plugin file imported); None when structured outputs apply from the first token (no
    reasoning parser, or `enable_in_reasoning`). Each structured request builds its own parser
    from it, with its chat template arguments."""
    from vllm.reasoning import ReasoningParserManager

    config = vllm_config.structured_outputs_config
    if not config.reasoning_parser or config.enable_in_reasoning:
        return None
    if config.reasoning_parser_plugin and len(config.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(config.reasoning_parser_plugin)
    return ReasoningParserManager.get_reasoning_parser(config.reasoning_parser)
