"""Configuration: defaults, file < command line precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from heartbeatd.config import Config, ConfigError, parse_config
from heartbeatd.daemon.config import load_config

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "heartbeatd.yaml"


def errors_of(raw: object, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, overrides)
    return info.value.errors


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()


#: Keys whose shipped value differs from the built-in default, on purpose (``make run`` serves
#: the WebSocket listener too, for the example page; the built-in default keeps it off).
SHIPPED_DIFFERENT = {
    "websocket": {
        "listen": "tcp:9001:interface=127.0.0.1",
        "allowed_origins": ["http://127.0.0.1:8000", "http://localhost:8000"],
    },
}


def test_shipped_file_lists_every_key_with_its_default() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    for section, values in SHIPPED_DIFFERENT.items():
        for key, value in values.items():
            assert raw[section][key] == value
            default = getattr(Config(), section).__dataclass_fields__[key].default
            raw[section][key] = list(default) if isinstance(default, tuple) else default
    assert parse_config(raw) == Config()
    defaults = Config().to_dict()
    raw["handlers"] = tuple(raw["handlers"])

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert keys(raw) == keys(defaults)


def test_file_values_are_used_and_command_line_overrides_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 'tcp:1234'\nheartbeat: {interval: 2, timeout: 5}\n")
    config = load_config(path, {"listen": "tcp:4321"})
    assert config.listen == "tcp:4321"
    assert (config.heartbeat.interval, config.heartbeat.timeout) == (2.0, 5.0)
    assert config.framing == "int32"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"heartbeat": {"interval": -1}},
            "heartbeat.interval: -1 is not allowed; expected a number > 0",
        ),
        ({"heartbeat": {"interval": 0}}, "heartbeat.interval: 0 is not allowed"),
        ({"heartbeat": {"interval": "10"}}, "heartbeat.interval: '10' is not allowed"),
        # As the YAML file spells the value: true, not Python's True; null, not None.
        ({"heartbeat": {"interval": True}}, "heartbeat.interval: true is not allowed"),
        ({"heartbeat": {"interval": None}}, "heartbeat.interval: null is not allowed"),
        ({"max_frame_bytes": False}, "max_frame_bytes: false is not allowed"),
        ({"max_frame_bytes": 1.5}, "max_frame_bytes: 1.5 is not allowed; expected an integer"),
        ({"framing": "xml"}, "framing: 'xml' is not allowed; expected one of int32"),
        ({"log": {"level": "loud"}}, "log.level: 'loud' is not allowed; expected one of debug"),
        ({"handlers": "mod"}, "handlers: 'mod' is not allowed; expected a list of dotted"),
        ({"handlers": ["not a module"]}, "handlers: ['not a module'] is not allowed"),
        ({"limits": 5}, "limits: 5 is not allowed; expected a mapping"),
        (
            {"tcp": {"keepalive": "yes"}},
            "tcp.keepalive: 'yes' is not allowed; expected true or false",
        ),
        ({"listen": ""}, "listen: '' is not allowed; expected a non-empty string"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw: dict, expected: str) -> None:
    (line,) = errors_of(raw)
    assert line.startswith(expected), line


def test_timeout_must_exceed_interval() -> None:
    (line,) = errors_of({"heartbeat": {"interval": 10, "timeout": 10}})
    assert line.startswith("heartbeat.timeout: 10 is not allowed; expected a number greater than")
    assert "heartbeat.interval (10" in line


def test_unknown_keys_suggest_the_close_one() -> None:
    (line,) = errors_of({"heartbeat": {"intervall": 5}})
    assert line.startswith("heartbeat.intervall: unknown key")
    assert "did you mean 'heartbeat.interval'?" in line
    (top,) = errors_of({"lisen": "tcp:1"})
    assert "did you mean" in top and "listen" in top


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of({"heartbeat": {"interval": -1, "timeout": "x"}, "bogus": 1})
    assert len(errors) == 3
    assert {e.split(":")[0] for e in errors} == {"heartbeat.interval", "heartbeat.timeout", "bogus"}


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping" in errors_of(["a"])[0]


def test_empty_sections_and_integers_for_floats() -> None:
    config = parse_config({"heartbeat": None, "shutdown": {"close_timeout": 3}})
    assert config.heartbeat == Config().heartbeat
    assert config.shutdown.close_timeout == 3.0 and isinstance(config.shutdown.close_timeout, float)


def test_max_connections_zero_reads_the_open_file_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert Config().effective_max_connections() == soft - 64
    assert parse_config({"limits": {"max_connections": 7}}).effective_max_connections() == 7


@pytest.mark.parametrize(
    ("listen", "local"),
    [
        ("tcp:9100:interface=127.0.0.1", True),
        ("tcp:9100:interface=127.0.0.2", True),
        ("tcp6:9100:interface=\\:\\:1", True),
        ("ssl:9100:interface=localhost:privateKey=k.pem", True),
        ("unix:/run/heartbeatd/admin.sock", True),
        ("tcp:9100", False),
        ("tcp:9100:interface=0.0.0.0", False),
        ("tcp6:9100:interface=\\:\\:", False),
        ("tcp:9100:interface=10.0.0.5", False),
        ("systemd:domain=INET:index=1", False),
    ],
)
def test_admin_listener_needs_a_token_off_loopback(listen: str, local: bool) -> None:
    from heartbeatd.config import endpoint_is_loopback

    assert endpoint_is_loopback(listen) is local
    if local:
        parse_config({"admin": {"listen": listen}})
    else:
        (error,) = errors_of({"admin": {"listen": listen}})
        assert error.startswith(f"admin.listen: {listen!r} is not allowed without a token")
    for fine in ({"token": "x"}, {"token_file": "/f"}, {"allow_unauthenticated": True}):
        parse_config({"admin": {"listen": listen, **fine}})
