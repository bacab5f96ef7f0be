"""The playground page (GET /playground) in headless Chromium against a tiny-model server.

The browser is Debian's `chromium` (`make test` installs it where apt-get can, as root), driven
by testing/headless_chromium.py. Without a Chromium the browser test skips, saying so. The
server runs whole canvases per step (test_drafts_server.py covers `passes_per_step`).
"""

from __future__ import annotations

import struct
from urllib.parse import urlencode

import pytest
import requests

from diffusiongemma_vllm.testing.headless_chromium import HeadlessChromium, chromium_binary
from tests.test_drafts_server import NEVER_CONFIDENT, SERVE_SPEC, complete, split, start_server, stream_events

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffusiongemma_vllm.testing.tiny_checkpoint import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path_factory.mktemp("playground") / "model", SERVE_SPEC, seed=3)
    srv = start_server(model)
    yield srv
    srv.stop()


def test_playground_page_is_served(server):
    """Catches the page missing from the installed package or its route not attached."""
    response = requests.get(server.url + "/playground", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "diffusion_draft" in response.text and "/v1/completions" in response.text


def test_drafts_with_whole_canvas_steps(server):
    """Catches drafts that only work when canvases span steps: here each step runs whole
    canvases, and every pass of a canvas happens inside one step."""
    events = stream_events(server, prompt="Write", max_tokens=200, ignore_eos=True, seed=2, return_token_ids=True,
                           vllm_xargs={"draft_every": 2, **NEVER_CONFIDENT})
    drafts, own = split(events)
    assert [(d["block"], d["pass"]) for d in drafts] == [(0, 2), (0, 4), (0, 6), (0, 8)]
    assert drafts[-1]["token_ids"] == [i for e in own for c in e["choices"] for i in c.get("token_ids") or []]


def test_playground_shows_drafts_and_ends_with_the_completion(server, tmp_path):
    """Catches a page that does not parse the draft stream, shows no drafts, or assembles
    committed text that differs from the non-streamed completion of the same request; and a
    screenshot (the README's picture) that is not a PNG cut just below the page's content."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium; `make test` installs it as root)")
    pytest.importorskip("websockets", reason="the DevTools client (pip install websockets; in the [test] extra)")
    query = {"prompt": "Write an essay", "max_tokens": 300, "draft_every": 2, "max_denoising_steps": 8, "seed": 4,
             "autorun": 1}
    browser = HeadlessChromium(binary, str(tmp_path / "profile"))
    try:
        browser.call("Page.navigate", url=f"{server.url}/playground?{urlencode(query)}")
        outcome = browser.playground_outcome(timeout=300)
        assert outcome["state"] == "done", outcome["status"]
        final, drafts = outcome["final"], outcome["drafts"]
        history = browser.evaluate("document.querySelectorAll('.history div').length")
        content_bottom = browser.evaluate("document.getElementById('canvases').getBoundingClientRect().bottom")
        page_width = browser.evaluate("document.documentElement.scrollWidth")
        browser.screenshot(tmp_path / "playground.png")
    finally:
        browser.close()
    assert drafts == history > 0
    png = (tmp_path / "playground.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert png.startswith(b"\x89PNG") and width == page_width and content_bottom < height <= content_bottom + 32
    expected = complete(server, prompt="Write an essay", max_tokens=300, seed=4,
                        vllm_xargs={"max_denoising_steps": 8})["choices"][0]["text"]
    assert final == expected
