"""``twistd heartbeatd``: command-line options, validation, and the service they build.

Imported only when the subcommand runs (the plugin shim names this module), so
``twistd --help`` stays fast and cannot be broken by an import error here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from heartbeatd._logging import get_logger, set_level
from heartbeatd.config import Config, ConfigError, private_unix_endpoint
from heartbeatd.daemon.config import load_config
from heartbeatd.daemon.logs import set_format
from heartbeatd.daemon.reload import Reloader
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.service import ServerService, raise_open_file_limit
from heartbeatd.daemon.tls import ServerTLS, load_server_tls
from heartbeatd.daemon.workers import (
    ADMIN_FD,
    LISTEN_FD,
    STATUS_FD,
    PipeNotifier,
    Supervisor,
    WorkerFactory,
    WorkerLink,
    adopted_endpoint,
    worker_settings,
)
from heartbeatd.server.auth import Authenticator, load_authenticator
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry, default_registry
from heartbeatd.wire import FRAMINGS

__all__ = ["Options", "makeService"]

log = get_logger(__name__)


def _reactor() -> Any:
    from twisted.internet import reactor  # resolved late: honour ``twistd --reactor``

    return reactor


def check_endpoint(description: str, reactor: Any) -> str | None:
    """Parse a server endpoint string without listening; return an error or None."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except (KeyError, IndexError) as e:
        if description.strip().lower().startswith("systemd:"):
            return (
                f"listen: {description!r} names a socket systemd did not pass ({e}); expected "
                "heartbeatd.socket to be active (socket activation), or a tcp: endpoint"
            )
        return f"listen: {description!r} is not a valid server endpoint: {e!r}"
    except Exception as e:
        return f"listen: {description!r} is not a valid server endpoint: {e}"
    return None


def build_registry(config: Config, errors: list[str]) -> HandlerRegistry | None:
    """Load the built-in handlers plus ``handlers:`` modules, reporting each failure."""
    registry = default_registry()
    for index, name in enumerate(config.handlers):
        try:
            registry.load_module(name)
        except Exception as e:
            errors.append(f"handlers[{index}]: cannot load {name!r}: {type(e).__name__}: {e}")
    return None if errors else registry


def read_admin_token(config: Config, errors: list[str]) -> str:
    """The admin token: ``admin.token``, or the contents of ``admin.token_file``."""
    path = config.admin.token_file
    if not path:
        return config.admin.token
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        errors.append(f"admin.token_file: {path!r} cannot be read: {reason}")
        return ""
    if not token:
        errors.append(f"admin.token_file: {path!r} is empty; expected the bearer token")
    return token


def check_security(
    config: Config, errors: list[str]
) -> tuple[ServerTLS | None, Authenticator | None]:
    """Load ``tls:`` (certificates) and ``auth:`` (tokens, authenticator), or say why not."""
    tls = authenticator = None
    if config.tls.enabled and config.listen.split(":", 1)[0].lower() in ("ssl", "tls"):
        errors.append(
            f"listen: {config.listen!r} is not allowed with tls.certificate set; expected a "
            "plain endpoint (tcp:..., unix:...): tls.* puts TLS on it"
        )
    try:
        tls = load_server_tls(config.tls)
    except ConfigError as e:
        errors.extend(e.errors)
    try:
        authenticator = load_authenticator(config.auth)
    except ConfigError as e:
        errors.extend(e.errors)
    return tls, authenticator


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--framing NAME] [--workers N]"
    longdesc = (
        "Run heartbeatd: long-lived TCP connections carrying framed JSON messages, with "
        "heartbeats. Command-line options override the YAML file, which overrides defaults."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (default: built-in defaults)."],
        ["listen", "l", None, "Server endpoint string; overrides `listen` (e.g. tcp:9000)."],
        ["framing", None, None, f"Wire framing; overrides `framing` ({', '.join(FRAMINGS)})."],
        ["workers", None, None, "Worker processes sharing the listener; overrides `workers`."],
    ]

    config: Config
    registry: HandlerRegistry
    admin_token: str = ""
    tls: ServerTLS | None
    authenticator: Authenticator | None

    def postOptions(self) -> None:
        overrides: dict[str, object] = {
            key: self[key] for key in ("listen", "framing") if self[key] is not None
        }
        if self["workers"] is not None:  # a non-number is reported by the config check
            workers = self["workers"]
            overrides["workers"] = int(workers) if workers.strip().isdigit() else workers
        self.overrides = overrides
        # In a worker, the supervisor's settings complete the command line (workers.py).
        self.worker = worker_settings()
        if self.worker is not None:
            overrides = {**overrides, **self.worker.config_overrides()}
        try:
            config = load_config(self["config"], overrides)
        except ConfigError as e:
            self._fail(e.errors)
        if self.worker is not None:
            self.overrides = overrides
        errors: list[str] = []
        # A worker serves sockets its supervisor bound after checking these endpoints.
        endpoint_error = None if self.worker else check_endpoint(config.listen, _reactor())
        if endpoint_error:
            errors.append(endpoint_error)
        if config.admin.listen and self.worker is None:
            admin_error = check_endpoint(config.admin.listen, _reactor())
            if admin_error:
                errors.append("admin." + admin_error)
        if config.cluster.enabled:
            try:
                import txredisapi  # noqa: F401 - only checking that the cluster can run
            except ImportError:
                key = "cluster.redis" if config.cluster.redis else "cluster.sentinel.addresses"
                errors.append(
                    f"{key} is set, which needs the Redis client: "
                    f"pip install 'heartbeatd[cluster]' (txredisapi), or leave {key} empty"
                )
        self.admin_token = read_admin_token(config, errors)
        registry = build_registry(config, errors)
        tls, authenticator = check_security(config, errors)
        if errors or registry is None:
            self._fail(errors)
        self.config = config
        self.registry = registry
        self.tls = tls
        self.authenticator = authenticator

    @staticmethod
    def _fail(errors: list[str]) -> None:
        # SystemExit rather than UsageError: twistd would print its whole --help text above
        # the problem, burying the one line an operator needs.
        lines = "\n".join(f"  {line}" for line in errors)
        raise SystemExit(f"heartbeatd: invalid configuration:\n{lines}")


def makeService(options: Options) -> IService:
    config = options.config
    set_level(config.log.level)
    set_format(config.log.format)
    raise_open_file_limit()
    reactor = _reactor()
    from twisted.internet.endpoints import serverFromString

    if config.workers > 1:
        return Supervisor(
            config,
            options["config"],
            options.overrides,
            reactor,
            Notifier(),
            admin_token=options.admin_token,
        )
    broker = None
    if config.cluster.enabled:  # imported only here: a single daemon never needs Redis
        from heartbeatd.cluster.redis import RedisBroker

        broker = RedisBroker(reactor, config.cluster, config.channels)
    worker = options.worker
    factory_type = ServerFactory if worker is None else WorkerFactory
    factory = factory_type(config, options.registry, reactor, broker)
    factory.noisy = False  # no "Starting factory <...ServerFactory object at 0x...>" lines
    factory.authenticator = options.authenticator
    if worker is None:
        endpoint = serverFromString(reactor, config.listen)
        notifier: Notifier = Notifier()
    else:  # the supervisor's socket, and a notifier that reports to the supervisor
        from twisted.internet.stdio import StandardIO

        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor, which stops us in order
        endpoint = adopted_endpoint(reactor, LISTEN_FD)
        link = WorkerLink(reactor, lambda: reloader.reload())
        StandardIO(link, stdin=0, stdout=STATUS_FD, reactor=reactor)
        notifier = PipeNotifier(link)
    if options.tls is not None:
        endpoint = options.tls.wrap(endpoint, reactor)
        log.info(
            "TLS on {listen}: {what}, certificate {certificate}",
            listen=config.listen,
            what=options.tls.describe(),
            certificate=config.tls.certificate,
        )
    if options.authenticator is not None:
        log.info(
            "Clients must authenticate (auth.mode {mode}: {what})",
            mode=config.auth.mode,
            what=options.authenticator.description,
        )
    reloader = Reloader(options["config"], options.overrides, factory, notifier, options.tls)
    admin = None
    if config.admin.listen and (worker is None or worker.admin):
        from heartbeatd.daemon.admin import admin_site

        admin_endpoint = (
            serverFromString(reactor, private_unix_endpoint(config.admin.listen))
            if worker is None
            else adopted_endpoint(reactor, ADMIN_FD)
        )
        site = admin_site(factory, config.admin, options.admin_token)
        if worker is not None:  # the supervisor logs the operator's requests, not its own
            site.access_log = False
        admin = (admin_endpoint, site)
    service = ServerService(endpoint, factory, reactor, notifier, reloader.reload, admin)
    if isinstance(factory, WorkerFactory):
        factory.service = service  # a full worker pauses the shared port
    return service
