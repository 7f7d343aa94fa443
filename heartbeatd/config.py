"""The daemon's configuration schema: every tunable, its default and its check.

Frozen dataclasses, checked by `heartbeatd._validation` (no YAML here: reading the file is
`heartbeatd.daemon.config`'s job).  The server takes a `Config`; so do the daemon's services.
Overrides from the command line are dotted keys (``heartbeat.interval``).
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from heartbeatd._validation import (
    ConfigError,
    boolean,
    build,
    check,
    int_range,
    module_names,
    non_empty_string,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_number,
)
from heartbeatd.wire import FRAMINGS
from heartbeatd.wire.envelope import DEFAULT_MAX_JSON_DEPTH

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "HeartbeatConfig",
    "LimitsConfig",
    "LogConfig",
    "SeedConfig",
    "ShutdownConfig",
    "TcpConfig",
    "parse_config",
]

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
#: File descriptors kept back from the connection limit for listeners, logs and the admin API.
FD_RESERVE = 64


# -- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: float = field(
        default=10.0, metadata=check(positive_number, "seconds between heartbeat sweeps")
    )
    timeout: float = field(
        default=30.0, metadata=check(positive_number, "silence after which a client is evicted")
    )
    sweep_batch: int = field(
        default=1000,
        metadata=check(int_range(1, 1_000_000), "clients handled per reactor turn in a sweep"),
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = field(
        default=0,
        metadata=check(non_negative_int, "0 means: the open-file limit minus a small reserve"),
    )
    max_outbound_buffer_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=check(int_range(1024, 2**40), "bytes queued to one slow reader before close"),
    )
    max_pending_requests: int = field(
        default=256,
        metadata=check(int_range(1, 1_000_000), "unanswered requests before reading pauses"),
    )
    frame_timeout: float = field(
        default=60.0,
        metadata=check(positive_number, "seconds a frame may take to arrive once it began"),
    )
    first_frame_timeout: float = field(
        default=10.0,
        metadata=check(
            non_negative_number, "seconds a new connection has to send a frame; 0 = no limit"
        ),
    )
    max_partial_frame_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=check(
            int_range(1024, 2**40), "bytes all connections' unfinished frames may hold together"
        ),
    )
    max_json_depth: int = field(
        default=DEFAULT_MAX_JSON_DEPTH,
        metadata=check(int_range(1, 250), "deepest nesting of arrays/objects accepted"),
    )


@dataclass(frozen=True)
class TcpConfig:
    nodelay: bool = field(default=True, metadata=check(boolean, "disable Nagle's algorithm"))
    direct_write: bool = field(
        default=True,
        metadata=check(boolean, "send replies at once when nothing is queued (faster)"),
    )
    lean_transport: bool = field(
        default=True,
        metadata=check(
            boolean, "accept into heartbeatd's leaner TCP transport and read dispatch (faster)"
        ),
    )
    keepalive: bool = field(default=True, metadata=check(boolean, "enable TCP keepalive"))
    keepalive_idle: float = field(
        default=60.0, metadata=check(positive_number, "idle seconds before the first probe")
    )
    keepalive_interval: float = field(
        default=10.0, metadata=check(positive_number, "seconds between keepalive probes")
    )
    keepalive_count: int = field(
        default=5, metadata=check(int_range(1, 127), "unanswered probes before the kernel drops")
    )
    user_timeout: float = field(
        default=60.0,
        metadata=check(non_negative_number, "TCP_USER_TIMEOUT seconds for unacked data"),
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=check(one_of(*LOG_LEVELS), "minimum level"))
    format: str = field(
        default="text",
        metadata=check(one_of("text", "json"), "text, or json: one event per line"),
    )
    rate_limit_lines: int = field(
        default=10,
        metadata=check(
            int_range(1, 1_000_000), "lines per cause and window for per-event log lines"
        ),
    )
    rate_limit_window: float = field(
        default=10.0,
        metadata=check(positive_number, "seconds; then one 'N more suppressed' line per cause"),
    )


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float = field(
        default=10.0,
        metadata=check(non_negative_number, "seconds clients get to leave after goaway"),
    )
    reconnect_after: float = field(
        default=5.0,
        metadata=check(non_negative_number, "window clients spread their reconnects over"),
    )
    close_timeout: float = field(
        default=5.0,
        metadata=check(positive_number, "seconds clients get to close before being aborted"),
    )


@dataclass(frozen=True)
class AdminConfig:
    listen: str = field(
        default="tcp:9100:interface=127.0.0.1",
        metadata=check(
            lambda v: None if isinstance(v, str) else "a server endpoint string, or '' for off",
            "admin HTTP API endpoint; empty turns the API off",
        ),
    )
    token: str = field(
        default="",
        metadata=check(
            lambda v: None if isinstance(v, str) else "a string", "bearer token; empty: none"
        ),
    )

    def __repr__(self) -> str:  # never show the token in logs or diffs
        return f"AdminConfig(listen={self.listen!r}, token={'***' if self.token else ''!r})"


@dataclass(frozen=True)
class SeedConfig:
    message_type: str = field(
        default="message",
        metadata=check(non_empty_string, "handler type that receives bare (non-envelope) values"),
    )


@dataclass(frozen=True)
class Config:
    name: str = field(
        default="heartbeatd", metadata=check(non_empty_string, "server name sent in hello")
    )
    listen: str = field(
        default="tcp:9000:interface=127.0.0.1:backlog=1024",
        metadata=check(non_empty_string, "a Twisted server endpoint string"),
    )
    framing: str = field(
        default="int32", metadata=check(lambda v: one_of(*sorted(FRAMINGS))(v), "wire framing")
    )
    max_frame_bytes: int = field(
        default=1024 * 1024,
        metadata=check(int_range(16, 2**32 - 1), "largest frame body accepted, in bytes"),
    )
    handlers: tuple[str, ...] = field(
        default=(), metadata=check(module_names, "modules whose register(registry) is called")
    )
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def effective_max_connections(self) -> int:
        """The connection limit, reading the process's open-file limit when set to 0."""
        if self.limits.max_connections:
            return self.limits.max_connections
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1_000_000
        return max(1, soft - FD_RESERVE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "heartbeat": HeartbeatConfig,
    "limits": LimitsConfig,
    "tcp": TcpConfig,
    "log": LogConfig,
    "shutdown": ShutdownConfig,
    "seed": SeedConfig,
    "admin": AdminConfig,
}


def _cross_checks(config: Config, errors: list[str]) -> None:
    hb = config.heartbeat
    if hb.timeout <= hb.interval:
        errors.append(
            f"heartbeat.timeout: {hb.timeout:g} is not allowed; expected a number greater than "
            f"heartbeat.interval ({hb.interval:g}), so a client is pinged before eviction"
        )


def parse_config(raw: Any, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a `Config` from parsed YAML plus dotted-key overrides; raise `ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"<top level>: expected a mapping of keys, got {type(raw).__name__}"])
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        target = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    errors: list[str] = []
    config = build(Config, merged, "", errors, _SECTIONS)
    if config is not None and not errors:
        _cross_checks(config, errors)
    if errors:
        raise ConfigError(errors)
    return config
