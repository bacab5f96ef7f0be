"""The grammar-constrained commit of a canvas (engine/structured_commit.py), without an engine.

Grammars are xgrammar's, compiled for the tiny checkpoint's tokenizer and wrapped in vLLM's
own `XgrammarGrammar`, as the worker builds them. The reference for every position is brute
force: the whole vocabulary's logits, masked by a fresh matcher that replays the committed
tokens, and their argmax.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer
from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

from diffusiongemma_vllm.denoise.loop import Unembedding
from diffusiongemma_vllm.engine import structured_commit
from diffusiongemma_vllm.engine.reasoning_bounds import ReasoningBounds
from diffusiongemma_vllm.engine.structured_commit import constrained_canvas, unpack

from tests.test_vocab_shards import ThreadRanks

VOCAB, HIDDEN, LENGTH = 512, 24, 32
PATTERN = r"[a-z]{3,9} = [0-9]{2,5};"  # at most 18 characters: it completes inside a canvas


@pytest.fixture(scope="module")
def compiler(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[1]))


def regex_grammar(compiler, pattern: str = PATTERN) -> XgrammarGrammar:
    ctx = compiler.compile_regex(pattern)
    return XgrammarGrammar(vocab_size=VOCAB, matcher=xgr.GrammarMatcher(ctx), ctx=ctx)


def random_canvas(seed: int) -> tuple[torch.Tensor, Unembedding, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    hidden = torch.randn(LENGTH, HIDDEN, generator=generator)
    unembedding = Unembedding(weight, softcap=30.0, scale=1.0)
    return hidden, unembedding, (hidden @ weight.T).argmax(-1)


def best_allowed(compiler, committed: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """Brute force: each position's argmax over the vocabulary among the tokens a fresh matcher
    allows after the committed ones, up to the stop token."""
    grammar = regex_grammar(compiler)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    best = []
    for position, token in enumerate(committed.tolist()):
        grammar.fill_bitmask(bitmask, 0)
        logits = hidden[position] @ weight.T
        xgr.apply_token_bitmask_inplace(logits[None], bitmask)
        best.append(int(logits.argmax()))
        assert grammar.accept_tokens("ref", [token])
        if grammar.is_terminated():
            break
    return best


class AllowsEverything:
    """A grammar that allows every token and never completes."""

    def fill_bitmask(self, bitmask, index):
        bitmask[index] = -1

    def accept_tokens(self, request_id, tokens):
        return True

    def is_terminated(self):
        return False


def test_a_canvas_the_grammar_allows_commits_as_the_argmax(monkeypatch):
    """Catches the constrained commit changing text the grammar allows (it must be the
    unconstrained argmax, also where the logits tie and the candidates list another id
    first), or going to the whole vocabulary when a candidate is allowed."""
    hidden, unembedding, argmax = random_canvas(0)
    unembedding.weight[300] = unembedding.weight[argmax[0]]  # an exact tie at position 0
    monkeypatch.setattr(structured_commit, "masked_argmax", lambda *args: pytest.fail("no candidate allowed?"))
    assert torch.equal(constrained_canvas(AllowsEverything(), "r", hidden, argmax, unembedding), argmax)


@pytest.mark.parametrize("candidates", [16, 1])
def test_each_position_takes_the_best_token_the_grammar_allows(compiler, candidates):
    """Catches a position that commits a token the grammar refuses, one that is not the most
    likely allowed token (from the candidates or, when none is allowed, the whole
    vocabulary), or a walk that goes on after the stop token (which fills the canvas: vLLM's
    guidance check reads a whole canvas and refuses anything after the stop)."""
    hidden, unembedding, argmax = random_canvas(1)
    grammar = regex_grammar(compiler)
    committed = constrained_canvas(grammar, "r", hidden, argmax, unembedding, candidates=candidates)
    best = best_allowed(compiler, committed, hidden, unembedding.weight)
    assert committed[:len(best)].tolist() == best
    assert grammar.is_terminated() and committed[len(best) - 1] == 1  # the regex completed, then its stop token
    assert (committed[len(best):] == 1).all()
    assert (committed[:len(best)] != argmax[:len(best)]).any()  # the grammar did constrain this canvas


@pytest.mark.parametrize("start", [5, LENGTH])
def test_a_reasoning_before_the_grammar_start_commits_as_the_argmax(compiler, start):
    """Catches a grammar applied inside the reasoning a reasoning parser leaves free
    (reasoning_bounds.py), or the grammar not fed from its start: the positions before `start`
    commit the argmax, a special token there too, and those from `start` on are the best the
    grammar allows, as if the canvas began there; a canvas all reasoning feeds the grammar nothing."""
    hidden, unembedding, argmax = random_canvas(1)
    argmax[2] = 100  # `<|channel>`: special, which a constrained position never takes
    grammar = regex_grammar(compiler)
    committed = constrained_canvas(grammar, "r", hidden, argmax, unembedding, start=start)
    assert torch.equal(committed[:start], argmax[:start])
    if start == LENGTH:
        fresh, untouched = xgr.allocate_token_bitmask(1, VOCAB), xgr.allocate_token_bitmask(1, VOCAB)
        regex_grammar(compiler).fill_bitmask(fresh, 0)
        grammar.fill_bitmask(untouched, 0)
        assert torch.equal(untouched, fresh)  # still at its start
        return
    alone = constrained_canvas(regex_grammar(compiler), "r", hidden[start:], argmax[start:], unembedding)
    assert torch.equal(committed[start:], alone) and grammar.is_terminated()


def test_the_grammar_carries_over_to_the_next_canvas(compiler):
    """Catches a grammar reset between a request's canvases: a canvas ending mid-match must
    leave the matcher where it stopped, so the canvases together form one match."""
    pattern = r"[a-z ]{120,140}\."
    grammar, canvases = regex_grammar(compiler, pattern), []
    while not grammar.is_terminated() and len(canvases) < 12:
        hidden, unembedding, argmax = random_canvas(10 + len(canvases))
        canvases.append(constrained_canvas(grammar, "r", hidden, argmax, unembedding).tolist())
    assert grammar.is_terminated() and len(canvases) >= 2 and all(1 not in c for c in canvases[:-1])
    text = sum(canvases[:-1], []) + canvases[-1][:canvases[-1].index(1) + 1]
    replay = regex_grammar(compiler, pattern)
    assert replay.accept_tokens("replay", text) and replay.is_terminated()


@pytest.mark.parametrize("candidates", [1, 16])
@pytest.mark.parametrize("ranks", [2, 3])
def test_vocabulary_slices_commit_the_canvas_one_rank_does(compiler, ranks, candidates):
    """Catches tensor-parallel ranks committing different tokens: each walks its own matcher
    over its vocabulary slice's candidates and whole-vocabulary fallbacks, merged."""
    hidden, whole, argmax = random_canvas(1)
    expected = constrained_canvas(regex_grammar(compiler), "r", hidden, argmax, whole, candidates=candidates)
    bounds = [0, 100, VOCAB] if ranks == 2 else [0, 7, 300, VOCAB]  # uneven; a slice narrower than 16

    def work(rank, shards):
        sliced = Unembedding(whole.weight[bounds[rank]:bounds[rank + 1]], 30.0, 1.0, first_id=bounds[rank],
                             vocab_size=VOCAB, shards=shards)
        return constrained_canvas(regex_grammar(compiler), "r", hidden, argmax, sliced, candidates=candidates)

    for committed in ThreadRanks(ranks).run(work):
        assert torch.equal(committed, expected)


def test_a_completed_grammar_leaves_later_canvases_unconstrained(compiler):
    """Catches a request that ignores EOS crashing the worker after its grammar completed
    (xgrammar refuses to fill a mask once the stop token was accepted)."""
    hidden, unembedding, argmax = random_canvas(1)
    grammar = regex_grammar(compiler)
    constrained_canvas(grammar, "r", hidden, argmax, unembedding)
    assert grammar.is_terminated()
    assert torch.equal(constrained_canvas(grammar, "r", hidden, argmax, unembedding), argmax)


class Failing(AllowsEverything):
    def accept_tokens(self, request_id, tokens):
        raise RuntimeError("matcher fault")


def params(structured):
    """What CanvasGrammars.prepare reads of a request's sampling parameters."""
    return type("SamplingParams", (), {"structured_outputs": structured})()


def test_a_grammar_that_fails_in_the_worker_fails_only_its_request(monkeypatch, caplog):
    """Catches a grammar fault (one that cannot compile here, or a matcher that raises)
    escaping into the engine step, which kills the engine: the request's canvases commit
    unconstrained (vLLM's grammar check then ends it), logged once, and it is not retried;
    and grammars compiled for requests without structured outputs, or kept after they leave."""
    grammars = structured_commit.CanvasGrammars(vllm_config=None, vocab_size=VOCAB)
    compiled = []
    monkeypatch.setattr(grammars, "_compile", lambda req_id, p, reasoning: compiled.append(p)
                        or (Failing(), None, None, ReasoningBounds(None)))
    grammars.prepare([("r", params("spec"), None), ("plain", params(None), None), ("prompt only", None, None)])
    grammars.prepare([("r", params("spec"), None)])
    hidden, unembedding, argmax = random_canvas(3)
    assert torch.equal(grammars.commit("r", hidden, argmax, unembedding, [], []), argmax)
    assert grammars.grammars == {"r": None} and "matcher fault" in caplog.text and len(compiled) == 1
    assert torch.equal(grammars.commit("r", hidden, argmax, unembedding, [], []), argmax) and len(compiled) == 1
    assert [record.levelname for record in caplog.records if "failed in the worker" in record.getMessage()] == ["ERROR"]
    grammars.forget(["plain", "r"])
    assert grammars.grammars == {}


def test_ready_tells_a_compiling_grammar_from_a_compiled_or_failed_one(monkeypatch):
    """Catches a step that blocks on a grammar still compiling (the whole engine then waits
    for it), or one that holds a canvas whose grammar is ready or has failed (it would never
    commit); and a wait that returns before its time when nothing got ready."""
    grammars = structured_commit.CanvasGrammars(vllm_config=None, vocab_size=VOCAB)
    gate = threading.Event()
    monkeypatch.setattr(grammars, "_compile", lambda req_id, p, reasoning: gate.wait(30)
                        and (AllowsEverything(), None, None, ReasoningBounds(None)))
    grammars.prepare([("slow", params("spec"), None)])
    grammars.grammars["failed"] = None
    assert grammars.ready(["slow", "failed"]) == [False, True]
    started = time.perf_counter()
    assert grammars.ready(["slow"], wait=0.2) == [False] and time.perf_counter() - started >= 0.15
    gate.set()
    assert grammars.ready(["slow"], wait=5) == [True]
    grammars.forget(["slow"])
    assert grammars.grammars == {"failed": None}


def test_special_tokens_stay_out_of_a_structured_canvas_but_its_stop_tokens(compiler, tiny_dir):
    """Catches committed text that breaks its grammar once detokenized: xgrammar counts special
    tokens (here `<|channel>`, id 100) as their literal text, and the detokenizer drops them,
    so the walk must spell the grammar's text from ordinary tokens and keep the stop token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    special = structured_commit.special_ids(tokenizer, VOCAB)
    assert special[[0, 1, 100, 106]].all() and not special[200:].any()
    banned = special.clone()
    banned[1] = False
    generator = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(LENGTH, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)
    weight[100] = hidden.mean(0) * 50  # the model favours <|channel> everywhere
    unembedding = Unembedding(weight, softcap=30.0, scale=1.0)
    argmax = (hidden @ weight.T).argmax(-1)
    committed = constrained_canvas(regex_grammar(compiler, r"a<\|channel>b"), "r", hidden, argmax, unembedding, banned)
    text = committed[:committed.tolist().index(1)].tolist()
    assert 100 not in text and tokenizer.decode(text, skip_special_tokens=True) == "a<|channel>b"
    assert 100 in constrained_canvas(regex_grammar(compiler, r"a<\|channel>b"), "r", hidden, argmax, unembedding)


def test_a_grammar_that_allows_no_token_says_so(compiler):
    """Catches a walk that, with every allowed token banned (a stop token the grammar needs
    also given as a stop id), commits an arbitrary token and blames the grammar for refusing it."""
    hidden, unembedding, argmax = random_canvas(5)
    with pytest.raises(structured_commit.GrammarFault, match="allows no token"):
        constrained_canvas(regex_grammar(compiler, "a"), "r", hidden, argmax, unembedding,
                           torch.ones(VOCAB, dtype=torch.bool))


def test_bitmask_unpacks_as_xgrammar_applies_it(compiler):
    """Catches a bit order that allows the wrong tokens in the whole-vocabulary fallback."""
    grammar = regex_grammar(compiler)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    grammar.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, VOCAB)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    allowed = unpack(bitmask[0], VOCAB)
    assert torch.equal(allowed, logits[0].isfinite()) and 0 < allowed.sum() < VOCAB


def test_a_worker_in_the_engine_cores_process_shares_its_compiled_grammar(compiler):
    """Catches the worker compiling a grammar vLLM's engine core compiled in the same process
    (twice the CPU, and the request waits for the slower of two compiles), a shared matcher that
    the engine core's advances (or the reverse: the engine core checks every commit with its
    own), an engine-core compile error lost (it must fail the request's grammar here too), and
    a grammar of another vocabulary used instead of compiled here."""
    from concurrent.futures import Future

    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend
    from vllm.v1.structured_output.request import StructuredOutputRequest

    config = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB))
    grammars = structured_commit.CanvasGrammars(vllm_config=config, vocab_size=VOCAB)
    grammars.backend = object.__new__(XgrammarBackend)  # what _shared reads of vLLM's backend
    grammars.backend.vocab_size, grammars.backend.num_speculative_tokens = VOCAB, 0
    engine_request = StructuredOutputRequest(params=StructuredOutputsParams(regex=PATTERN))
    engine_request._grammar = Future()
    engine_request._grammar.set_result(regex_grammar(compiler))
    engine_grammar = engine_request._grammar.result()
    shared = grammars._shared(engine_request, stops=[1])
    assert shared.ctx is engine_grammar.ctx and shared.matcher is not engine_grammar.matcher
    start = xgr.allocate_token_bitmask(1, VOCAB)
    shared.fill_bitmask(start, 0)
    assert shared.accept_tokens("r", [int(unpack(start[0], VOCAB).nonzero()[0])])
    engine_state = xgr.allocate_token_bitmask(1, VOCAB)
    engine_grammar.fill_bitmask(engine_state, 0)
    assert torch.equal(engine_state, start)  # the engine core's matcher did not move
    engine_request._grammar = engine_grammar  # as vLLM's scheduler leaves it once collected
    assert grammars._shared(engine_request, stops=[1]).ctx is engine_grammar.ctx
    failed = StructuredOutputRequest(params=StructuredOutputsParams(regex="("))
    failed._grammar = Future()
    failed._grammar.set_exception(ValueError("the engine core could not compile it"))
    with pytest.raises(ValueError, match="could not compile"):
        grammars._shared(failed, stops=[1])
    never = StructuredOutputRequest(params=StructuredOutputsParams(regex=PATTERN))
    never._grammar = Future()  # an engine-core compile that has not ended: nothing may wait for it
    grammars.backend.vocab_size = VOCAB + 1  # another vocabulary: the worker compiles its own at once
    assert grammars._shared(never, stops=[1]) is None
    grammars.backend = object()  # not xgrammar (guidance): the same
    assert grammars._shared(never, stops=[1]) is None
