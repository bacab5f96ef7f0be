"""Where a structured request's grammar starts under a reasoning parser
(engine/reasoning_bounds.py), against vLLM's engine core deciding it.

The reference is vLLM's own `StructuredOutputManager.accept_tokens`, fed the canvases as the
worker commits them, one after another, with a recording grammar: the tokens it hands the
grammar must be exactly the canvas from our start on, canvas after canvas. Both parsers' paths
are covered: Gemma 4's engine-based one (vLLM's `gemma4`, whose implicit end at a tool call the
worker commits as the end marker) and a plain token parser (tests/marker_reasoning_parser.py).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer
from vllm.reasoning import ReasoningParserManager
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.request import StructuredOutputRequest

from diffusiongemma_vllm.engine.reasoning_bounds import ReasoningBounds, reasoning_parser_class

from tests.marker_reasoning_parser import MarkerReasoningParser  # registers "marker"

CHANNEL, CHANNEL_END, TOOL_CALL, TURN, TURN_END = 100, 101, 48, 105, 106
WORDS = list(range(200, 212))
THOUGHT_CLOSED = [2, TURN, 300, 301, TURN_END, TURN, 302, CHANNEL, 303, CHANNEL_END]  # thinking off
THOUGHT_OPEN = [2, TURN, 300, 301, TURN_END, TURN, 302]  # thinking on: the model opens the channel


class Recording:
    """A grammar that accepts everything and records what it was fed, canvas by canvas."""

    def __init__(self):
        self.fed: list[list[int]] = []

    def accept_tokens(self, request_id, tokens):
        self.fed.append(list(tokens))
        return True


def engine_core(parser_name: str, tokenizer):
    manager = object.__new__(StructuredOutputManager)  # only what accept_tokens reads
    manager.enable_in_reasoning = False
    manager.reasoner_cls = ReasoningParserManager.get_reasoning_parser(parser_name)
    manager.tokenizer = tokenizer
    return manager


def vllm_fed(manager, prompt, canvases, ended, kwargs) -> list[list[int]]:
    """What vLLM's engine core feeds its grammar from each committed canvas (None: nothing)."""
    grammar = Recording()
    state = StructuredOutputRequest(StructuredOutputsParams(regex="a"), grammar, ended, kwargs)
    request = SimpleNamespace(request_id="r", use_structured_output=True, structured_output_request=state,
                              prompt_token_ids=list(prompt), all_token_ids=list(prompt))
    fed = []
    for canvas in canvases:
        request.all_token_ids += canvas  # accept_tokens reads the committed canvas as part of the request
        before = len(grammar.fed)
        assert manager.accept_tokens(request, canvas)
        fed.append(grammar.fed[-1] if len(grammar.fed) > before else None)
    return fed


def our_fed(bounds: ReasoningBounds, prompt, canvases) -> tuple[list[list[int]], list[list[int]]]:
    """The canvases as the worker commits them (the tokens before the grammar start as given,
    an implicit reasoning end made explicit), and what it feeds its grammar from each."""
    tokens, committed, fed = list(prompt), [], []
    for canvas in canvases:
        canvas = list(canvas)
        start = bounds.grammar_start(prompt, tokens, canvas)
        committed.append(canvas)
        fed.append(canvas[start:] if bounds.ended else None)
        tokens += canvas
    return committed, fed


def random_canvases(rng: random.Random, specials: list[int]) -> list[list[int]]:
    pool = WORDS * 6 + specials
    return [[rng.choice(pool) for _ in range(rng.randint(1, 12))] for _ in range(3)]


@pytest.mark.parametrize("parser_name, specials", [
    ("gemma4", [CHANNEL, CHANNEL_END, TOOL_CALL, TURN_END]),
    ("marker", [CHANNEL, CHANNEL_END, TURN_END]),
])
def test_the_grammar_starts_where_vllm_starts_it(tiny_dir, parser_name, specials):
    """Catches the worker constraining a canvas from another token than vLLM's engine core,
    which then rejects the committed canvas (the request ends in an error) or leaves it
    unchecked: a reasoning end in the prompt (thinking off), in a canvas (at its start, middle,
    last position), in a later canvas, never; Gemma 4's tool call, which ends the reasoning
    implicitly (committed as the end marker, which the engine core must then see, or it never
    checks the grammar); the API server's `reasoning_ended` in either direction."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    manager = engine_core(parser_name, tokenizer)
    rng = random.Random(0)
    cases = [[[CHANNEL_END, 201]], [[201, 202, CHANNEL_END]], [[201, 202], [203, CHANNEL_END, 204]],
             [[201, TOOL_CALL, 202]], [[CHANNEL, 201, 202], [203]]]
    cases += [random_canvases(rng, specials) for _ in range(60)]
    checked = set()
    for canvases in cases:
        for prompt in (THOUGHT_CLOSED, THOUGHT_OPEN):
            for ended in (None, False, True):
                thinking = {"chat_template_kwargs": {"enable_thinking": prompt is THOUGHT_OPEN}}
                reasoner = manager.reasoner_cls(tokenizer=tokenizer, **thinking)
                committed, fed = our_fed(ReasoningBounds(reasoner, ended), prompt, canvases)
                assert vllm_fed(manager, prompt, committed, ended, thinking) == fed, (canvases, prompt, ended)
                checked.add(tuple(None if f is None else len(f) for f in fed))
    assert len(checked) > 20  # the cases reach many different starts, not one


def test_a_tool_call_that_ends_the_reasoning_is_committed_as_the_end_marker(tiny_dir):
    """Catches a Gemma 4 tool call in the thinking of a structured request left for the
    grammar to replace (the reply then has no reasoning end at all: its thinking comes back as
    content and vLLM's engine core never checks the grammar) or kept (vLLM's engine core then
    feeds it to the grammar, which refuses it)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    reasoner = ReasoningParserManager.get_reasoning_parser("gemma4")(tokenizer=tokenizer)
    canvas = [201, TOOL_CALL, 202, 203]
    assert ReasoningBounds(reasoner, False).grammar_start(THOUGHT_OPEN, THOUGHT_OPEN, canvas) == 2
    assert canvas == [201, CHANNEL_END, 202, 203]


def test_no_reasoning_parser_or_enable_in_reasoning_constrain_from_the_first_token(tiny_dir):
    """Catches the grammar left off for a reasoning the engine does not separate: without a
    reasoning parser, or with `enable_in_reasoning`, vLLM constrains from the first token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    def engine(**settings):
        from vllm.config import StructuredOutputsConfig

        return SimpleNamespace(structured_outputs_config=StructuredOutputsConfig(**settings))

    assert reasoning_parser_class(engine()) is None
    assert reasoning_parser_class(engine(reasoning_parser="gemma4", enable_in_reasoning=True)) is None
    assert ReasoningBounds(None, None).grammar_start(THOUGHT_OPEN, THOUGHT_OPEN, [201, CHANNEL_END, 202]) == 0
    assert reasoning_parser_class(engine(reasoning_parser="marker")) is MarkerReasoningParser
    reasoner = MarkerReasoningParser(tokenizer=tokenizer, chat_template_kwargs={})
    assert ReasoningBounds(reasoner, None).grammar_start(THOUGHT_OPEN, THOUGHT_OPEN, [201, CHANNEL_END, 202]) == 2
