"""Who may do what on which channel: namespaces, personal channels, the application's authorizer.

A channel ``ns:rest`` belongs to namespace ``ns`` when ``channels.namespaces`` names it; a name
without ``:`` belongs to ``channels.default``.  When no namespace is configured, every channel
is the default namespace's (``:`` is then just a character, as it always was), so a config
without namespaces keeps its behaviour.  With namespaces, a prefix no namespace names is
refused with ``unknown_namespace``.

A namespace gives each action (``subscribe``, ``publish``, ``presence`` -- which also covers
``join_leave`` --, ``history`` -- subscribing with ``since``) to ``none``, ``any`` connection,
any ``authenticated`` identity, or the application's ``authorizer``
(`HandlerRegistry.authorize`); ``subscribe`` may also ask for a channel ``token``.

Whatever the namespace allows, ``#`` followed by comma-separated identities (``user#alice``,
``dm#alice,bob``) limits the channel to those identities (``forbidden`` for anyone else).

A check answers synchronously (None: allowed, or `HandlerError`) unless the authorizer is
asked; then a Deferred with a deadline (``channels.authorize_timeout``).  The common case,
a permission of ``any`` on a non-personal channel, costs a dict lookup and two comparisons.
"""

from __future__ import annotations

import re
from inspect import iscoroutine
from typing import Any, Protocol

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.python.failure import Failure

from heartbeatd._logging import get_logger
from heartbeatd.config import ChannelsConfig, NamespaceConfig
from heartbeatd.server.handlers import HandlerError

__all__ = [
    "AUTHORIZATION_FAILED",
    "AUTHORIZATION_TIMEOUT",
    "FORBIDDEN",
    "UNKNOWN_NAMESPACE",
    "Permissions",
    "personal_identities",
]

log = get_logger(__name__)

# Error codes on the wire (docs/protocol.md, docs/security.md#channels).
FORBIDDEN = "forbidden"
UNKNOWN_NAMESPACE = "unknown_namespace"
AUTHORIZATION_FAILED = "authorization_failed"
AUTHORIZATION_TIMEOUT = "authorization_timeout"

#: What an authorizer may return as its own error code.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: Longest description of an authorizer's bad result in a log line.
_MAX_SHOWN = 80


class _Client(Protocol):
    session_id: str
    identity: str | None

    @property
    def peer(self) -> str: ...

    @property
    def session(self) -> Any: ...


class _Host(Protocol):
    """What the checks use of the server (the factory): config, clock, registry, log limit."""

    clock: Any
    registry: Any

    def log_allowed(self, cause: str) -> bool: ...

    def count_error(self, code: str) -> None: ...


def personal_identities(channel: str) -> frozenset[str] | None:
    """The identities a ``#`` channel is limited to, or None for a channel of no one."""
    _, sep, rest = channel.partition("#")
    if not sep:
        return None
    return frozenset(rest.split(","))


def valid_personal(channel: str) -> bool:
    """A ``#`` names at least one identity, none empty, and comes once."""
    _, sep, rest = channel.partition("#")
    return not sep or (bool(rest) and "#" not in rest and "" not in rest.split(","))


class Permissions:
    """The channel permission checks of one daemon (rebuilt on reload)."""

    def __init__(self, config: ChannelsConfig, host: _Host) -> None:
        self.host = host
        self.timeout = config.authorize_timeout
        self.namespaces = config.namespaces
        self.default = self._resolved(config.default, config)
        self._rules = {name: self._resolved(ns, config) for name, ns in config.namespaces.items()}

    @staticmethod
    def _resolved(ns: NamespaceConfig, config: ChannelsConfig) -> NamespaceConfig:
        """The namespace with its ``null``/``''`` values read from ``channels.*``."""
        import dataclasses

        return dataclasses.replace(
            ns,
            publish=ns.publish or ("any" if config.client_publish else "none"),
            history_size=config.history_size if ns.history_size is None else ns.history_size,
            history_ttl=config.history_ttl if ns.history_ttl is None else ns.history_ttl,
            max_publication_bytes=(
                config.max_publication_bytes
                if ns.max_publication_bytes is None
                else ns.max_publication_bytes
            ),
        )

    def rule(self, channel: str) -> NamespaceConfig:
        """The channel's namespace settings; `HandlerError` ``unknown_namespace``."""
        if not self._rules:
            return self.default
        head, sep, _ = channel.partition(":")
        if not sep or "#" in head:
            return self.default
        rule = self._rules.get(head)
        if rule is None:
            raise HandlerError(
                UNKNOWN_NAMESPACE,
                f"no namespace {head!r} is configured (channels.namespaces); a channel without "
                "':' is in the default namespace",
            )
        return rule

    def history_of(self, channel: str) -> tuple[int, float]:
        """``(history_size, history_ttl)`` of a channel (the broker's per-channel policy)."""
        try:
            rule = self.rule(channel)
        except HandlerError:
            rule = self.default
        return rule.history_size or 0, rule.history_ttl or 0.0

    # -- checks -------------------------------------------------------------------------------

    def check(
        self, client: _Client, action: str, channel: str, data: Any = None, claimed: bool = False
    ) -> Deferred[None] | None:
        """May ``client`` do ``action`` on ``channel``?  None: yes; raises `HandlerError`: no;
        a Deferred: the authorizer decides (it fires None or fails with `HandlerError`).

        ``claimed``: the channel is named by the login JWT's signed ``channels`` claim, which
        stands for a channel ``token`` (and an identity); ``none`` still refuses and an
        ``authorizer`` is still asked."""
        rule = self.rule(channel)
        if "#" in channel and not self.personal_allows(client, channel):
            self._refused(client, action, channel, FORBIDDEN, "personal channel")
            raise HandlerError(FORBIDDEN, f"{channel!r} is a personal channel of other identities")
        permission: str = getattr(rule, action)
        if permission == "any":
            return None
        if claimed and action == "subscribe" and permission in ("token", "authenticated"):
            return None
        if permission == "authenticated":
            if client.identity is not None:
                return None
            self._refused(client, action, channel, FORBIDDEN, "not authenticated")
            raise HandlerError(FORBIDDEN, f"{action} on {channel!r} needs an identity")
        if permission == "authorizer":
            return self._ask(client, action, channel, data)
        if permission == "token" and action == "subscribe":
            verifier = getattr(self.host, "token_verifier", None)
            token = data.get("token") if isinstance(data, dict) else None
            try:
                if verifier is None:
                    raise HandlerError(FORBIDDEN, "channel tokens are not configured (auth.jwt)")
                verifier.check_channel(token, channel, client.identity)
            except HandlerError as e:
                self._refused(client, action, channel, e.code, e.message)
                raise
            return None
        self._refused(client, action, channel, FORBIDDEN, "namespace permission none")
        raise HandlerError(FORBIDDEN, f"{action} is not allowed on {channel!r}")

    @staticmethod
    def personal_allows(client: _Client, channel: str) -> bool:
        """False when ``channel`` is personal (``#``) and not ``client``'s."""
        allowed = personal_identities(channel)
        return allowed is None or client.identity in allowed

    def check_all(
        self, client: _Client, actions: list[str], channel: str, data: Any = None
    ) -> Deferred[None] | None:
        """`check` each action in turn (an asynchronous answer waits for the one before)."""
        for i, action in enumerate(actions):
            d = self.check(client, action, channel, data)
            if d is not None:
                rest = actions[i + 1 :]
                if rest:
                    d.addCallback(lambda _, rest=rest: self.check_all(client, rest, channel, data))
                return d
        return None

    def _ask(self, client: _Client, action: str, channel: str, data: Any) -> Deferred[None]:
        fn = self.host.registry.authorizers.get(action)
        if fn is None:
            self._refused(client, action, channel, FORBIDDEN, "no authorizer is registered")
            return fail(
                HandlerError(FORBIDDEN, f"{action} on {channel!r} needs an authorizer; none is set")
            )
        try:
            result = fn(client.session, channel, data)
        except Exception:
            return fail(self._failed(Failure(), client, action, channel))
        if iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if not isinstance(result, Deferred):
            try:
                self._judge(result, client, action, channel)
            except HandlerError as e:
                return fail(e)
            return succeed(None)
        result.addTimeout(self.timeout, self.host.clock)
        return result.addCallbacks(
            self._judge,
            self._failed,
            callbackArgs=(client, action, channel),
            errbackArgs=(client, action, channel),
        )

    def _judge(self, result: Any, client: _Client, action: str, channel: str) -> None:
        if result is True:
            return
        if result is False:
            self._refused(client, action, channel, FORBIDDEN, "the authorizer said no")
            raise HandlerError(FORBIDDEN, f"{action} on {channel!r} is not allowed")
        if type(result) is str and _CODE.fullmatch(result):
            self._refused(client, action, channel, result, "the authorizer said no")
            raise HandlerError(result, f"{action} on {channel!r} is not allowed")
        shown = repr(result)
        if len(shown) > _MAX_SHOWN:
            shown = shown[:_MAX_SHOWN] + "..."
        self._refused(client, action, channel, AUTHORIZATION_FAILED, f"it returned {shown}")
        raise HandlerError(AUTHORIZATION_FAILED, f"the authorizer of {action} failed")

    def _failed(
        self, failure: Failure, client: _Client, action: str, channel: str
    ) -> HandlerError | Failure:
        if failure.check(HandlerError):
            return failure  # from _judge: already logged
        if failure.check(TimeoutError):
            self._refused(
                client, action, channel, AUTHORIZATION_TIMEOUT, "channels.authorize_timeout"
            )
            return Failure(
                HandlerError(
                    AUTHORIZATION_TIMEOUT,
                    f"the authorizer of {action} did not answer within {self.timeout:g} s",
                )
            )
        reason = f"it raised {failure.type.__name__}: {failure.getErrorMessage()}"[:200]
        self._refused(client, action, channel, AUTHORIZATION_FAILED, reason)
        return Failure(HandlerError(AUTHORIZATION_FAILED, f"the authorizer of {action} failed"))

    def _refused(self, client: _Client, action: str, channel: str, code: str, why: str) -> None:
        """One log line per refusal cause and window (``log.rate_limit_*``)."""
        if self.host.log_allowed(f"channel_refused:{action}:{code}"):
            log.info(
                "Refused {action} of {channel} for {identity} ({peer}, session {session}): "
                "{code} ({why})",
                action=action,
                channel=channel,
                identity=client.identity,
                peer=client.peer,
                session=client.session_id,
                code=code,
                why=why,
            )
