"""Live reload (SIGHUP): re-read the YAML file and apply it without dropping a connection.

Heartbeat interval and timeout, limits, log level and the like apply at once, to existing and
new connections (protocols read the factory's config on use).  Keys bound at start
(`FIXED_KEYS`: ``listen``, ``tcp.lean_transport``, ``admin.*`` ...) keep their running value,
each reported with the restart it needs; the diff line lists only what changed.
An invalid file is rejected with the same message as at start; the daemon keeps running on
the configuration it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from heartbeatd._logging import get_logger, set_level
from heartbeatd._validation import as_written, hidden
from heartbeatd.config import Config, ConfigError
from heartbeatd.daemon.config import load_config
from heartbeatd.daemon.fdlimit import describe_limit
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.tls import ServerTLS
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.signed_tokens import load_authenticator, load_token_verifier

__all__ = ["FIXED_KEYS", "Reloader", "config_diff", "keep_restart_keys", "restart_only"]

log = get_logger(__name__)

#: Keys bound at start: changing them needs a restart.  A dotted name is one key; a section's
#: name (``admin``) covers each of its keys.  docs/deployment.md#reload lists the same
#: (tests/test_reload.py compares them).
FIXED_KEYS = (
    "name",  # the embedded broker's node name (presence) is bound at start; hello would differ
    "listen",
    "framing",
    "handlers",
    "workers",
    "tcp.lean_transport",
    "log.format",
    "malloc",
    "admin",
    "cluster",
    "websocket",
)

_SECRET = object()  # a `Field.shown` that hides the value (`heartbeatd._validation.hidden`)
_MISSING = object()  # a key one side has not (a channels.namespaces entry)


def restart_only(key: str) -> bool:
    """True for a dotted key a reload keeps (`FIXED_KEYS`, or a key of a section there)."""
    return any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS)


def _leaves(value: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every dotted key of a config object: its value, and how a log line may show it."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(value):
        inner = getattr(value, f.name)
        if dataclasses.is_dataclass(inner):
            out.update(_leaves(inner, f"{prefix}{f.name}."))
        else:
            shown = f.metadata.get("shown", as_written)
            out[prefix + f.name] = (inner, _SECRET if shown is hidden else shown)
    return out


def _show(value: Any, shown: Any = as_written) -> str:
    """A value as a log line shows it: lists as in YAML's flow style, secrets as ``'***'``."""
    if shown is _SECRET:
        return "'***'" if value else "''"
    if isinstance(value, tuple):
        return repr(list(value))
    return str(shown(value))


def _replace(config: Any, key: str, value: Any) -> Any:
    """``config`` with the dotted ``key`` set to ``value`` (frozen dataclasses all the way)."""
    name, _, rest = key.partition(".")
    if rest:
        value = _replace(getattr(config, name), rest, value)
    return dataclasses.replace(config, **{name: value})


def keep_restart_keys(old: Config, new: Config) -> tuple[Config, list[tuple[str, str, str]]]:
    """``new`` with the running value of every restart-only key that differs, and for each
    ``(dotted key, old value, new value)`` as a log line shows them (secrets as ``'***'``)."""
    before, after = _leaves(old), _leaves(new)
    kept = []
    for key, (value, shown) in after.items():
        was = before[key][0]
        if value == was or not restart_only(key):
            continue
        kept.append((key, _show(was, shown), _show(value, shown)))
        new = _replace(new, key, was)
    return new, kept


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_diff(old: Config, new: Config) -> list[str]:
    """``key old -> new`` for every key that differs (secrets: ``key changed``)."""
    secrets = {key for key, (_, shown) in _leaves(new).items() if shown is not as_written}
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    lines = []
    for key in sorted(after.keys() | before.keys()):
        was, now = before.get(key, _MISSING), after.get(key, _MISSING)
        if was == now:
            continue
        if key in secrets:  # secrets, or URLs holding one
            lines.append(f"{key} changed")
        elif was is _MISSING or now is _MISSING:  # a channels.namespaces entry came or went
            lines.append(f"{key} {'added' if was is _MISSING else 'removed'}")
        else:
            lines.append(f"{key} {_show(was)} -> {_show(now)}")
    return lines


class Reloader:
    """Re-reads ``path`` (plus the command line's overrides) into a running factory."""

    def __init__(
        self,
        path: str | None,
        overrides: Mapping[str, Any],
        factory: ServerFactory,
        notifier: Notifier,
        tls: ServerTLS | None = None,
    ) -> None:
        self.path = path
        self.overrides = dict(overrides)
        self.factory = factory
        self.notifier = notifier
        #: The listener's TLS, whose certificate and key are re-read on every reload.
        self.tls = tls

    def reload(self) -> bool:
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready(self.factory.status())

    def _reload(self) -> bool:
        if self.path is None:
            log.info("SIGHUP: no --config file to re-read; nothing to do")
            return False
        try:
            new = load_config(self.path, self.overrides)
        except ConfigError as e:
            log.error(
                "Reload rejected; still running on the previous configuration:\n{errors}",
                errors="\n".join(f"  {line}" for line in e.errors),
            )
            return False
        old = self.factory.config
        new, kept = keep_restart_keys(old, new)
        for key, was, value in kept:
            log.warn(
                "{key} cannot change while running; keeping {old} (restart to use {new})",
                key=key,
                old=was,
                new=value,
            )
        try:
            new = self._reload_security(old, new)
        except ConfigError as e:
            log.error(
                "Reload rejected; still running on the previous configuration:\n{errors}",
                errors="\n".join(f"  {line}" for line in e.errors),
            )
            return False
        changes = config_diff(old, new)
        limit_before = self.factory.max_connections
        self.factory.apply_config(new)
        set_level(new.log.level)
        log.info(
            "Configuration reloaded from {path}: {changes}",
            path=self.path,
            changes="; ".join(changes) if changes else "no changes",
        )
        if (
            self.factory.max_connections != limit_before
            or new.limits.max_connections != old.limits.max_connections
        ):
            limit, why, capped = describe_limit(new)
            emit = log.warn if capped else log.info
            emit("Connection limit now {limit} ({why})", limit=limit, why=why)
        return True

    def _reload_security(self, old: Config, new: Config) -> Config:
        """Re-read the tokens file and the certificates; all or nothing (`ConfigError`)."""
        if new.tls.enabled != old.tls.enabled:
            log.warn(
                "tls.certificate cannot switch TLS on or off while running; keeping TLS {state} "
                "(restart to change it)",
                state="on" if old.tls.enabled else "off",
            )
            new = dataclasses.replace(new, tls=old.tls)
        authenticator = load_authenticator(new.auth)  # raises before anything changed
        verifier = load_token_verifier(new.auth)
        if self.tls is not None and new.tls.enabled:
            self.tls.reload(new.tls)
            log.info("TLS certificate and key re-read from {path}", path=new.tls.certificate)
        self.factory.authenticator = authenticator
        self.factory.token_verifier = verifier
        if authenticator is not None:
            log.info("auth: {what} loaded", what=authenticator.description)
            revoked = self.factory.revalidate()
            if revoked:
                log.warn(
                    "auth: closed {count} connection(s) whose token was removed",
                    count=revoked,
                )
        return new
