"""The token buckets' shared arithmetic: when a client a bucket refused may try again.

The per-connection subscribe bucket (``channels.subscribe_rate``, `heartbeatd.server.channels`)
and the per-address accept bucket (``limits.accepts_per_second_per_address``,
`heartbeatd.server.admission`) refill continuously on the factory's clock.  A refusal of either
tells the client, in its error object's ``retry_after``, how many seconds until the bucket holds
a token again (docs/protocol.md, "Errors"): `retry_after` computes it, `has_token` is the
test the buckets apply, so that a client waiting exactly that long is not refused again by a
rounding of the float arithmetic, and `refill` is their refill.
"""

from __future__ import annotations

import math

__all__ = ["MAX_RETRY_AFTER", "TIME_SLACK", "has_token", "refill", "retry_after"]

#: Seconds of refill a bucket may lack and still give a token: a client that waits exactly
#: `retry_after` must get its token, whatever the float arithmetic of the clock rounded
#: (``reactor.seconds()`` is the epoch time: its steps are about 2.4e-7 s today).
TIME_SLACK = 1e-6
#: The longest `retry_after` said (a rate set absurdly low would say years; clients ignore
#: hints past 60 s anyway).
MAX_RETRY_AFTER = 3600.0


def refill(tokens: float, burst: float, rate: float, elapsed: float) -> float:
    """A bucket's tokens ``elapsed`` seconds later, refilled at ``rate`` up to ``burst``.  A
    clock stepped back (NTP) refills nothing, rather than emptying every bucket."""
    return min(burst, tokens + max(0.0, elapsed) * rate)


def has_token(tokens: float, rate: float) -> bool:
    """Does a bucket holding ``tokens``, refilled at ``rate`` per second, give one now?"""
    return tokens >= 1.0 - 2 * rate * TIME_SLACK


def retry_after(tokens: float, rate: float) -> float:
    """Seconds until a bucket holding ``tokens`` (short of one) and refilled at ``rate`` per
    second gives a token, rounded up to the millisecond (at least 0.001: "now" would invite a
    busy loop; at most `MAX_RETRY_AFTER`).  A client that waits that long is not refused by
    this bucket again, unless it spends the token meanwhile."""
    seconds = (1.0 - tokens) / rate - TIME_SLACK  # (`has_token` allows twice that)
    if not seconds < MAX_RETRY_AFTER:  # NaN too
        return MAX_RETRY_AFTER
    return max(1, math.ceil(seconds * 1000.0)) / 1000
