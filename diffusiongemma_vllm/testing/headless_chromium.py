"""A headless Chromium driven over the DevTools protocol, for the playground page.

The browser is Debian's `chromium` (`make browser` installs it as root); the client is the
`websockets` package (the [test] extra), so no driver binary or browser download is needed.
tests/test_playground.py checks the page with it; examples/sudoku/playground_screenshot.py
takes the README's picture with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


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

    def playground_outcome(self, timeout: float) -> dict:
        """Waits for the playground page's run to end: its state ('done' or 'error', None on
        timeout), status line, committed text and number of drafts shown."""
        state = self.wait_for("['done', 'error'].includes(document.body?.dataset.state) && document.body.dataset.state",
                              timeout=timeout)
        return {"state": state or None, "status": self.evaluate("document.getElementById('status').textContent"),
                "final": self.evaluate("document.getElementById('final').textContent"),
                "drafts": int(self.evaluate("document.getElementById('final').dataset.drafts || 0"))}

    def screenshot(self, path: Path) -> None:
        """The page as a PNG, cut just below its lowest element, once its transitions end."""
        self.wait_for("document.getAnimations().every((a) => a.playState !== 'running')", timeout=10)
        height = self.evaluate("Math.ceil(Math.max(...Array.from(document.body.children,"
                               " (e) => e.getBoundingClientRect().bottom))) + 16")
        width = self.evaluate("document.documentElement.scrollWidth")
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        png = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(png))

    def close(self) -> None:
        if getattr(self, "connection", None) is not None:
            self.connection.close()
        self.process.terminate()
        self.process.wait(timeout=30)
