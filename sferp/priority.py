"""Lower CPU priority for the flow's background work, so a worker thread keeps its core.

A worker thread runs the dataflow's Python and is the flow's bottleneck. Beside it
run the views writer (its commit thread and DuckDB's own threads), the Kafka output
producer's process, and often the broker. Linux shares the cores evenly between
runnable threads, so whenever they are all busy the worker waits its turn like the
rest: in a live run at 80 % of one worker's capacity on 2 cores, the worker thread
waited for a core 17.7 % of the time (the kernel's schedstat), while its backlog
grew. Background work at a higher nice value yields the core and catches up when
the worker leaves it idle (the views commit coalesces what piled up meanwhile, and
past a backlog the worker commits itself: duckdb_views._BACKLOG_ROWS). With the
background at nice 19 the worker's wait fell to 11.3 %; with the default
`flow.background_nice = 10`, bounded runs took 5.7 % less time and live p99
latency at 80 % load fell (docs/performance-history.md).

Linux only: it has per-thread nice values, which threads inherit when they start.
Elsewhere nothing changes. Raising one's own nice value needs no privilege.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["call_lowered", "lower_process", "lower_this_thread", "thread_nice"]

log = logging.getLogger("sferp.priority")

T = TypeVar("T")
MAX_NICE = 19
_LINUX = sys.platform.startswith("linux")


def thread_nice(native_id: int | None = None) -> int:
    """The nice value of a thread of this process (default: the calling thread)."""
    tid = threading.get_native_id() if native_id is None else native_id
    if not _LINUX:
        return os.getpriority(os.PRIO_PROCESS, 0)
    return os.getpriority(os.PRIO_PROCESS, tid)


def lower_this_thread(increment: int) -> None:
    """Add `increment` to the calling thread's nice value (capped at 19); 0 does nothing.

    Threads the calling thread starts afterwards inherit the new value.
    """
    if increment <= 0 or not _LINUX:
        return
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:  # e.g. a sandbox that forbids it: run at normal priority
        log.debug("cannot lower the priority of thread %d: %s", tid, exc)


def lower_process(increment: int) -> None:
    """Add `increment` to the nice value of this whole process (a child that does only
    background work); 0 does nothing."""
    if increment <= 0:
        return
    try:
        os.nice(min(increment, MAX_NICE - os.nice(0)))
    except OSError as exc:
        log.debug("cannot lower the priority of process %d: %s", os.getpid(), exc)


def call_lowered(fn: Callable[[], T], increment: int) -> T:
    """Run `fn` in a short-lived thread lowered by `increment` and return its result.

    For libraries that start their worker threads when an object is created (DuckDB
    starts its scheduler's threads when it opens a database): those threads inherit
    the lowered priority, and the calling thread keeps its own.
    """
    if increment <= 0 or not _LINUX:
        return fn()
    box: dict[str, object] = {}

    def work() -> None:
        lower_this_thread(increment)
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            box["error"] = exc

    helper = threading.Thread(target=work, name="sferp-lowered-start", daemon=True)
    helper.start()
    helper.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
