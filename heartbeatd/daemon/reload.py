"""Live reload (SIGHUP): re-read the YAML file and apply it without dropping a connection.

Heartbeat interval and timeout, limits, log level and the like apply at once, to existing and
new connections (protocols read the factory's config on use).  Keys that cannot change while
listening (``listen``, ``framing``, ``handlers``) keep their running value and are reported.
An invalid file is rejected with the same message as at start; the daemon keeps running on
the configuration it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from heartbeatd._logging import get_logger, set_level
from heartbeatd.config import Config, ConfigError
from heartbeatd.daemon.config import load_config
from heartbeatd.daemon.fdlimit import describe_limit
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.tls import ServerTLS
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.signed_tokens import load_authenticator, load_token_verifier

__all__ = ["Reloader", "config_diff"]

log = get_logger(__name__)

#: Keys bound at start: changing them needs a restart.
FIXED_KEYS = (
    "listen",
    "framing",
    "handlers",
    "admin",
    "cluster",
    "workers",
    "websocket",
    "malloc",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_diff(old: Config, new: Config) -> list[str]:
    """``key old -> new`` for every key that differs (secrets shown as ``***``)."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    lines = []
    for key in sorted(after):
        if before[key] != after[key]:
            if key in ("admin.token", "cluster.redis"):  # secrets, or URLs holding one
                lines.append(f"{key} changed")
            else:
                lines.append(f"{key} {before[key]!r} -> {after[key]!r}")
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
        fixed = {
            key: getattr(old, key) for key in FIXED_KEYS if getattr(new, key) != getattr(old, key)
        }
        for key, value in fixed.items():
            log.warn(
                "{key} cannot change while running; keeping {old!r} (restart to use {new!r})",
                key=key,
                old=value,
                new=getattr(new, key),
            )
        new = dataclasses.replace(new, **fixed)
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
