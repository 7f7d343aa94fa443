"""The one retry-delay policy of the client library: exponential backoff with full jitter.

Attempt ``n`` (1-based) waits a delay drawn uniformly from ``0..min(maximum, initial * 2^(n-1))``,
so many clients that lost the same server do not all come back at the same instant (the
"full jitter" of AWS's backoff study).  The reconnecting client hands it to Twisted's
``ClientService`` as its ``retryPolicy``; the pool calls it once per failed round of connects.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable

__all__ = ["backoff_cap", "full_jitter_backoff"]


def backoff_cap(attempt: int, initial: float, maximum: float) -> float:
    """The largest delay attempt ``attempt`` may wait: ``min(maximum, initial * 2^(n-1))``."""
    exponent = max(attempt - 1, 0)
    if exponent >= 64:  # far past any cap; and a float overflows a little after 2.0**1023
        return maximum
    return min(maximum, initial * 2**exponent)


def full_jitter_backoff(
    initial: float = 0.1, maximum: float = 30.0, random: Callable[[], float] = _random.random
) -> Callable[[int], float]:
    """A retry policy: attempt n waits random(0..min(maximum, initial*2^(n-1))) seconds."""

    def policy(attempt: int) -> float:
        return random() * backoff_cap(attempt, initial, maximum)

    return policy
