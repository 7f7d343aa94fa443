"""The token buckets' shared arithmetic: when a client a bucket refused may try again.

The per-connection subscribe bucket (``channels.subscribe_rate``, `heartbeatd.server.channels`)
and the per-address accept bucket (``limits.accepts_per_second_per_address``,
`heartbeatd.server.admission`) refill continuously on the factory's clock.  A refusal of either
tells the client, in its error object's ``retry_after``, how many seconds until the bucket holds
a token again (docs/protocol.md, "Errors"): `retry_after` computes it, and `has_token` is the
test the buckets apply, so that a client waiting exactly that long is not refused again by a
rounding of the float arithmetic.
"""

from __future__ import annotations

import math

__all__ = ["TOKEN_SLACK", "has_token", "retry_after"]

#: Tokens a bucket may lack and still give one: a client that waits exactly `retry_after`
#: must get its token, whatever the float arithmetic of the refill rounded.
TOKEN_SLACK = 1e-9


def has_token(tokens: float) -> bool:
    """Does a bucket holding ``tokens`` give one now?"""
    return tokens >= 1.0 - 2 * TOKEN_SLACK


def retry_after(tokens: float, rate: float) -> float:
    """Seconds until a bucket holding ``tokens`` (short of one) and refilled at ``rate`` per
    second gives a token, rounded up to the millisecond (at least 0.001: "now" would invite a
    busy loop).  A client that waits that long is not refused by this bucket again, unless it
    spends the token meanwhile."""
    milliseconds = (1.0 - TOKEN_SLACK - tokens) * 1000.0 / rate
    return max(1, math.ceil(milliseconds)) / 1000
