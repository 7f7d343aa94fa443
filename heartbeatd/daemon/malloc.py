"""glibc's malloc thresholds (``malloc.*``), set once at start.

A large message takes several blocks of about its size: the frame's body, the strings parsed
from it, the reply.  glibc hands a block above ``M_MMAP_THRESHOLD`` its own mapping, and gives
the heap's top back to the kernel once more than ``M_TRIM_THRESHOLD`` of it is free; its
defaults (128 KiB each) only slide up after a mapped block is freed.  Left so, a 256 KiB
echo gave back and took again its three blocks at every message: ``brk`` four times and a page
fault per 4 KiB, a third of the daemon's time (docs/benchmarks.md).  Set here, the blocks stay
in the heap and are reused.  The defaults are where glibc's own sliding thresholds end.

The price is memory freed and kept: a heartbeat sweep's own blocks (its list of due clients,
160 KiB at 20,000) came from mappings given back when freed, and now stay in the heap.  So,
while the thresholds are set, `give_back_free_memory` runs ``malloc_trim(0)`` after each sweep
(well under a millisecond at 20,000 idle clients).

Where the C library is not glibc, or the environment already sets these (``MALLOC_*_``
variables, or their names in ``GLIBC_TUNABLES``: the operator's choice wins), nothing is
changed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

from heartbeatd._logging import get_logger
from heartbeatd.config import MallocConfig

__all__ = ["ENVIRONMENT_KEYS", "give_back_free_memory", "set_by_environment", "tune_malloc"]

log = get_logger(__name__)

#: mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Environment variables through which glibc reads the same settings at exec (each of them
#: also stops glibc's sliding thresholds).
ENVIRONMENT_KEYS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
#: The same, as GLIBC_TUNABLES names (``name=value`` pairs joined by ``:``).
TUNABLES = tuple(f"glibc.malloc.{key[len('MALLOC_') : -1].lower()}" for key in ENVIRONMENT_KEYS)


def set_by_environment(environ: dict[str, str]) -> list[str]:
    """The variables of ``environ`` that already set what ``malloc.*`` sets (the operator's
    choice wins); other malloc settings (``glibc.malloc.arena_max``, say) do not count."""
    found = [key for key in ENVIRONMENT_KEYS if key in environ]
    pairs = environ.get("GLIBC_TUNABLES", "").split(":")
    if any(pair.split("=", 1)[0] in TUNABLES for pair in pairs):
        found.append("GLIBC_TUNABLES")
    return found


def tune_malloc(config: MallocConfig, environ: dict[str, str] | None = None) -> str:
    """Apply ``config`` with mallopt(3) and return what was done, in words (logged at start)."""
    environ = dict(os.environ) if environ is None else environ
    if not (config.mmap_threshold or config.trim_threshold):
        return "glibc's own (malloc.* are 0)"
    if platform.libc_ver()[0] != "glibc":
        return "left alone (not glibc)"
    from_environment = set_by_environment(environ)
    if from_environment:
        return f"left to the environment ({', '.join(from_environment)})"
    global _trim
    libc = ctypes.CDLL(None)  # the C library this process runs on
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = []
    for name, option, value in (
        ("mmap_threshold", M_MMAP_THRESHOLD, config.mmap_threshold),
        ("trim_threshold", M_TRIM_THRESHOLD, config.trim_threshold),
    ):
        if not value:
            continue
        if mallopt(option, value) != 1:
            log.warn("glibc refused malloc.{name} {value}", name=name, value=value)
            continue
        done.append(f"{name} {value}")
    if not done:
        return "unchanged (glibc refused every value)"
    _trim = libc.malloc_trim
    _trim.argtypes = (ctypes.c_size_t,)
    _trim.restype = ctypes.c_int
    return ", ".join(done)


#: glibc's malloc_trim, once `tune_malloc` has set a threshold; None otherwise.
_trim: Any = None


def give_back_free_memory() -> bool:
    """Give the kernel the heap's free pages (``malloc_trim(0)``), if `tune_malloc` set the
    thresholds (glibc's own would have given most of them back already).  True if any went."""
    return bool(_trim is not None and _trim(0))
