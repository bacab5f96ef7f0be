"""The playground page (GET /playground) in headless Chromium against a tiny-model server.

The browser is Debian's `chromium` (`make test` installs it where apt-get can, as root); it is
driven over the DevTools protocol with the `websockets` client, so no driver binary or browser
download is needed. Without a Chromium the browser test skips, saying so. The server runs
whole canvases per step (test_drafts_server.py covers `passes_per_step`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from urllib.parse import urlencode

import pytest
import requests

from tests.test_drafts_server import NEVER_CONFIDENT, SERVE_SPEC, complete, split, start_server, stream_events

pytestmark = pytest.mark.engine

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class HeadlessChromium:
    """A headless Chromium and its one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: str, width: int = 1100, height: int = 900):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not open its DevTools port")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        self.connection = contextlib.ExitStack()
        self.socket = self.connection.enter_context(
            connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None))
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def close(self) -> None:
        if getattr(self, "connection", None) is not None:
            self.connection.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def chromium_binary() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


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
    committed text that differs from the non-streamed completion of the same request."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium; `make test` installs it as root)")
    pytest.importorskip("websockets", reason="the DevTools client (pip install websockets; in the [test] extra)")
    query = {"prompt": "Write an essay", "max_tokens": 300, "draft_every": 2, "max_denoising_steps": 8, "seed": 4,
             "autorun": 1}
    browser = HeadlessChromium(binary, str(tmp_path / "profile"))
    try:
        browser.call("Page.navigate", url=f"{server.url}/playground?{urlencode(query)}")
        state = browser.wait_for("['done', 'error'].includes(document.body?.dataset.state) && document.body.dataset.state",
                                 timeout=300)
        status = browser.evaluate("document.getElementById('status').textContent")
        assert state == "done", status
        final = browser.evaluate("document.getElementById('final').textContent")
        drafts = int(browser.evaluate("document.getElementById('final').dataset.drafts"))
        history = browser.evaluate("document.querySelectorAll('.history div').length")
    finally:
        browser.close()
    assert drafts == history > 0
    expected = complete(server, prompt="Write an essay", max_tokens=300, seed=4,
                        vllm_xargs={"max_denoising_steps": 8})["choices"][0]["text"]
    assert final == expected
