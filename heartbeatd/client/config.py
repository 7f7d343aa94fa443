"""A client program's pool settings (`PoolConfig`), checked like the daemon's config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heartbeatd._validation import (
    ConfigError,
    boolean,
    build,
    check,
    int_range,
    is_number,
    non_empty_string,
    non_negative_number,
    one_of,
    positive_number,
    string,
)
from heartbeatd.wire import FRAMINGS

__all__ = ["PoolConfig", "load_pool_config", "parse_pool_config"]


@dataclass(frozen=True)
class PoolConfig:
    """A client program's ``pool:`` section (see `heartbeatd.client.pool.Pool`)."""

    endpoint: str | tuple[str, ...] = field(
        default="tcp:host=127.0.0.1:port=9000",
        metadata=check(
            lambda v: endpoint_strings(v),
            "a Twisted client endpoint string, or a list of them (the nodes of a cluster: "
            "tried in turn, new connections spread over the healthy ones)",
        ),
    )
    framing: str = field(
        default="int32", metadata=check(lambda v: one_of(*sorted(FRAMINGS))(v), "wire framing")
    )
    min_idle: int = field(
        default=1, metadata=check(int_range(0, 100_000), "idle connections kept ready")
    )
    max_size: int = field(
        default=8, metadata=check(int_range(1, 100_000), "most connections, idle plus in use")
    )
    acquire_timeout: float = field(
        default=5.0, metadata=check(positive_number, "seconds a borrower waits at most")
    )
    max_waiters: int = field(
        default=1000, metadata=check(int_range(0, 10_000_000), "queued borrowers before failing")
    )
    idle_timeout: float = field(
        default=300.0,
        metadata=check(non_negative_number, "seconds idle before closing down to min_idle"),
    )
    max_lifetime: float = field(
        default=1800.0,
        metadata=check(non_negative_number, "seconds before a connection is recycled"),
    )
    lifetime_jitter: float = field(
        default=0.1,
        metadata=check(
            lambda v: None if is_number(v) and 0 <= v < 1 else "a fraction 0 <= x < 1",
            "spread of max_lifetime, so connections do not all expire together",
        ),
    )
    ping_on_borrow_after: float = field(
        default=0.0,
        metadata=check(non_negative_number, "ping before lending if idle this long; 0 = never"),
    )
    request_timeout: float = field(
        default=10.0, metadata=check(positive_number, "default seconds a request may take")
    )
    connect_timeout: float = field(
        default=5.0, metadata=check(positive_number, "seconds to connect and receive the hello")
    )
    backoff_initial: float = field(
        default=0.1, metadata=check(positive_number, "first reconnect delay cap, seconds")
    )
    backoff_max: float = field(
        default=10.0, metadata=check(positive_number, "largest reconnect delay, seconds")
    )
    probe_interval: float = field(
        default=0.5,
        metadata=check(
            non_negative_number,
            "while the server is down and callers ask for connections, the longest wait "
            "between probes (full jitter below it); 0 = backoff_max only",
        ),
    )
    fail_fast: bool = field(
        default=False,
        metadata=check(
            boolean, "while the server is known down, fail at once with PoolUnavailable"
        ),
    )
    leak_threshold: float = field(
        default=60.0,
        metadata=check(non_negative_number, "warn when a connection is held longer; 0 = never"),
    )
    resumable: bool = field(
        default=False,
        metadata=check(
            boolean, "the subscription connection keeps a resumable session across reconnects"
        ),
    )
    subscribe_retry_timeout: float = field(
        default=60.0,  # reconnect.DEFAULT_SUBSCRIBE_RETRY_TIMEOUT (a test keeps them equal)
        metadata=check(
            positive_number,
            "seconds a subscribe answered unavailable or rate_limited is retried before it "
            "fails; .inf = for ever",
        ),
    )
    session_retry_timeout: float = field(
        default=60.0,  # session.DEFAULT_RETRY_TIMEOUT (a test keeps them equal)
        metadata=check(
            positive_number,
            "seconds a resume or session start answered unavailable is retried before what "
            "waits in the session fails; .inf = for ever",
        ),
    )
    # -- TLS and authentication (heartbeatd.client.tls); '' = not used --
    tls_ca: str = field(
        default="", metadata=check(string, "PEM CA file: connect with TLS, verify the server")
    )
    tls_certificate: str = field(
        default="", metadata=check(string, "PEM client certificate for mutual TLS")
    )
    tls_private_key: str = field(default="", metadata=check(string, "PEM key of tls_certificate"))
    tls_hostname: str = field(
        default="", metadata=check(string, "name the server certificate must carry")
    )
    token_file: str = field(
        default="", metadata=check(string, "file holding the token sent on each connection")
    )

    def __post_init__(self) -> None:
        if isinstance(self.endpoint, list):  # from YAML: kept as a tuple, like every list
            object.__setattr__(self, "endpoint", tuple(self.endpoint))

    @property
    def endpoints(self) -> tuple[str, ...]:
        """``endpoint`` as a tuple, one or several."""
        return (self.endpoint,) if isinstance(self.endpoint, str) else tuple(self.endpoint)


def endpoint_strings(value: Any) -> str | None:
    """One endpoint string, or a non-empty list of them."""
    if isinstance(value, (list, tuple)):
        if value and all(non_empty_string(v) is None for v in value):
            return None
        return "a non-empty list of endpoint strings"
    return non_empty_string(value)


def parse_pool_config(raw: Any) -> PoolConfig:
    """Validate a ``pool:`` mapping (from YAML); raise `ConfigError` naming ``pool.<key>``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"pool: {raw!r} is not allowed; expected a mapping of keys"])
    errors: list[str] = []
    config = build(PoolConfig, raw, "pool.", errors)
    if config is not None and not errors and config.min_idle > config.max_size:
        errors.append(
            f"pool.min_idle: {config.min_idle} is not allowed; expected at most "
            f"pool.max_size ({config.max_size})"
        )
    if config is not None and not errors and config.backoff_initial > config.backoff_max:
        errors.append(
            f"pool.backoff_initial: {config.backoff_initial} is not allowed; expected at most "
            f"pool.backoff_max ({config.backoff_max})"
        )
    if errors:
        raise ConfigError(errors)
    return config


def load_pool_config(path: str | Path) -> PoolConfig:
    """Read the ``pool:`` section of a YAML file."""
    import yaml  # here, not at module level: `import heartbeatd.client.connection` loads no YAML

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
