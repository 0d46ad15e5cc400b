"""Keep the C heap from holding on to freed memory: a fixed mmap threshold in glibc.

glibc serves allocations of 128 KiB and more with their own memory mapping and
returns it at `free`, but by default it raises that threshold (up to 32 MiB) to
the size of every such block freed. A flow frees large blocks all the time: each
partition's fetched Kafka response (up to 8 MiB), the lists and bytes of a batch,
the columns of a views commit. After the first few, all of them come from the
heap instead, where freed space stays resident until the top of the heap is free,
and the heap fragments between the threads' arenas. Setting the trim threshold
explicitly turns that adaptation off (glibc's documented side effect) and keeps
the mapping threshold at 128 KiB; 1 MiB of free space at the top is given back.

Measured, bounded runs alternating with and without (peak RSS; wall time):
- 1,000,000-record initial load, 1 worker, two sets of runs on two broker instances:
  1,306-1,331 and 1,345-1,392 MiB against 1,409-1,452 and 1,409-1,443 MiB;
  66.9-67.6 and 67.3-69.8 s against 63.8-67.0 and 63.9-67.1 s.
- 500,000 messages of the benchmark's main stream, 1 worker: 696 MiB (three runs)
  against 816-829 MiB; 15.9-16.3 s against 15.9-16.1 s. Two processes: 18.5 and
  18.8 s against 17.2 and 18.5 s; with a recovery store, 21.8 and 22.1 s against
  21.6 and 22.1 s.
The price is kernel time for the page faults of fresh mappings. It was 5 % of
the wall time until kafka-python's two needless copies of every fetched
response went (connectors/kafka_records.py `fewer_response_copies`).
A 0.5-4 MiB mapping threshold with a 64 MiB trim threshold cost less kernel time
but kept only part of the saving on the initial load (1,359-1,429 MiB).

glibc only (Linux); elsewhere, and when the environment already sets one of
glibc's malloc tunables (to choose otherwise), nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["TRIM_THRESHOLD_BYTES", "fix_malloc_thresholds"]

log = logging.getLogger("sferp.native_heap")

TRIM_THRESHOLD_BYTES = 1 << 20
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_USER_TUNABLES = (
    "GLIBC_TUNABLES",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def fix_malloc_thresholds() -> bool:
    """Turn off glibc's adaptive mmap threshold in this process; True when it was set.

    Called once at the start of `sferp run`. Threads started later share the setting.
    """
    if any(name in os.environ for name in _USER_TUNABLES):
        log.debug("glibc malloc tunables come from the environment: left as they are")
        return False
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
