"""The daemon's configuration schema: every tunable, its default and its check.

Frozen dataclasses, checked by `heartbeatd._validation` (no YAML here: reading the file is
`heartbeatd.daemon.config`'s job).  The server takes a `Config`; so do the daemon's services.
Overrides from the command line are dotted keys (``heartbeat.interval``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from heartbeatd._validation import (
    ConfigError,
    boolean,
    build,
    check,
    hidden,
    int_range,
    ip_networks,
    is_int,
    module_names,
    non_empty_string,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_number,
    redact_url,
    shown_url,
    string,
)
from heartbeatd.wire import FRAMINGS
from heartbeatd.wire.envelope import DEFAULT_MAX_JSON_DEPTH

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "ChannelsConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "HeartbeatConfig",
    "JwtConfig",
    "LimitsConfig",
    "LogConfig",
    "MallocConfig",
    "NamespaceConfig",
    "SeedConfig",
    "SentinelConfig",
    "SessionsConfig",
    "ShutdownConfig",
    "TcpConfig",
    "TlsConfig",
    "WebSocketConfig",
    "endpoint_is_loopback",
    "parse_config",
]

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
TLS_VERSIONS = ("1.2", "1.3")
AUTH_MODES = ("none", "token", "custom", "jwt")
#: What a client certificate's identity is made of (tls.client_identity).
CLIENT_IDENTITIES = ("subject", "issuer_and_subject")
#: File descriptors kept back from the connection limit: listeners, logs, the admin API and
#: its connections, Redis, the reactor's own, and refused connections still being answered.
FD_RESERVE = 64
#: With ``limits.max_connections`` 0, fewer connections than this from the open-file limit is
#: most likely a forgotten ``LimitNOFILE=`` (or a shell's ``ulimit -n`` of 1024): warned of.
LOW_CONNECTION_LIMIT = 1024
#: Most worker processes (``workers``); far more than cores is never useful.
MAX_WORKERS = 256
#: Listeners a worker can adopt from its supervisor: plain stream sockets (see workers.py).
WORKER_LISTEN_PREFIXES = ("tcp:", "tcp6:", "systemd:")


def _is_entry_point(value: object) -> bool:
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    module, name = value.split(":")
    return all(p.isidentifier() for p in module.split(".")) and name.isidentifier()


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
    # -- per-address admission (heartbeatd.server.admission) --
    max_connections_per_address: int = field(
        default=4096,
        metadata=check(non_negative_int, "connections one client address may hold; 0 = no limit"),
    )
    accepts_per_second_per_address: float = field(
        default=100.0,
        metadata=check(non_negative_number, "new connections per second from one address"),
    )
    accept_burst_per_address: int = field(
        default=500,
        metadata=check(int_range(1, 10_000_000), "connections one address may open at once"),
    )
    ipv6_prefix_per_address: int = field(
        default=64,
        metadata=check(int_range(1, 128), "IPv6 clients are counted per network of this size"),
    )
    max_connections_per_identity: int = field(
        default=0,
        metadata=check(
            non_negative_int,
            "connections one identity may hold (cluster-wide with cluster.redis); 0 = no limit",
        ),
    )
    per_address_exempt: tuple[str, ...] = field(
        default=("127.0.0.1", "::1"),
        metadata=check(ip_networks, "addresses/networks the per-address limits skip"),
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


#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2), where its own sliding
#: threshold stops.
MALLOC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: glibc's own starting M_MMAP_THRESHOLD: below it, more blocks would be mapped, not fewer.
MALLOC_MMAP_THRESHOLD_MIN = 128 * 1024


def _mmap_threshold(value: Any) -> str | None:
    if is_int(value) and (
        value == 0 or MALLOC_MMAP_THRESHOLD_MIN <= value <= MALLOC_MMAP_THRESHOLD_MAX
    ):
        return None
    return f"0, or an integer {MALLOC_MMAP_THRESHOLD_MIN}..{MALLOC_MMAP_THRESHOLD_MAX}"


@dataclass(frozen=True)
class MallocConfig:
    """glibc's malloc thresholds, set at start (heartbeatd.daemon.malloc says why)."""

    mmap_threshold: int = field(
        default=MALLOC_MMAP_THRESHOLD_MAX,
        metadata=check(
            _mmap_threshold,
            "bytes; smaller blocks come from the heap and are reused (0, with trim 0: glibc's)",
        ),
    )
    trim_threshold: int = field(
        default=2 * MALLOC_MMAP_THRESHOLD_MAX,
        metadata=check(
            int_range(0, 2**31 - 1),
            "free bytes the heap keeps before it gives them back (0, with mmap 0: glibc's)",
        ),
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
class SessionsConfig:
    """Resumable sessions (issue 18, docs/protocol.md "Sessions")."""

    enabled: bool = field(
        default=True, metadata=check(boolean, "clients may start and resume sessions")
    )
    expiry: int = field(
        default=120,
        metadata=check(int_range(1, 86_400), "seconds a detached session lives, by default"),
    )
    max_expiry: int = field(
        default=3600,
        metadata=check(int_range(1, 86_400), "largest expiry a client may ask for, seconds"),
    )
    max_unacked_messages: int = field(
        default=1000,
        metadata=check(
            int_range(1, 1_000_000), "server messages kept until acked; then backpressure"
        ),
    )
    max_unacked_bytes: int = field(
        default=1024 * 1024,
        metadata=check(int_range(1024, 2**31), "bytes of server messages kept until acked"),
    )
    max_per_identity: int = field(
        default=16,
        metadata=check(int_range(0, 1_000_000), "sessions one identity may hold; 0: no limit"),
    )
    max_detached_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=check(
            int_range(1024, 2**40), "bytes all detached sessions of this daemon keep for replay"
        ),
    )
    max_sessions: int = field(
        default=100_000,
        metadata=check(
            int_range(1, 10_000_000), "sessions held, attached or not (per cluster with Redis)"
        ),
    )


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def _host_names(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(v, str) and v.strip() and not any(c in v for c in "/ @\t\r\n") for v in value
    )
    return None if ok else "a list of host names or addresses, e.g. [admin.internal]"


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
        default="", metadata=check(_string, "bearer token; empty: none", shown=hidden)
    )
    token_file: str = field(
        default="",
        metadata=check(_string, "file holding the bearer token (systemd credentials); empty: none"),
    )
    allow_unauthenticated: bool = field(
        default=False,
        metadata=check(boolean, "allow a non-loopback admin listener without a token"),
    )
    health_public: bool = field(
        default=True, metadata=check(boolean, "GET /healthz needs no token (load balancers)")
    )
    max_body_bytes: int = field(
        default=1024 * 1024,
        metadata=check(int_range(2, 2**31), "largest request body accepted, in bytes"),
    )
    access_log: bool = field(
        default=False, metadata=check(boolean, "log one line per admin request")
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=check(
            _host_names,
            "Host names the admin API answers besides loopback and its own address",
        ),
    )

    def __repr__(self) -> str:  # never show the token in logs or diffs
        shown = ", ".join(
            f"{f.name}={'***' if f.name == 'token' and self.token else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"AdminConfig({shown})"


@dataclass(frozen=True)
class TlsConfig:
    """TLS on every ``listen`` endpoint when ``certificate`` is set (heartbeatd.daemon.tls)."""

    certificate: str = field(
        default="", metadata=check(string, "PEM file: the server certificate (+ chain)")
    )
    private_key: str = field(default="", metadata=check(string, "PEM file: its private key"))
    client_ca: str = field(
        default="",
        metadata=check(string, "PEM file of CAs: clients must present a certificate (mTLS)"),
    )
    min_version: str = field(
        default="1.2",
        metadata=check(
            # YAML reads an unquoted 1.2 as a number: accept it as the version it means.
            lambda v: one_of(*TLS_VERSIONS)(str(v) if isinstance(v, float) else v),
            "oldest TLS version accepted",
        ),
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata=check(positive_number, "seconds a client gets to finish the TLS handshake"),
    )
    client_identity: str = field(
        default="subject",
        metadata=check(
            one_of(*CLIENT_IDENTITIES),
            "a client certificate's identity: its subject, or issuer_and_subject "
            "('<subject>;issuer=<issuer>', needed when client_ca holds several root CAs)",
        ),
    )
    client_crl: str = field(
        default="",
        metadata=check(string, "PEM file of CRLs: revoked client certificates are refused"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_version", str(self.min_version))

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


@dataclass(frozen=True)
class JwtConfig:
    """Signed tokens (JWT, PyJWT): connect tokens (``auth.mode: jwt``) and channel tokens."""

    hmac_secret_file: str = field(
        default="",
        metadata=check(string, "file holding the HS256 secret (at least 32 bytes)"),
    )
    public_key_file: str = field(
        default="",
        metadata=check(string, "PEM public key (RSA: RS256, EC P-256: ES256) or a JWKS file"),
    )
    audience: str = field(
        default="", metadata=check(string, "the aud claim required; '' checks none")
    )
    issuer: str = field(
        default="", metadata=check(string, "the iss claim required; '' checks none")
    )
    refresh_before: float = field(
        default=30.0,
        metadata=check(positive_number, "seconds before exp the server asks for a new token"),
    )

    @property
    def enabled(self) -> bool:
        return bool(self.hmac_secret_file or self.public_key_file)


def _jwt_section(value: Any, path: str, errors: list[str]) -> JwtConfig:
    if value is None:
        return JwtConfig()
    if not isinstance(value, Mapping):
        errors.append(f"{path}: {value!r} is not allowed; expected a mapping of keys")
        return JwtConfig()
    built = build(JwtConfig, value, path + ".", errors)
    return built if built is not None else JwtConfig()


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication in the first frame (heartbeatd.server.auth)."""

    mode: str = field(default="none", metadata=check(one_of(*AUTH_MODES), "how clients log in"))
    tokens_file: str = field(
        default="", metadata=check(string, "file of identity:token lines (mode token)")
    )
    timeout: float = field(
        default=5.0, metadata=check(positive_number, "seconds a client gets to authenticate")
    )
    authenticator: str = field(
        default="",
        metadata=check(
            lambda v: None if v == "" or _is_entry_point(v) else "'module:function'",
            "mode custom: function(token, peer) -> identity, None or a Deferred",
        ),
    )
    jwt: JwtConfig = field(
        default_factory=JwtConfig,
        metadata={
            "check": lambda v: None,
            "doc": "keys and claims of signed tokens (mode jwt, subscribe: token)",
            "build": _jwt_section,
        },
    )


def _endpoints(value: Any) -> str | None:
    ok = isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value)
    )
    return None if ok else "a server endpoint string, a list of them, or '' for off"


def _origins(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(v, str) and (v == "*" or "://" in v) for v in value
    )
    return None if ok else "a list of origins such as http://127.0.0.1:8000, or ['*'] for any"


def _path(value: Any) -> str | None:
    ok = isinstance(value, str) and value.startswith("/") and " " not in value
    return None if ok else "a URL path starting with /"


@dataclass(frozen=True)
class WebSocketConfig:
    """The WebSocket listener (heartbeatd.websocket, docs/websocket.md)."""

    listen: str | tuple[str, ...] = field(
        default="",
        metadata=check(_endpoints, "endpoint string or list of them; empty: no WebSocket"),
    )
    path: str = field(default="/", metadata=check(_path, "the URL path clients connect to"))
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata=check(_origins, "browser Origins allowed; other browsers get 403"),
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata=check(ip_networks, "proxies whose X-Forwarded-For names the client"),
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata=check(positive_number, "seconds to finish the (TLS and) WebSocket handshake"),
    )
    compression: bool = field(
        default=False, metadata=check(boolean, "accept permessage-deflate (RFC 7692)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.listen, list):
            object.__setattr__(self, "listen", tuple(self.listen))

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The listen endpoints as a tuple (none when off)."""
        listen = self.listen
        if isinstance(listen, str):
            return (listen,) if listen.strip() else ()
        return tuple(listen)


@dataclass(frozen=True)
class SeedConfig:
    message_type: str = field(
        default="message",
        metadata=check(non_empty_string, "handler type that receives bare (non-envelope) values"),
    )


def _redis_url(value: Any) -> str | None:
    if value == "":
        return None
    ok = isinstance(value, str) and value.startswith("redis://")
    if ok:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
            db = parts.path.strip("/")
            ok = bool(parts.hostname) and (db == "" or db.isdigit())
        except ValueError:
            ok = False
    return None if ok else "'' (one node, no Redis) or redis://host:port/db"


def _node_id(value: Any) -> str | None:
    ok = (
        isinstance(value, str)
        and len(value) <= 64
        and all(c.isalnum() or c in "-_." for c in value)
    )
    return None if ok else "'' (generated) or up to 64 letters, digits, '-', '_', '.'"


#: Who may do something on a namespace's channels (docs/security.md#channels).
PERMISSIONS = ("none", "any", "authenticated", "authorizer")
#: ``subscribe`` may also ask for a channel token (a JWT naming the channel).
SUBSCRIBE_PERMISSIONS = (*PERMISSIONS, "token")
#: Most namespaces under ``channels.namespaces`` (a bound on what every request looks up).
MAX_NAMESPACES = 1000


def _optional(inner: Any) -> Any:
    def check_optional(value: Any) -> str | None:
        if value is None:
            return None
        expected = inner(value)
        return None if expected is None else f"null (the channels.* value) or {expected}"

    return check_optional


def _publish_permission(value: Any) -> str | None:
    return (
        None
        if value in ("", *PERMISSIONS)
        else "'' (channels.client_publish), " + ", ".join(PERMISSIONS)
    )


@dataclass(frozen=True)
class NamespaceConfig:
    """Who may do what on one namespace's channels, and its history and size bounds."""

    subscribe: str = field(
        default="any",
        metadata=check(one_of(*SUBSCRIBE_PERMISSIONS), "who may subscribe"),
    )
    publish: str = field(
        default="",
        metadata=check(
            _publish_permission,
            "who may publish; '' follows channels.client_publish (any if true, else none)",
        ),
    )
    presence: str = field(
        default="any",
        metadata=check(one_of(*PERMISSIONS), "who may read presence and get join/leave"),
    )
    history: str = field(
        default="any",
        metadata=check(one_of(*PERMISSIONS), "who may subscribe with since (read history)"),
    )
    history_size: int | None = field(
        default=None,
        metadata=check(_optional(int_range(0, 1_000_000)), "null: channels.history_size"),
    )
    history_ttl: float | None = field(
        default=None,
        metadata=check(_optional(non_negative_number), "null: channels.history_ttl"),
    )
    max_publication_bytes: int | None = field(
        default=None,
        metadata=check(_optional(int_range(16, 2**31)), "null: channels.max_publication_bytes"),
    )


def _namespace_section(value: Any, path: str, errors: list[str]) -> NamespaceConfig:
    if value is None:
        return NamespaceConfig()
    if not isinstance(value, Mapping):
        errors.append(f"{path}: {value!r} is not allowed; expected a mapping of keys")
        return NamespaceConfig()
    built = build(NamespaceConfig, value, path + ".", errors)
    if isinstance(built, NamespaceConfig) and built.history_ttl is not None:
        built = dataclasses.replace(built, history_ttl=float(built.history_ttl))
    return built if built is not None else NamespaceConfig()


def _namespaces(value: Any, path: str, errors: list[str]) -> dict[str, NamespaceConfig]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(
            f"{path}: {value!r} is not allowed; expected a mapping of namespace name to "
            "its settings"
        )
        return {}
    if len(value) > MAX_NAMESPACES:
        errors.append(
            f"{path}: {len(value)} namespaces is not allowed; expected at most {MAX_NAMESPACES}"
        )
        return {}
    out: dict[str, NamespaceConfig] = {}
    for name, settings in value.items():
        if not isinstance(name, str) or not _NAMESPACE_NAME.fullmatch(name):
            errors.append(
                f"{path}.{name}: {name!r} is not allowed as a namespace name; expected up to "
                "64 letters, digits, '-', '_', '.'"
            )
            continue
        out[name] = _namespace_section(settings, f"{path}.{name}", errors)
    return out


_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ChannelsConfig:
    client_publish: bool = field(
        default=False, metadata=check(boolean, "clients may publish (else only handlers/admin)")
    )
    max_per_connection: int = field(
        default=128, metadata=check(int_range(1, 100_000), "channels one connection may join")
    )
    max_name_length: int = field(
        default=128, metadata=check(int_range(1, 1024), "longest channel name, in characters")
    )
    max_publication_bytes: int = field(
        default=64 * 1024,
        metadata=check(int_range(16, 2**31), "largest publication (its JSON), in bytes"),
    )
    history_size: int = field(
        default=100,
        metadata=check(int_range(0, 1_000_000), "publications kept per channel for recovery"),
    )
    history_ttl: float = field(
        default=300.0,
        metadata=check(non_negative_number, "seconds an idle channel's history is kept"),
    )
    subscribe_rate: float = field(
        default=10.0,
        metadata=check(positive_number, "subscribes per second one connection may sustain"),
    )
    subscribe_burst: int = field(
        default=100,
        metadata=check(int_range(1, 1_000_000), "subscribes one connection may make at once"),
    )
    # -- fan-out fairness (heartbeatd.server.channels, docs/benchmarks.md#fan-out) --
    fanout_batch: int = field(
        default=250,
        metadata=check(
            int_range(1, 1_000_000), "writes of publications (and pushes) per reactor turn"
        ),
    )
    fanout_backlog: int = field(
        default=20_000,
        metadata=check(
            int_range(0, 100_000_000),
            "queued deliveries beyond which publish replies wait (backpressure)",
        ),
    )
    publish_per_turn: int = field(
        default=32,
        metadata=check(
            int_range(1, 1_000_000),
            "publish requests of one connection started per reactor turn",
        ),
    )
    # -- who may hear what (heartbeatd.server.permissions, docs/security.md#channels) --
    default: NamespaceConfig = field(
        default_factory=NamespaceConfig,
        metadata={
            "check": lambda v: None,
            "doc": "permissions of channels outside any namespace",
            "build": _namespace_section,
        },
    )
    namespaces: dict[str, NamespaceConfig] = field(
        default_factory=dict,
        metadata={
            "check": lambda v: None,
            "doc": "namespace name -> permissions of its channels ('name:...')",
            "build": _namespaces,
        },
    )
    authorize_timeout: float = field(
        default=5.0,
        metadata=check(positive_number, "seconds the application's authorizer gets to answer"),
    )


def _host_port(value: Any) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> (host, port); None when it is neither."""
    if not isinstance(value, str) or ":" not in value:
        return None
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or " " in host:
        return None
    return host, int(port)


def _sentinel_addresses(value: Any) -> str | None:
    ok = isinstance(value, list) and all(_host_port(v) is not None for v in value)
    return None if ok else "a list of host:port (e.g. [10.0.0.1:26379, 10.0.0.2:26379])"


@dataclass(frozen=True)
class SentinelConfig:
    """Redis through Sentinel: the nodes ask the sentinels where the master is (docs/cluster.md)."""

    addresses: tuple[str, ...] = field(
        default=(),
        metadata=check(_sentinel_addresses, "host:port of each sentinel; empty: no Sentinel"),
    )
    service: str = field(
        default="", metadata=check(string, "the master's name in the sentinels' config")
    )
    db: int = field(default=0, metadata=check(int_range(0, 1_000_000), "database number"))
    password: str = field(
        default="",
        metadata=check(string, "the master's (and replicas') password; '' for none", shown=hidden),
    )
    sentinel_password: str = field(
        default="",
        metadata=check(string, "the sentinels' own password; '' for none", shown=hidden),
    )

    def __repr__(self) -> str:  # passwords never reach logs or diffs
        return (
            f"SentinelConfig(addresses={self.addresses!r}, service={self.service!r}, "
            f"db={self.db!r}, password={'***' if self.password else ''!r}, "
            f"sentinel_password={'***' if self.sentinel_password else ''!r})"
        )


@dataclass(frozen=True)
class ClusterConfig:
    redis: str = field(
        default="",
        metadata=check(
            _redis_url, "redis://host:port/db; empty: one node, no Redis", shown=shown_url
        ),
    )
    node_id: str = field(
        default="", metadata=check(_node_id, "this node's name; empty: hostname + random")
    )
    node_timeout: float = field(
        default=10.0,
        metadata=check(positive_number, "seconds after which a silent node has left"),
    )
    namespace: str = field(
        default="heartbeatd",
        metadata=check(_node_id, "prefix of every Redis key, so clusters can share a Redis"),
    )
    command_timeout: float = field(
        default=5.0, metadata=check(positive_number, "seconds Redis gets to answer a command")
    )
    sentinel: SentinelConfig = field(
        default_factory=SentinelConfig, metadata={"section": SentinelConfig}
    )

    @property
    def enabled(self) -> bool:
        """True when this daemon is a cluster node (``redis`` or ``sentinel`` is set)."""
        return bool(self.redis or self.sentinel.addresses)

    def __repr__(self) -> str:  # a password in the URL never reaches logs or diffs
        return (
            f"ClusterConfig(redis={redact_url(self.redis)!r}, node_id={self.node_id!r}, "
            f"node_timeout={self.node_timeout!r}, namespace={self.namespace!r}, "
            f"command_timeout={self.command_timeout!r}, sentinel={self.sentinel!r})"
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
    workers: int = field(
        default=1,
        metadata=check(
            int_range(1, MAX_WORKERS), "processes serving the listener; > 1 needs cluster.redis"
        ),
    )
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    malloc: MallocConfig = field(default_factory=MallocConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)

    def effective_max_connections(self) -> int:
        """The connection limit: ``limits.max_connections`` (0: no number of its own), capped
        by the process's open-file limit less `FD_RESERVE`.

        Each client is a file descriptor: a limit above the open-file limit would let
        ``accept()`` fail with EMFILE, and Twisted then closes clients without a word.
        """
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = 1_000_000 if soft == resource.RLIM_INFINITY else max(1, soft - FD_RESERVE)
        configured = self.limits.max_connections
        return min(configured, room) if configured else room

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "heartbeat": HeartbeatConfig,
    "limits": LimitsConfig,
    "tcp": TcpConfig,
    "log": LogConfig,
    "malloc": MallocConfig,
    "shutdown": ShutdownConfig,
    "seed": SeedConfig,
    "admin": AdminConfig,
    "channels": ChannelsConfig,
    "cluster": ClusterConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "websocket": WebSocketConfig,
    "sessions": SessionsConfig,
}


def _cross_checks(config: Config, errors: list[str]) -> None:
    _admin_checks(config.admin, errors)
    _cluster_checks(config.cluster, errors)
    hb = config.heartbeat
    if hb.timeout <= hb.interval:
        errors.append(
            f"heartbeat.timeout: {hb.timeout:g} is not allowed; expected a number greater than "
            f"heartbeat.interval ({hb.interval:g}), so a client is pinged before eviction"
        )
    tls = config.tls
    if bool(tls.certificate) != bool(tls.private_key):
        key, other = ("tls.private_key", "tls.certificate")
        if not tls.certificate:
            key, other = other, key
        errors.append(f"{key}: '' is not allowed; expected a PEM file path when {other} is set")
    if tls.client_ca and not tls.certificate:
        errors.append(
            f"tls.client_ca: {tls.client_ca!r} is not allowed without tls.certificate; "
            "expected '' or also set tls.certificate and tls.private_key"
        )
    auth = config.auth
    if auth.mode == "token" and not auth.tokens_file:
        errors.append(
            "auth.tokens_file: '' is not allowed with auth.mode token; expected the path of a "
            "file of identity:token lines"
        )
    jwt = auth.jwt
    if jwt.hmac_secret_file and jwt.public_key_file:
        errors.append(
            f"auth.jwt.public_key_file: {jwt.public_key_file!r} is not allowed together with "
            "auth.jwt.hmac_secret_file; expected one of the two"
        )
    if auth.mode == "jwt" and not jwt.enabled:
        errors.append(
            "auth.jwt.hmac_secret_file: '' is not allowed with auth.mode jwt; expected the path "
            "of a file holding the HS256 secret, or set auth.jwt.public_key_file"
        )
    token_namespaces = [
        name
        for name, ns in [("default", config.channels.default), *config.channels.namespaces.items()]
        if ns.subscribe == "token"
    ]
    if token_namespaces and not jwt.enabled:
        key = (
            "channels.default.subscribe"
            if token_namespaces[0] == "default"
            else f"channels.namespaces.{token_namespaces[0]}.subscribe"
        )
        errors.append(
            f"{key}: 'token' is not allowed without auth.jwt.hmac_secret_file or "
            "auth.jwt.public_key_file; expected a key to check channel tokens with"
        )
    if auth.mode == "custom" and not auth.authenticator:
        errors.append(
            "auth.authenticator: '' is not allowed with auth.mode custom; expected "
            "'module:function'"
        )

    malloc = config.malloc
    if bool(malloc.mmap_threshold) != bool(malloc.trim_threshold):
        zero, other = ("malloc.mmap_threshold", "malloc.trim_threshold")
        if malloc.mmap_threshold:
            zero, other = other, zero
        errors.append(
            f"{zero}: 0 is not allowed with {other} set; expected both set or both 0 (once "
            "either is set, glibc stops sliding the other, which then stays at its start)"
        )

    sessions = config.sessions
    if sessions.expiry > sessions.max_expiry:
        errors.append(
            f"sessions.expiry: {sessions.expiry} is not allowed; expected at most "
            f"sessions.max_expiry ({sessions.max_expiry})"
        )

    if config.workers > 1:
        _worker_checks(config, errors)
        if config.websocket.endpoints:
            errors.append(
                f"websocket.listen: {config.websocket.listen!r} is not allowed with workers: "
                f"{config.workers}; expected '' (the WebSocket listener runs in a single process)"
            )


def _admin_checks(admin: AdminConfig, errors: list[str]) -> None:
    if admin.token and admin.token_file:
        errors.append(
            f"admin.token_file: {admin.token_file!r} is not allowed together with admin.token; "
            "expected one of the two"
        )
    if not admin.listen or admin.token or admin.token_file or admin.allow_unauthenticated:
        return
    if not endpoint_is_loopback(admin.listen):
        errors.append(
            f"admin.listen: {admin.listen!r} is not allowed without a token; expected a "
            "loopback interface (e.g. tcp:9100:interface=127.0.0.1), a UNIX socket (mode 600), "
            "admin.token or admin.token_file, or admin.allow_unauthenticated: true"
        )


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on ``:`` the way Twisted does (``\\:`` is escaped)."""
    parts, current, chars = [], [], iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def endpoint_is_loopback(description: str) -> bool:
    """True when a server endpoint string can only be reached from this host.

    ``unix:`` sockets count only when only their owner may connect (`private_unix_endpoint`
    makes them ``mode=600`` unless a ``mode=`` says otherwise; one open to the group or others
    is reachable by other local users); ``tcp``/``tcp6``/``ssl``
    endpoints are local only with a loopback ``interface=`` (no interface means all of them).
    Anything else (``systemd:``, plugins) cannot be told from the string: not loopback.
    """
    parts = _split_endpoint(description.strip())
    kind = parts[0].lower()
    if kind == "unix":
        modes = [p[len("mode=") :] for p in parts[1:] if p.startswith("mode=")]
        try:
            return not modes or int(modes[-1], 8) & 0o077 == 0
        except ValueError:
            return False
    if kind not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        return False
    interface = ""
    for part in parts[1:]:
        if part.startswith("interface="):
            interface = part[len("interface=") :]
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _cluster_checks(cluster: ClusterConfig, errors: list[str]) -> None:
    sentinel = cluster.sentinel
    if cluster.redis and sentinel.addresses:
        errors.append(
            f"cluster.redis: {redact_url(cluster.redis)!r} is not allowed "
            "with cluster.sentinel.addresses; expected one of them: cluster.redis for one "
            "Redis server, cluster.sentinel for Redis with Sentinel failover"
        )
    if sentinel.addresses and not sentinel.service:
        errors.append(
            "cluster.sentinel.service: '' is not allowed with cluster.sentinel.addresses; "
            "expected the master's name in the sentinels' config (sentinel monitor NAME ...)"
        )
    if sentinel.service and not sentinel.addresses:
        errors.append(
            f"cluster.sentinel.service: {sentinel.service!r} is not allowed without "
            "cluster.sentinel.addresses; expected '' or also list the sentinels (host:port)"
        )


def private_unix_endpoint(description: str) -> str:
    """A ``unix:`` server endpoint with ``mode=600`` unless it names a mode (Twisted's default
    is 0666: any local user could call the admin API without a token)."""
    parts = _split_endpoint(description.strip())
    if parts[0].lower() != "unix" or any(p.startswith("mode=") for p in parts[1:]):
        return description
    return description.rstrip() + ":mode=600"


def worker_node_id(base: str, index: int) -> str:
    """The cluster node id of worker ``index``: stable, so a replacement takes over its slot."""
    return f"{base}-w{index}"


def _worker_checks(config: Config, errors: list[str]) -> None:
    n = config.workers
    if not config.cluster.enabled:
        errors.append(
            f"workers: {n} is not allowed without cluster.redis; expected 1, or set "
            "cluster.redis (redis://host:port/db) or cluster.sentinel so the workers form a "
            "cluster "
            "(push, broadcast, presence and channels span them)"
        )
    listen = config.listen
    if not listen.startswith(WORKER_LISTEN_PREFIXES) or (
        listen.startswith("systemd:") and "domain=UNIX" in listen
    ):
        errors.append(
            f"listen: {listen!r} is not allowed with workers: {n}; expected a tcp:, tcp6: or "
            "systemd:domain=INET/INET6 endpoint (workers share one TCP socket; for TLS set tls.*)"
        )
    longest = worker_node_id(config.cluster.node_id, n - 1)
    if config.cluster.node_id and len(longest) > 64:
        errors.append(
            f"cluster.node_id: {config.cluster.node_id!r} is too long for workers: {n}; "
            f"expected at most {64 - len(longest) + len(config.cluster.node_id)} characters "
            f"(workers add -w0 .. -w{n - 1})"
        )


def _copy_mappings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested mappings, so overrides never write into the caller's."""
    return {k: (_copy_mappings(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}


def parse_config(raw: Any, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a `Config` from parsed YAML plus dotted-key overrides; raise `ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"<top level>: expected a mapping of keys, got {type(raw).__name__}"])
    merged: dict[str, Any] = _copy_mappings(raw)
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
