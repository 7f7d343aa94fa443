"""A real browser for tests: headless Chromium loading a page, and a server for such pages.

One place starts Chromium, so every browser test (the admin API's cross-site test, the
WebSocket client's) runs it with the same flags.  ``make test`` installs the Debian package
``chromium`` when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["chromium", "dump_dom", "serve_page"]

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
