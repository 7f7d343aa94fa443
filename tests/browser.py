"""A real browser for tests: headless Chromium loading a page, and a server for such pages.

One place starts Chromium, so every browser test (the admin API's cross-site test, the
WebSocket client's) runs it with the same flags.  ``make test`` installs the Debian package
``chromium`` when it is missing.

`dump_dom` loads a page and returns its DOM; `DevToolsBrowser` keeps Chromium running and
drives it over the DevTools protocol (``--remote-debugging-port=0``, the address read from its
stderr, the protocol's WebSocket through `wsclient.WSClient`), for tests that act on a page
while it runs: evaluate JavaScript in it (promises awaited), read its console, screenshot it.
"""

from __future__ import annotations

import base64
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from wsclient import WSClient

__all__ = ["BrowserError", "DevToolsBrowser", "Page", "chromium", "dump_dom", "serve_page"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def chromium() -> str:
    """The Chromium binary; fails (never skips) when missing: `make test` installs it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        "chromium is not installed; run `make chromium` (Debian: apt-get install chromium)"
    )


def dump_dom(url: str, budget_ms: int = 5000, timeout: float = 60) -> str:
    """Load ``url`` in headless Chromium, let the page run ``budget_ms`` of virtual time, and
    return the resulting DOM."""
    with tempfile.TemporaryDirectory(prefix="hb-chromium-") as profile:
        result = subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@contextmanager
def serve_page(html: str) -> Iterator[str]:
    """Serve ``html`` at ``/`` on a fresh loopback port (another origin); yields its URL."""
    body = html.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


DEVTOOLS = re.compile(r"DevTools listening on ws://127\.0\.0\.1:(\d+)(/devtools/browser/\S+)")
DEVTOOLS_FLAGS = ("--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class BrowserError(AssertionError):
    """A DevTools call failed, or the page's JavaScript threw; carries the page's console."""


class Page:
    """One tab: `evaluate` JavaScript in it (promises awaited), `screenshot` it."""

    def __init__(self, browser: DevToolsBrowser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}\n{self.browser.console_text()}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))


class DevToolsBrowser:
    """``with DevToolsBrowser(profile_dir) as browser: page = browser.open(url)``."""

    def __init__(self, profile: Path, timeout: float = 30) -> None:
        self.profile = profile
        self.timeout = timeout
        self.process: subprocess.Popen[str] | None = None
        self.ws: WSClient | None = None
        self._ids = 0
        self._events: list[dict[str, Any]] = []
        self._stderr: list[str] = []

    def __enter__(self) -> DevToolsBrowser:
        binary = chromium()
        self.profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, *FLAGS, *DEVTOOLS_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self._stderr.append(line.rstrip())
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
                if line is None:
                    raise BrowserError("chromium exited:\n" + "\n".join(self._stderr))
                if match := DEVTOOLS.search(line):
                    break
            self.ws = WSClient(int(match.group(1)), path=match.group(2), timeout=self.timeout)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ws is not None:
            self.ws.sock.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result; events on the way are kept."""
        assert self.ws is not None
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(message)
        while True:
            answer = self.ws.recv()
            if answer is None:
                raise BrowserError(f"the DevTools connection closed during {method}")
            if answer.get("id") == self._ids:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self._events.append(answer)

    def wait_event(self, method: str, session: str | None = None) -> dict[str, Any]:
        """The next event ``method`` (of ``session``), reading within the socket's timeout."""
        assert self.ws is not None
        for i, event in enumerate(self._events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self._events.pop(i)
        while True:
            event = self.ws.recv()
            if event is None:
                raise BrowserError(f"the DevTools connection closed waiting for {method}")
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            self._events.append(event)

    def open(self, url: str) -> Page:
        """A new tab at ``url``, returned once its load event fired."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", page.session)
        return page

    def console_text(self) -> str:
        """What the pages logged or threw so far, for failure messages."""
        out = []
        for event in self._events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                out.append(f"console.{params.get('type')}: {args}")
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description')}")
        return "\n".join(out) or "(the page logged nothing)"
