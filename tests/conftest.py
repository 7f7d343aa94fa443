"""Shared fixtures: a Clock, the built-in handler registry, and a factory on that clock."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import make_config
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from heartbeatd.server.factory import ServerFactory
from heartbeatd.server.handlers import HandlerRegistry, default_registry


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> HandlerRegistry:
    return default_registry()


@pytest.fixture
def factory(clock: Clock, registry: HandlerRegistry) -> ServerFactory:
    config = make_config(heartbeat={"interval": 10, "timeout": 30})
    return ServerFactory(config, registry, clock)


@pytest.fixture
def log_events() -> Any:
    """Every log event emitted during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
