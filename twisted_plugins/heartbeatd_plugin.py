"""twistd plugin: `twistd heartbeatd`. Kept import-free so discovery never fails silently."""

from twisted.application.service import ServiceMaker

heartbeatd = ServiceMaker(
    "heartbeatd",
    "heartbeatd.daemon.tap",
    "Long-lived TCP connections with framed JSON messages and heartbeats.",
    "heartbeatd",
)
