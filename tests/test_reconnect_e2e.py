"""The reconnecting client on real sockets, against a port where nothing listens.

Before, ``request(timeout=1)`` waited forever while the server was down (its timeout started
once connected), and ``when_connected(fail_after=N)`` failed with Twisted's
``ConnectionRefusedError``.  The script runs in a subprocess on the real reactor; the
subprocess timeout is the test's deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

SCRIPT = """
import json, sys
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from heartbeatd.client import ClientError, ReconnectingClient

async def outcome(d):
    try:
        await d
        return "connected"
    except ClientError as e:
        return type(e).__name__ + ": " + str(e)
    except Exception as e:
        return "UNTYPED " + type(e).__name__

async def main(reactor, port):
    client = ReconnectingClient(
        reactor, f"tcp:host=127.0.0.1:port={port}", backoff_initial=0.05, backoff_max=0.2
    )
    client.start()
    result = {
        "request": await outcome(client.request("echo", 1, timeout=1)),
        "fail_after": await outcome(client.when_connected(fail_after=2)),
        "timeout": await outcome(client.when_connected(timeout=0.5)),
    }
    waiting = client.when_connected()
    await client.stop()
    result["stopped"] = await outcome(waiting)
    print(json.dumps(result))

task.react(lambda reactor: ensureDeferred(main(reactor, int(sys.argv[1]))))
"""


def unused_port() -> int:
    """A port nothing listens on: bound by us for a moment, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_wait_of_the_reconnecting_client_ends_typed() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(unused_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["request"].startswith("NotConnected: not connected within 1s (last attempt: ")
    assert "refused" in result["request"]
    assert result["fail_after"].startswith("ConnectionFailed: could not connect: ")
    assert result["timeout"].startswith("NotConnected: not connected within 0.5s")
    # ClientStopped is a NotConnected (and a ConnectionClosed): one error for every wait stop ends
    assert result["stopped"].startswith("ClientStopped: the client was stopped")
