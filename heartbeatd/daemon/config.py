"""Reading the daemon's YAML file into a checked `Config` (the schema is `heartbeatd.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from heartbeatd.config import Config, ConfigError, parse_config

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]


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
