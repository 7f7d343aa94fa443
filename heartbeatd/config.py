"""Configuration: built-in defaults, overridden by the YAML file, overridden by the command line.

Everything is checked before anything listens.  Every problem is reported at once, one line
each, naming the key path, the bad value and what is allowed (``heartbeat.interval: -1 is not
allowed; expected a number > 0``).  Unknown keys are errors too, with the closest known key
suggested, because a misspelt tunable silently ignored is worse than a refused start.
"""

from __future__ import annotations

import dataclasses
import difflib
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heartbeatd.framings import FRAMINGS

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "HeartbeatConfig",
    "LimitsConfig",
    "LogConfig",
    "PoolConfig",
    "SeedConfig",
    "ShutdownConfig",
    "TcpConfig",
    "load_config",
    "load_pool_config",
    "parse_config",
    "parse_pool_config",
]

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
#: File descriptors kept back from the connection limit for listeners, logs and the admin API.
FD_RESERVE = 64


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds one human-readable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- value checks: each returns None when fine, else the "expected ..." text ----------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "a number > 0"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "a number >= 0 (0 disables)"


def int_range(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if _is_int(value) and low <= value <= high else f"an integer {low}..{high}"

    return check


def non_negative_int(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "an integer >= 0"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(choices)

    return check


def non_empty_string(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def module_names(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(v, str) and v and all(part.isidentifier() for part in v.split("."))
        for v in value
    )
    return None if ok else "a list of dotted module names, e.g. [mypkg.handlers]"


def _check(fn: Callable[[Any], str | None], doc: str) -> dict[str, Any]:
    return {"check": fn, "doc": doc}


# -- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: float = field(
        default=10.0, metadata=_check(positive_number, "seconds between heartbeat sweeps")
    )
    timeout: float = field(
        default=30.0, metadata=_check(positive_number, "silence after which a client is evicted")
    )
    sweep_batch: int = field(
        default=1000,
        metadata=_check(int_range(1, 1_000_000), "clients handled per reactor turn in a sweep"),
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = field(
        default=0,
        metadata=_check(non_negative_int, "0 means: the open-file limit minus a small reserve"),
    )
    max_outbound_buffer_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=_check(int_range(1024, 2**40), "bytes queued to one slow reader before close"),
    )
    max_pending_requests: int = field(
        default=256,
        metadata=_check(int_range(1, 1_000_000), "unanswered requests before reading pauses"),
    )


@dataclass(frozen=True)
class TcpConfig:
    nodelay: bool = field(default=True, metadata=_check(boolean, "disable Nagle's algorithm"))
    direct_write: bool = field(
        default=True,
        metadata=_check(boolean, "send replies at once when nothing is queued (faster)"),
    )
    keepalive: bool = field(default=True, metadata=_check(boolean, "enable TCP keepalive"))
    keepalive_idle: float = field(
        default=60.0, metadata=_check(positive_number, "idle seconds before the first probe")
    )
    keepalive_interval: float = field(
        default=10.0, metadata=_check(positive_number, "seconds between keepalive probes")
    )
    keepalive_count: int = field(
        default=5, metadata=_check(int_range(1, 127), "unanswered probes before the kernel drops")
    )
    user_timeout: float = field(
        default=60.0,
        metadata=_check(non_negative_number, "TCP_USER_TIMEOUT seconds for unacked data"),
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=_check(one_of(*LOG_LEVELS), "minimum level"))
    format: str = field(
        default="text",
        metadata=_check(one_of("text", "json"), "text, or json: one event per line"),
    )


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float = field(
        default=10.0,
        metadata=_check(non_negative_number, "seconds clients get to leave after goaway"),
    )
    reconnect_after: float = field(
        default=5.0,
        metadata=_check(non_negative_number, "window clients spread their reconnects over"),
    )
    close_timeout: float = field(
        default=5.0,
        metadata=_check(positive_number, "seconds clients get to close before being aborted"),
    )


@dataclass(frozen=True)
class AdminConfig:
    listen: str = field(
        default="tcp:9100:interface=127.0.0.1",
        metadata=_check(
            lambda v: None if isinstance(v, str) else "a server endpoint string, or '' for off",
            "admin HTTP API endpoint; empty turns the API off",
        ),
    )
    token: str = field(
        default="",
        metadata=_check(
            lambda v: None if isinstance(v, str) else "a string", "bearer token; empty: none"
        ),
    )

    def __repr__(self) -> str:  # never show the token in logs or diffs
        return f"AdminConfig(listen={self.listen!r}, token={'***' if self.token else ''!r})"


@dataclass(frozen=True)
class SeedConfig:
    message_type: str = field(
        default="message",
        metadata=_check(non_empty_string, "handler type that receives bare (non-envelope) values"),
    )


@dataclass(frozen=True)
class Config:
    name: str = field(
        default="heartbeatd", metadata=_check(non_empty_string, "server name sent in hello")
    )
    listen: str = field(
        default="tcp:9000:interface=127.0.0.1:backlog=1024",
        metadata=_check(non_empty_string, "a Twisted server endpoint string"),
    )
    framing: str = field(
        default="int32", metadata=_check(lambda v: one_of(*sorted(FRAMINGS))(v), "wire framing")
    )
    max_frame_bytes: int = field(
        default=1024 * 1024,
        metadata=_check(int_range(16, 2**32 - 1), "largest frame body accepted, in bytes"),
    )
    handlers: tuple[str, ...] = field(
        default=(), metadata=_check(module_names, "modules whose register(registry) is called")
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


def _build(cls: type, raw: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    """Check ``raw`` against ``cls``'s fields, appending errors; return an instance or None."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            allowed = ", ".join(fields)
            errors.append(f"{prefix}{key}: unknown key (known keys: {allowed}){hint}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        value = raw[name]
        path = prefix + name
        section = _SECTIONS.get(name) if cls is Config else None
        if section is not None:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{path}: {value!r} is not allowed; expected a mapping of keys")
                continue
            values[name] = _build(section, value, path + ".", errors)
            continue
        expected = f.metadata["check"](value)
        if expected is not None:
            errors.append(f"{path}: {value!r} is not allowed; expected {expected}")
            continue
        if name == "handlers":
            value = tuple(value)
        elif isinstance(f.default, float) and _is_int(value):
            value = float(value)
        values[name] = value
    if any(v is None for v in values.values()):
        return None
    return cls(**values)


@dataclass(frozen=True)
class PoolConfig:
    """A client program's ``pool:`` section (see `heartbeatd.pool.Pool`)."""

    endpoint: str = field(
        default="tcp:host=127.0.0.1:port=9000",
        metadata=_check(non_empty_string, "a Twisted client endpoint string"),
    )
    framing: str = field(
        default="int32", metadata=_check(lambda v: one_of(*sorted(FRAMINGS))(v), "wire framing")
    )
    min_idle: int = field(
        default=1, metadata=_check(int_range(0, 100_000), "idle connections kept ready")
    )
    max_size: int = field(
        default=8, metadata=_check(int_range(1, 100_000), "most connections, idle plus in use")
    )
    acquire_timeout: float = field(
        default=5.0, metadata=_check(positive_number, "seconds a borrower waits at most")
    )
    max_waiters: int = field(
        default=1000, metadata=_check(int_range(0, 10_000_000), "queued borrowers before failing")
    )
    idle_timeout: float = field(
        default=300.0,
        metadata=_check(non_negative_number, "seconds idle before closing down to min_idle"),
    )
    max_lifetime: float = field(
        default=1800.0,
        metadata=_check(non_negative_number, "seconds before a connection is recycled"),
    )
    lifetime_jitter: float = field(
        default=0.1,
        metadata=_check(
            lambda v: None if _is_number(v) and 0 <= v < 1 else "a fraction 0 <= x < 1",
            "spread of max_lifetime, so connections do not all expire together",
        ),
    )
    ping_on_borrow_after: float = field(
        default=0.0,
        metadata=_check(non_negative_number, "ping before lending if idle this long; 0 = never"),
    )
    request_timeout: float = field(
        default=10.0, metadata=_check(positive_number, "default seconds a request may take")
    )
    connect_timeout: float = field(
        default=5.0, metadata=_check(positive_number, "seconds to connect and receive the hello")
    )
    backoff_initial: float = field(
        default=0.1, metadata=_check(positive_number, "first reconnect delay cap, seconds")
    )
    backoff_max: float = field(
        default=10.0, metadata=_check(positive_number, "largest reconnect delay, seconds")
    )
    leak_threshold: float = field(
        default=60.0,
        metadata=_check(non_negative_number, "warn when a connection is held longer; 0 = never"),
    )


def parse_pool_config(raw: Any) -> PoolConfig:
    """Validate a ``pool:`` mapping (from YAML); raise `ConfigError` naming ``pool.<key>``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"pool: {raw!r} is not allowed; expected a mapping of keys"])
    errors: list[str] = []
    config = _build(PoolConfig, raw, "pool.", errors)
    if config is not None and not errors and config.min_idle > config.max_size:
        errors.append(
            f"pool.min_idle: {config.min_idle} is not allowed; expected at most "
            f"pool.max_size ({config.max_size})"
        )
    if errors:
        raise ConfigError(errors)
    return config


def load_pool_config(path: str | Path) -> PoolConfig:
    """Read the ``pool:`` section of a YAML file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file {str(p)!r} does not exist"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {e}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping of keys"])
    return parse_pool_config(raw.get("pool"))


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
    config = _build(Config, merged, "", errors)
    if config is not None and not errors:
        _cross_checks(config, errors)
    if errors:
        raise ConfigError(errors)
    return config


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a YAML file (None means built-in defaults) plus overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"config file {str(p)!r} does not exist"]) from None
        except OSError as e:
            raise ConfigError([f"config file {str(p)!r} cannot be read: {e.strerror}"]) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {str(p)!r} is not valid YAML: {e}"]) from None
    return parse_config(raw, overrides)
