"""Where each worker's time goes: wall-clock seconds spent inside each stage of the flow.

A worker thread runs every stage of the dataflow one after the other, so the sum
over its stages, per second of wall clock, is how busy it is: near 1 it has no
headroom left, and the next peak turns into lag (README "Performance and
capacity planning"). Time a stage spends waiting for the GIL or for a core
counts as busy: the worker can do nothing else meanwhile.

Measured per call of a stage (a shard's batch, a source poll, a sink batch),
never per message: two clock reads around calls that handle hundreds of
messages each. Each worker thread adds to its own table, so no lock is taken.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from sferp.wrapped import WrappedSink, WrappedSource

__all__ = ["STAGES", "StageClock", "TimedSink", "TimedSource"]

# The stages of the reconcile flow, in flow order (the label values of
# `sferp_worker_busy_seconds_total`).
STAGES = (
    "read",  # polling the Kafka source partitions
    "decode",  # decoding and routing to the merge shards
    "merge",  # de-duplication, merge, records rows
    "orders",
    "products",
    "skus",
    "coordinator",  # clock, flow_stats, exceptions, rendering the Kafka records
    "views",  # handing rows to the DuckDB writer (and commits the worker makes itself)
    "kafka_out",  # handing records to the reconciled.* producer
)

F = TypeVar("F", bound=Callable[..., Any])


class StageClock:
    """Accumulates (calls, seconds) per worker thread and stage."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[str, list[float]]] = {}  # thread ident -> stage -> [calls, s]
        self._order: list[int] = []  # thread idents in the order they first ran a stage
        self._lock = threading.Lock()  # only to register a new thread

    def _table(self) -> dict[str, list[float]]:
        ident = threading.get_ident()
        table = self._tables.get(ident)
        if table is None:
            with self._lock:
                table = self._tables.setdefault(ident, {s: [0, 0.0] for s in STAGES})
                if ident not in self._order:
                    self._order.append(ident)
        return table

    def wrap(self, stage: str, fn: F) -> F:
        """`fn`, timed as `stage` on the calling thread."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        clock = time.perf_counter
        tables = self._tables
        get_ident = threading.get_ident
        table_of = self._table

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = (tables.get(get_ident()) or table_of())[stage]
                entry[0] += 1
                entry[1] += clock() - t0

        return timed  # type: ignore[return-value]

    def totals(self) -> list[tuple[str, str, int, float]]:
        """(worker, stage, calls, seconds) for every worker that ran a stage.

        Workers are numbered in this process in the order they first ran a stage.
        """
        with self._lock:
            order = list(self._order)
        out: list[tuple[str, str, int, float]] = []
        for no, ident in enumerate(order):
            table = self._tables[ident]
            for stage in STAGES:
                calls, seconds = table[stage]
                out.append((str(no), stage, int(calls), seconds))
        return out

    def summary(self, elapsed_s: float) -> str:
        """One line per process: each worker's share of `elapsed_s` in each stage, and in all.

        Stages that round to 0 % are left out; "" when no stage ran.
        """
        per_worker: dict[str, list[tuple[str, float]]] = {}
        for worker, stage, _calls, seconds in self.totals():
            per_worker.setdefault(worker, []).append((stage, seconds))
        if elapsed_s <= 0 or not per_worker:
            return ""
        parts = []
        for worker, stages in per_worker.items():
            shares = ", ".join(
                f"{stage} {100 * s / elapsed_s:.0f} %"
                for stage, s in stages
                if round(100 * s / elapsed_s) >= 1
            )
            total = 100 * sum(s for _, s in stages) / elapsed_s
            name = f"worker {worker}: " if len(per_worker) > 1 else ""
            parts.append(f"{name}{shares} (busy {total:.0f} % of {elapsed_s:.1f} s)")
        return "; ".join(parts)


class TimedSource(WrappedSource):
    """A partitioned source whose partitions' polls count as the `read` stage."""

    def __init__(self, inner: FixedPartitionedSource, clock: StageClock) -> None:
        super().__init__(inner)
        self._clock = clock

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> StatefulSourcePartition:
        """The inner partition, its `next_batch` timed."""
        part = self._inner.build_part(step_id, for_part, resume_state)
        return _TimedSourcePartition(part, self._clock.wrap("read", part.next_batch))


class _TimedSourcePartition(StatefulSourcePartition):
    def __init__(self, inner: StatefulSourcePartition, next_batch: Callable[[], Any]) -> None:
        self._inner = inner
        self._next = next_batch

    def next_batch(self) -> Any:
        return self._next()

    def next_awake(self) -> Any:
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class TimedSink(WrappedSink):
    """A partitioned sink whose `write_batch` and `snapshot` count as `stage`."""

    def __init__(self, inner: FixedPartitionedSink, clock: StageClock, stage: str) -> None:
        super().__init__(inner)
        self._clock = clock
        self._stage = stage

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> StatefulSinkPartition:
        """The inner partition, its batches and snapshots timed."""
        part = self._inner.build_part(step_id, for_part, resume_state)
        return _TimedSinkPartition(part, self._clock, self._stage)


class _TimedSinkPartition(StatefulSinkPartition):
    def __init__(self, inner: StatefulSinkPartition, clock: StageClock, stage: str) -> None:
        self._inner = inner
        self._write = clock.wrap(stage, inner.write_batch)
        self._snapshot = clock.wrap(stage, inner.snapshot)

    def write_batch(self, values: list[Any]) -> None:
        self._write(values)

    def snapshot(self) -> Any:
        return self._snapshot()

    def close(self) -> None:
        self._inner.close()
