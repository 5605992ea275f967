"""Headless Chromium for tests that load a web page: Debian's `chromium`, driven over the DevTools protocol.

    with HeadlessChromium(tmp_path / "profile") as browser:
        browser.load("http://127.0.0.1:8000/")
        browser.fill("#prompt", "Hello")
        browser.click("#send")
        browser.wait_until("document.body.dataset.state === 'idle'", timeout=60, what="the reply")
        text = browser.evaluate("document.querySelector('.reply').textContent")
        print(browser.screenshot(tmp_path / "page.png"))

`require_chromium()` installs Debian's `chromium` package when it is missing and the tests run as root (as
tests/prometheus_tools.py does for Prometheus); elsewhere the calling test is skipped, saying why. The browser
runs in a process group of its own (swarm.process.SwarmProcess), and the whole group is killed at the end, so
no renderer or zygote process outlives a test. No npm tooling is needed: the DevTools protocol is JSON over one
websocket (the `websocket-client` package).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import websocket

from swarm.process import SwarmProcess
from tests.debian_packages import require_debian_package

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_TIMEOUT_SECONDS = 600  # the package and its libraries are a few hundred MB
START_TIMEOUT_SECONDS = 60.0
DEVTOOLS_LINE = r"DevTools listening on (ws://\S+)"


class BrowserError(RuntimeError):
    """The page or the browser failed: a JavaScript exception, a failed navigation, a condition never met."""


def require_chromium() -> str:
    """Path of the `chromium` binary, installing Debian's `chromium` package if needed and possible."""
    return require_debian_package("chromium", _find_chromium, INSTALL_TIMEOUT_SECONDS)


def _find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class HeadlessChromium:
    """One headless Chromium with one tab, driven over the DevTools protocol; a context manager that always kills
    the browser's process group on exit.

    `profile_dir` holds the browser's profile (use a fresh temporary directory). Messages the page logs to its
    console and uncaught exceptions are kept in `console`, and quoted when a wait times out.
    """

    def __init__(self, profile_dir: Path, *, width: int = 1280, height: int = 900, call_timeout: float = 30.0) -> None:
        binary = require_chromium()
        self.console: list[str] = []
        self._next_id = 0
        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--no-default-browser-check", f"--window-size={width},{height}",
            f"--user-data-dir={profile_dir}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank",
        ]  # fmt: skip
        self.process = SwarmProcess(args, name="chromium")
        try:
            browser_url = self.process.wait_for_line(DEVTOOLS_LINE, START_TIMEOUT_SECONDS, stream="stderr").group(1)
            page = self._new_tab(browser_url)
            # No Origin header: Chromium refuses DevTools connections from origins it was not told to allow.
            self._socket = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=call_timeout, suppress_origin=True
            )
            self.call("Runtime.enable")
            self.call("Page.enable")
        except BaseException:
            self.process.kill()
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are noted or dropped."""
        self._next_id += 1
        request_id = self._next_id
        self._socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            self._note_event(message)

    def load(self, url: str, timeout: float = 30.0) -> None:
        """Open `url` in the tab and wait until the document and its resources have loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"loading {url} failed: {result['errorText']}")
        self.wait_until("document.readyState === 'complete'", timeout, f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited; the value must be JSON)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {description}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float, what: str, interval: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy and return its value; BrowserError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                console = "\n".join(self.console[-20:]) or "(nothing)"
                raise BrowserError(
                    f"timed out after {timeout:.0f} s waiting for {what}; the page's console:\n{console}"
                )
            time.sleep(interval)
        return value

    def fill(self, selector: str, text: str) -> None:
        """Focus the element and type `text` into it as keyboard input would (input events included)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> Path:
        """Save what the tab shows as a PNG file and return its path."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Close the connection and kill the browser's whole process group."""
        with contextlib.suppress(Exception):  # a broken connection: the browser is killed below anyway
            self._socket.close()
        self.process.kill()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _new_tab(self, browser_url: str) -> dict[str, Any]:
        """Open a blank tab through the HTTP endpoint beside the browser's websocket (`ws://HOST:PORT/devtools/...`)."""
        host_port = browser_url.removeprefix("ws://").split("/", 1)[0]
        request = urllib.request.Request(f"http://{host_port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=START_TIMEOUT_SECONDS) as response:
            return json.loads(response.read())

    def _note_event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            values = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
            self.console.append(f"console.{params.get('type')}: {' '.join(values)}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
