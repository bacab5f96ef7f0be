"""Stop strings found in the engine core (engine/stop_strings.py), without an engine: where a
canvas is cut, against the text vLLM's detokenizer would have after each token. The engine
end to end: tests/test_generate_offline.py (no canvas denoised after the stop) and
tests/test_openai_server.py (the text)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer
from vllm import SamplingParams

from diffusiongemma_vllm.engine.stop_strings import StopStrings


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def first_stop(tokenizer, before: str, canvas: list[int], **params):
    stops = StopStrings(SimpleNamespace(skip_tokenizer_init=False, tokenizer=None))
    stops.tokenizer = tokenizer
    request = SimpleNamespace(sampling_params=SamplingParams(**params),
                              output_token_ids=tokenizer.encode(before, add_special_tokens=False))
    return stops.first_stop(request, canvas)


def test_the_canvas_is_cut_at_the_token_completing_the_earliest_stop(tokenizer):
    """Catches a cut after the wrong token (the request would lose text, or run on), a stop
    chosen otherwise than vLLM's detokenizer chooses it (the one completing first), a stop
    string straddling the previous canvas missed, and one found in the old text alone."""
    words = ["the", " river", " city", " is", " quiet"]
    pieces = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    canvas = sum(pieces, [])
    through = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    assert first_stop(tokenizer, "", canvas, stop=["quiet", "city"]) == (through[2], "city")
    fewest = min(k for k in range(len(canvas) + 1) if "is q" in tokenizer.decode(canvas[:k]))
    assert through[3] < fewest <= through[4] and first_stop(tokenizer, "", canvas, stop=["is q"]) == (fewest, "is q")
    assert first_stop(tokenizer, "a long riv", pieces[0] + [tokenizer.convert_tokens_to_ids("e")],
                      stop=["rivthe"]) == (len(pieces[0]), "rivthe")
    assert first_stop(tokenizer, "city", canvas[:through[0]], stop=["city"]) is None
    assert first_stop(tokenizer, "", canvas, stop=["ocean"]) is None


def test_a_character_counts_once_its_bytes_are_complete(tokenizer):
    """Catches a stop string found in text the detokenizer has not emitted yet (bytes that end
    no character): the engine would end the request, and the API server, not finding the
    string, would report `length` and keep the text; and U+FFFD stop strings searched at all."""
    first, second = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # "é" as two byte tokens
    canvas = tokenizer.encode("caf", add_special_tokens=False) + [first, second, first]
    assert first_stop(tokenizer, "", canvas, stop=["fé"]) == (len(canvas) - 1, "fé")
    assert first_stop(tokenizer, "", canvas[:-2], stop=["f\ufffd", "\ufffd"]) is None


def test_requests_without_stop_strings_are_left_alone(tokenizer):
    """Catches work (or a tokenizer load) for requests that need none."""
    canvas = tokenizer.encode("the city", add_special_tokens=False)
    assert first_stop(tokenizer, "", canvas) is None
    assert first_stop(tokenizer, "", [], stop=["city"]) is None


def test_stop_strings_count_only_past_min_tokens(tokenizer):
    """Catches the engine ending a request at a stop string vLLM's detokenizer ignores (one
    completed within the first `min_tokens` output tokens, counting earlier canvases), or
    missing one that ends past them."""
    words = ["the", " river", " city", " is", " quiet"]
    pieces = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    canvas = sum(pieces, [])
    through = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    stop = ["quiet", "city"]
    assert first_stop(tokenizer, "", canvas, stop=stop, min_tokens=through[2] - 1) == (through[2], "city")
    assert first_stop(tokenizer, "", canvas, stop=stop, min_tokens=through[2]) == (through[4], "quiet")
    before = tokenizer.encode("a b", add_special_tokens=False)
    assert first_stop(tokenizer, "a b", canvas, stop=stop, min_tokens=len(before) + through[2]) == (through[4], "quiet")
    assert first_stop(tokenizer, "", canvas, stop=stop, min_tokens=through[4]) is None
