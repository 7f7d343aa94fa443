"""``twistd heartbeatd``: command-line options, validation, and the service they build.

Imported only when the subcommand runs (the plugin shim names this module), so
``twistd --help`` stays fast and cannot be broken by an import error here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import IService
from twisted.python import usage

from heartbeatd._logging import get_logger, set_level
from heartbeatd.config import Config, ConfigError, private_unix_endpoint
from heartbeatd.daemon.config import load_config
from heartbeatd.daemon.fdlimit import raise_open_file_limit
from heartbeatd.daemon.logs import set_destination, set_format
from heartbeatd.daemon.malloc import give_back_free_memory, tune_malloc
from heartbeatd.daemon.reload import Reloader
from heartbeatd.daemon.sdnotify import Notifier
from heartbeatd.daemon.service import ServerService
from heartbeatd.daemon.startup import LaunchStderr, install_excepthook
from heartbeatd.daemon.supervisor import Supervisor
from heartbeatd.daemon.tls import ServerTLS, load_server_tls
from heartbeatd.daemon.worker import (
    ADMIN_FD,
    LISTEN_FD,
    STATUS_FD,
    PipeNotifier,
    WorkerFactory,
    WorkerLink,
    adopted_endpoint,
    worker_settings,
)
from heartbeatd.server.auth import Authenticator
from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry, default_registry
from heartbeatd.server.signed_tokens import load_authenticator, load_token_verifier
from heartbeatd.wire import FRAMINGS

__all__ = ["Options", "makeService"]

log = get_logger(__name__)

ServerFactoryT = TypeVar("ServerFactoryT", bound=ServerFactory)


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
        load_token_verifier(config.auth)  # channel tokens (subscribe: token) need the key too
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
        for index, description in enumerate(config.websocket.endpoints):
            ws_error = check_endpoint(description, _reactor())
            if ws_error:
                errors.append(f"websocket.{ws_error}" + (f" (item {index})" if index else ""))
        if config.websocket.endpoints:
            from heartbeatd.websocket import MISSING_EXTRA, available

            if not available():
                errors.append(f"websocket.listen: {config.websocket.listen!r}: {MISSING_EXTRA}")
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
    """The service of one of three run modes: a worker, a supervisor, or a single daemon."""
    config = options.config
    set_level(config.log.level)
    set_format(config.log.format)
    raise_open_file_limit()
    log.info("glibc malloc: {what}", what=tune_malloc(config.malloc))
    reactor = _reactor()
    install_excepthook()
    if options.worker is not None:  # logs go to the supervisor (worker_observer)
        return worker_service(options, reactor)
    parent = getattr(options, "parent", None)  # twistd's own options (--logfile, -n)
    if parent is not None:
        set_destination(parent.get("logfile"), daemon=not parent.get("nodaemon"))
    # Kept before twistd forks (it does so after makeService): a daemon's start-up failure
    # is written to the stderr it was launched with, besides the log.
    startup = LaunchStderr(twistd_options=parent)
    if config.workers > 1:
        return supervisor_service(options, reactor, startup)
    return single_service(options, reactor, startup)


def single_service(options: Options, reactor: Any, startup: LaunchStderr) -> ServerService:
    """One process: it binds ``listen`` and ``admin.listen`` and serves both."""
    from twisted.internet.endpoints import serverFromString

    config = options.config
    factory = _factory(ServerFactory, options, reactor)
    endpoint = _secure(serverFromString(reactor, config.listen), options, reactor)
    notifier = Notifier()
    reloader = Reloader(options["config"], options.overrides, factory, notifier, options.tls)
    admin = None
    if config.admin.listen:
        from heartbeatd.daemon.admin import admin_site

        admin_endpoint = serverFromString(reactor, private_unix_endpoint(config.admin.listen))
        admin = (admin_endpoint, admin_site(factory, config.admin, options.admin_token))
    websocket = None
    if config.websocket.endpoints:
        from heartbeatd.websocket.protocol import WebSocketSite

        ws_endpoints = []
        for description in config.websocket.endpoints:
            ws_endpoint = serverFromString(reactor, description)
            if options.tls is not None:  # the same tls.* keys make it wss://
                ws_endpoint = options.tls.wrap(ws_endpoint, reactor)
            ws_endpoints.append((description, ws_endpoint))
        websocket = (ws_endpoints, WebSocketSite(factory))
    return ServerService(
        endpoint,
        factory,
        reactor,
        notifier,
        reloader.reload,
        admin,
        websocket,
        startup=startup,
    )


def supervisor_service(options: Options, reactor: Any, startup: LaunchStderr) -> Supervisor:
    """``workers > 1``: this process binds the sockets and runs the workers on them."""
    return Supervisor(
        options.config,
        options["config"],
        options.overrides,
        reactor,
        Notifier(),
        admin_token=options.admin_token,
        startup=startup,
    )


def worker_service(options: Options, reactor: Any) -> ServerService:
    """One worker: it serves the supervisor's sockets and reports to it over pipes."""
    from twisted.internet.stdio import StandardIO

    config = options.config
    worker = options.worker
    assert worker is not None
    factory = _factory(WorkerFactory, options, reactor)
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor, which stops us in order
    endpoint = _secure(adopted_endpoint(reactor, LISTEN_FD), options, reactor)
    link = WorkerLink(reactor, lambda: reloader.reload())
    StandardIO(link, stdin=0, stdout=STATUS_FD, reactor=reactor)
    notifier = PipeNotifier(link)
    reloader = Reloader(options["config"], options.overrides, factory, notifier, options.tls)
    admin = None
    if config.admin.listen and worker.admin:
        from heartbeatd.daemon.admin import admin_site

        site = admin_site(factory, config.admin, options.admin_token)
        site.access_log = False  # the supervisor logs the operator's requests, not its own
        admin = (adopted_endpoint(reactor, ADMIN_FD), site)
    service = ServerService(endpoint, factory, reactor, notifier, reloader.reload, admin)
    factory.service = service  # a full worker pauses the shared port
    return service


def _factory(factory_type: type[ServerFactoryT], options: Options, reactor: Any) -> ServerFactoryT:
    """The server factory, with the cluster broker when ``cluster.redis`` is set."""
    config = options.config
    broker = None
    if config.cluster.enabled:  # imported only here: a single daemon never needs Redis
        from heartbeatd.cluster.redis import RedisBroker

        broker = RedisBroker(reactor, config.cluster, config.channels)
    factory = factory_type(config, options.registry, reactor, broker)
    factory.noisy = False  # no "Starting factory <...ServerFactory object at 0x...>" lines
    factory.heartbeat.after_sweep = give_back_free_memory  # a no-op unless malloc.* is set
    factory.authenticator = options.authenticator
    factory.token_verifier = load_token_verifier(config.auth)
    return factory


def _secure(endpoint: Any, options: Options, reactor: Any) -> Any:
    """TLS around the listening endpoint when ``tls.*`` is set; says what guards clients."""
    config = options.config
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
    return endpoint
