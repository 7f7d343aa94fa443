"""glibc's malloc thresholds, set at start (``malloc.*``, heartbeatd.daemon.malloc).

The blocks of a large message (body, string, reply) must stay in the heap: measured as page
faults, in a process that runs the allocation pattern of a 256 KiB echo, and in the daemon
answering real 256 KiB echoes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import Daemon, RawClient

from heartbeatd.config import ConfigError, MallocConfig, parse_config
from heartbeatd.daemon.malloc import set_by_environment, tune_malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

#: A 256 KiB echo's blocks, allocated and freed as the daemon did (body, text, reply; then the
#: text, the reply, the body), 300 times: prints the page faults taken.
PATTERN = """
import resource, sys
from heartbeatd.config import MallocConfig
from heartbeatd.daemon.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc(MallocConfig(), environ={}).startswith("mmap_threshold")
def echo():
    body = bytearray(262209); text = bytearray(262193); reply = bytearray(262213)
    del text, reply, body
for _ in range(50):
    echo()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    echo()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(script: str, mode: str) -> str:
    """``script`` run with ``mode`` in a fresh interpreter whose environment sets no malloc
    setting of its own; its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _faults(mode: str) -> int:
    return int(_run(PATTERN, mode))


@glibc_only
def test_a_large_messages_blocks_stay_in_the_heap() -> None:
    # glibc's own thresholds give the blocks back and take them again: a fault per page.
    assert _faults("plain") > 300 * 32
    assert _faults("tuned") < 300


def test_the_environment_and_zero_leave_glibc_alone() -> None:
    config = MallocConfig()
    if platform.libc_ver()[0] == "glibc":
        assert tune_malloc(config, {"MALLOC_TRIM_THRESHOLD_": "1"}) == (
            "left to the environment (MALLOC_TRIM_THRESHOLD_)"
        )
        assert tune_malloc(config, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == (
            "left to the environment (GLIBC_TUNABLES)"
        )
    else:  # pragma: no cover - CI runs on glibc
        assert tune_malloc(config, {}) == "left alone (not glibc)"
    assert tune_malloc(MallocConfig(0, 0), {}) == "glibc's own (malloc.* are 0)"


def test_only_the_environment_s_own_thresholds_leave_glibc_alone() -> None:
    """An operator's arena or tcache tunables say nothing about the thresholds: with
    ``glibc.malloc.arena_max`` (common in containers) they were dropped all the same."""
    assert set_by_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == []
    assert (
        set_by_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.rtld.x=1"}) == []
    )
    assert set_by_environment({"MALLOC_ARENA_MAX": "2"}) == []
    assert set_by_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1"}
    ) == ["GLIBC_TUNABLES"]
    assert set_by_environment({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"}) == ["GLIBC_TUNABLES"]
    assert set_by_environment({"MALLOC_MMAP_MAX_": "0", "MALLOC_TOP_PAD_": "0"}) == [
        "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_MAX_",
    ]


@pytest.mark.parametrize("value", [64 * 1024 * 1024, 1, 131071])
def test_a_threshold_glibc_would_refuse_or_that_maps_more_is_a_config_error(value: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"malloc": {"mmap_threshold": value}})
    (line,) = caught.value.errors
    assert line == (
        f"malloc.mmap_threshold: {value} is not allowed; expected 0, or an integer 131072..33554432"
    )


@pytest.mark.parametrize(("mmap", "trim"), [(0, 1 << 26), (1 << 25, 0), (1 << 20, 0)])
def test_one_threshold_without_the_other_is_a_config_error(mmap: int, trim: int) -> None:
    """Once either is set, glibc stops sliding the other: the one left at 0 stays at glibc's
    starting value, and 300 echoes of 256 KiB took more page faults than with both left to
    glibc (mmap_threshold alone 48,300, trim_threshold alone 58,500; glibc's own 28,800; both
    set 0).  So both are set, or neither."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"malloc": {"mmap_threshold": mmap, "trim_threshold": trim}})
    (line,) = caught.value.errors
    zero, other = (
        ("mmap_threshold", "trim_threshold") if not mmap else ("trim_threshold", "mmap_threshold")
    )
    assert line.startswith(f"malloc.{zero}: 0 is not allowed with malloc.{other} set"), line
    assert parse_config({"malloc": {"mmap_threshold": 0, "trim_threshold": 0}}).malloc == (
        MallocConfig(0, 0)
    )


def _minor_faults(pid: int) -> int:
    # /proc/PID/stat: the 10th field is minflt (the name, field 2, may hold spaces).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


@glibc_only
def test_the_daemon_sets_them_and_answers_large_echoes_without_page_faults(
    tmp_path: Path,
) -> None:
    config = {"max_frame_bytes": 1 << 20}
    daemon = Daemon(tmp_path, config)
    for key in [k for k in daemon.env if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        daemon.env.pop(key, None)
    text = "x" * 262144
    with daemon:
        daemon.wait_for(r"glibc malloc: mmap_threshold 33554432, trim_threshold 67108864")
        assert daemon.process is not None
        with RawClient(daemon.port) as client:
            assert client.recv()["type"] == "hello"

            def echoes(n: int) -> None:
                for i in range(n):  # one at a time: the client reads as it sends
                    client.send({"type": "echo", "id": i, "data": text})
                    assert client.recv() == {"type": "echo", "id": i, "data": text}

            echoes(20)  # warm: buffers, arenas, the first blocks
            before = _minor_faults(daemon.process.pid)
            echoes(200)
            faults = _minor_faults(daemon.process.pid) - before
    # Without the thresholds, each echo took about 190 faults (three 256 KiB blocks).
    assert faults < 200, faults


#: 40 MiB freed at the heap's top stays there under trim_threshold (64 MiB); malloc_trim gives
#: it back. Prints RSS in MiB: after the free, then after give_back_free_memory (and its answer).
GIVE_BACK = """
import sys
from heartbeatd.config import MallocConfig
from heartbeatd.daemon.malloc import give_back_free_memory, tune_malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
if sys.argv[1] == "tuned":
    tune_malloc(MallocConfig(), environ={})
blocks = [bytearray(256 * 1024) for _ in range(160)]
del blocks
kept = rss()
print(kept, give_back_free_memory(), rss())
"""


@glibc_only
@pytest.mark.parametrize("mode", ["tuned", "plain"])
def test_what_a_sweep_freed_is_given_back_while_the_thresholds_keep_it(mode: str) -> None:
    out = _run(GIVE_BACK, mode)
    kept, gave, after = out.split()
    if mode == "tuned":  # kept in the heap until given back
        assert (gave, int(kept) - int(after) >= 30) == ("True", True), out
    else:  # glibc's own thresholds: the blocks were mapped and went back when freed
        assert gave == "False" and int(kept) - int(after) < 5, out
