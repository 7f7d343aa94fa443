"""The JSON envelope: decoding, validation errors with their codes, encoding."""

from __future__ import annotations

import json

import pytest

from heartbeatd.wire.envelope import (
    OMIT,
    Message,
    ProtocolError,
    decode_message,
    encode_error,
    encode_message,
)


def test_decode_full_envelope() -> None:
    msg = decode_message(b'{"type":"echo","id":7,"data":{"a":[1,2]},"extra":true}')
    assert msg == Message("echo", 7, {"a": [1, 2]})


def test_id_and_data_are_optional() -> None:
    assert decode_message(b'{"type":"ping"}') == Message("ping", None, None)
    assert decode_message(b'{"type":"t","id":"abc"}').id == "abc"


@pytest.mark.parametrize(
    "body",
    [b"{bad", b"", b"\xff\xfe", b'{"type": "\xc3\x28"}', b"NaN", b'{"type":"x"} trailing'],
)
def test_invalid_json_or_utf8_is_bad_json(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    assert info.value.code == "bad_json"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe", "body is not valid UTF-8: byte 0xff at offset 0"),
        (b'{"type": "\xc3\x28"}', "body is not valid UTF-8: byte 0xc3 at offset 10"),
        (b'{"type": "\\ud800"}', "body is not valid UTF-8 JSON: "),  # an escape, not a byte
        (b"{bad", "body is not valid UTF-8 JSON: "),
    ],
)
def test_bad_json_says_which_byte_is_not_utf8(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    assert info.value.code == "bad_json" and str(info.value.message).startswith(message)
    assert "surrogates not allowed" not in str(info.value.message)


@pytest.mark.parametrize(
    ("body", "id"),
    [
        (b"[1,2]", None),
        (b'"hello"', None),
        (b"{}", None),
        (b'{"type":""}', None),
        (b'{"type":5}', None),
        (b'{"type":null,"id":3}', 3),
        (b'{"type":"t","id":1.5}', None),
        (b'{"type":"t","id":true}', None),
        (b'{"type":"t","id":[1]}', None),
    ],
)
def test_json_that_is_not_an_envelope_is_bad_message(body: bytes, id: object) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    assert info.value.code == "bad_message"
    assert info.value.id == id


def test_encode_message_omits_missing_fields() -> None:
    assert json.loads(encode_message("pong", id="a")) == {"type": "pong", "id": "a"}
    assert json.loads(encode_message("echo", None, 1)) == {"type": "echo", "id": 1, "data": None}
    assert json.loads(encode_message("x", OMIT)) == {"type": "x"}


def test_encode_error_shape() -> None:
    assert json.loads(encode_error("bad_json", "nope", 4)) == {
        "type": "error",
        "id": 4,
        "error": {"code": "bad_json", "message": "nope"},
    }
    assert json.loads(encode_error("bad_frame", "x"))["id"] is None


def test_unicode_round_trips() -> None:
    body = encode_message("echo", "é€😀", 1)
    assert decode_message(body).data == "é€😀"
