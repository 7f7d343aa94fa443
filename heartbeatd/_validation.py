"""Checking configuration mappings against frozen dataclasses (no YAML, no Twisted).

The daemon's config and a client program's ``pool:`` section are both validated here, so an
error reads the same everywhere: every problem at once, one line each, naming the key path,
the bad value and what is allowed (``heartbeat.interval: -1 is not allowed; expected a number
> 0``).  Unknown keys are errors too, with the closest known key suggested, because a misspelt
tunable silently ignored is worse than a refused start.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ConfigError", "build", "check", "hidden", "redact_url"]


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds one human-readable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- value checks: each returns None when fine, else the "expected ..." text ----------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_number(value: Any) -> str | None:
    return None if is_number(value) and value > 0 else "a number > 0"


def non_negative_number(value: Any) -> str | None:
    return None if is_number(value) and value >= 0 else "a number >= 0 (0 disables)"


def int_range(low: int, high: int) -> Callable[[Any], str | None]:
    def in_range(value: Any) -> str | None:
        return None if is_int(value) and low <= value <= high else f"an integer {low}..{high}"

    return in_range


def non_negative_int(value: Any) -> str | None:
    return None if is_int(value) and value >= 0 else "an integer >= 0"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def is_choice(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(choices)

    return is_choice


def non_empty_string(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def module_names(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(v, str) and v and all(part.isidentifier() for part in v.split("."))
        for v in value
    )
    return None if ok else "a list of dotted module names, e.g. [mypkg.handlers]"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string ('' for none)"


def ip_networks(value: Any) -> str | None:
    """A list of IP addresses or CIDR networks (``10.0.0.0/8``, ``::1``)."""
    import ipaddress

    if not isinstance(value, list):
        return "a list of IP addresses or networks, e.g. [127.0.0.1, 10.0.0.0/8]"
    for item in value:
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            return f"a list of IP addresses or networks ({item!r} is neither)"
    return None


def as_written(value: Any) -> str:
    """A bad value as the YAML file spells it where Python's repr would not (``true``, not
    ``True``; ``null``, not ``None``); anything else as its repr (strings quoted)."""
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def check(
    fn: Callable[[Any], str | None], doc: str, shown: Callable[[Any], str] = as_written
) -> dict[str, Any]:
    """A field's check and doc; ``shown`` renders a bad value in the error (secrets: `hidden`)."""
    return {"check": fn, "doc": doc, "shown": shown}


def hidden(value: Any) -> str:
    """How a secret's bad value appears in an error: its type, never the value."""
    return f"<a {type(value).__name__}, not shown>"


def redact_url(value: Any) -> str:
    """A URL with its password replaced by ``***`` (``redis://:***@host:6379/0``)."""
    text = str(value)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def shown_url(value: Any) -> str:
    return repr(redact_url(value)) if isinstance(value, str) else hidden(value)


def build(
    cls: type,
    raw: Mapping[str, Any],
    prefix: str,
    errors: list[str],
    sections: Mapping[str, type] | None = None,
) -> Any:
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
        # A nested section: named by the caller (the top level's) or by the field itself.
        section = (sections or {}).get(name) or f.metadata.get("section")
        if section is not None:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{path}: {value!r} is not allowed; expected a mapping of keys")
                continue
            values[name] = build(section, value, path + ".", errors)
            continue
        custom = f.metadata.get("build")
        if custom is not None:  # a nested mapping with its own keys (channels.namespaces)
            values[name] = custom(value, path, errors)
            continue
        expected = f.metadata["check"](value)
        if expected is not None:
            shown = f.metadata.get("shown", as_written)(value)
            errors.append(f"{path}: {shown} is not allowed; expected {expected}")
            continue
        if isinstance(value, list) and isinstance(f.default, tuple):
            value = tuple(value)
        elif isinstance(f.default, float) and is_int(value):
            value = float(value)
        values[name] = value
    if any(v is None for v in values.values()):
        return None
    return cls(**values)
