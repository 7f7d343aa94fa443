"""Which hot path runs: the optional C extension, or its pure-Python twin (the reference).

Read once, at import (as aiohttp reads ``AIOHTTP_NO_EXTENSIONS``): ``HEARTBEATD_NO_EXTENSIONS``
set to anything non-empty selects pure Python, as does an install built without a compiler.
The C module (``_speedups.c``) must answer exactly as the Python code does
(tests/test_speedups.py); docs/development.md says how it is built.
"""

from __future__ import annotations

import os
from typing import Any, Final

__all__ = ["ACCELERATED", "NO_EXTENSIONS", "speedups"]

#: True when the environment asked for pure Python.
NO_EXTENSIONS: Final = bool(os.environ.get("HEARTBEATD_NO_EXTENSIONS"))

speedups: Any = None
if not NO_EXTENSIONS:
    try:
        from heartbeatd.wire import _speedups as speedups  # type: ignore[attr-defined,no-redef]
    except ImportError:  # built without a compiler (or on PyPy): the Python twin runs
        speedups = None

#: Which path runs: ``"c"`` or ``"python"`` (the start-up log line and /metrics say it).
ACCELERATED: Final = "c" if speedups is not None else "python"
