"""Counts and durations of this process's Salesforce API calls, rendered for /metrics.

The integration checklist watches an API by its response time (alert above 2 s)
and error rate (above 5 %). Every call `sf_client.SalesforceApi` sends is
recorded here by operation (`query`, `update_collection`, `bulk_query_results`,
...): its duration as the caller saw it (a re-login on an expired session
included) and, when it failed, its error code. Each org client of the process
(`sf_client._Gate`) registers one `ApiStats`; `families()` renders them, summed,
with the breaker's state and the daily allowance as gauges. A process that never
created a Salesforce client exports none of these families.

Exported (README "Metrics"):
- `sferp_salesforce_requests_total{op}`: calls sent, failed ones included;
- `sferp_salesforce_request_errors_total{op,code}`: failed calls by error code;
- `sferp_salesforce_request_seconds{op}`: histogram of call durations;
- `sferp_salesforce_breaker_open`: 1 while the circuit breaker is open or half-open;
- `sferp_salesforce_api_usage_ratio`: daily API calls used / allowed, as last reported;
- `sferp_salesforce_api_reserve_reached`: 1 while calls wait for the reserve to free up;
- `sferp_salesforce_last_poll_timestamp_seconds{object}`: when a poll cycle of the
  object last completed (`polled`), with `poll_objects` set;
- with the write-back on (`connectors/sf_writeback.py`, registered by `register_writeback`):
  `sferp_salesforce_writeback_written_total`, `sferp_salesforce_writeback_failed_total{code}`
  (records given up, each also a dead letter) and `sferp_salesforce_writeback_pending`.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Seconds; the alert threshold (2 s) is a bucket boundary, so its quantile is exact there.
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class GateReading(NamedTuple):
    """The breaker's and the allowance's state of one org client, read at scrape time."""

    breaker_open: bool
    usage_ratio: float | None  # None until a response reported the usage
    reserve_reached: bool


class ApiStats:
    """Call counts, errors and durations of one org client (thread-safe)."""

    def __init__(self, read_gate: Callable[[], GateReading]) -> None:
        self.read_gate = read_gate
        self._lock = threading.Lock()
        self.buckets: dict[str, list[int]] = {}  # op -> count per bucket, +Inf last
        self.sums: dict[str, float] = {}
        self.errors: dict[tuple[str, str], int] = {}  # (op, code) -> count

    def record(self, op: str, seconds: float, code: str | None = None) -> None:
        """One call of `op` that took `seconds`; `code` is its error code when it failed."""
        i = bisect.bisect_left(REQUEST_BUCKETS, seconds)
        with self._lock:
            counts = self.buckets.get(op)
            if counts is None:
                counts = self.buckets[op] = [0] * (len(REQUEST_BUCKETS) + 1)
                self.sums[op] = 0.0
            counts[i] += 1
            self.sums[op] += seconds
            if code is not None:
                self.errors[(op, code)] = self.errors.get((op, code), 0) + 1


_REGISTRY: list[ApiStats] = []
_REGISTRY_LOCK = threading.Lock()


def register(read_gate: Callable[[], GateReading]) -> ApiStats:
    """A new org client's stats, exported from now on."""
    stats = ApiStats(read_gate)
    with _REGISTRY_LOCK:
        _REGISTRY.append(stats)
    return stats


_WRITEBACKS: list[weakref.ref] = []
_LAST_POLL: dict[str, float] = {}  # polled object -> Unix time its last cycle completed


def polled(sobject: str, unix_s: float) -> None:
    """A poll cycle of `sobject` completed (every record changed since the cursor read)."""
    _LAST_POLL[sobject] = unix_s


def register_writeback(writeback: Any) -> None:
    """Export a write-back sender while it exists: its `written` count, its `failed`
    counts by error code and the size of its `pending` queue."""
    with _REGISTRY_LOCK:
        _WRITEBACKS[:] = [r for r in _WRITEBACKS if r() is not None]
        _WRITEBACKS.append(weakref.ref(writeback))


def families(
    registered: list[ApiStats] | None = None, writebacks: list[Any] | None = None
) -> Iterable[Metric]:
    """The metric families of every registered org client and write-back sender (or of
    the ones given), summed; none when there is neither."""
    if registered is None:
        with _REGISTRY_LOCK:
            registered = list(_REGISTRY)
    if writebacks is None:
        with _REGISTRY_LOCK:
            writebacks = [wb for wb in (r() for r in _WRITEBACKS) if wb is not None]
    if writebacks:
        yield from _writeback_families(writebacks)
    if not registered:
        return
    buckets: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    errors: dict[tuple[str, str], int] = {}
    for s in registered:
        with s._lock:
            for op, counts in s.buckets.items():
                acc = buckets.setdefault(op, [0] * len(counts))
                for i, n in enumerate(counts):
                    acc[i] += n
                sums[op] = sums.get(op, 0.0) + s.sums[op]
            for key, n in s.errors.items():
                errors[key] = errors.get(key, 0) + n
    requests = CounterMetricFamily(
        "sferp_salesforce_requests",
        "Salesforce API calls sent by this process, failed ones included.",
        labels=["op"],
    )
    seconds = HistogramMetricFamily(
        "sferp_salesforce_request_seconds",
        "Duration of Salesforce API calls as the caller saw them (a re-login included).",
        labels=["op"],
    )
    for op in sorted(buckets):
        counts = buckets[op]
        requests.add_metric([op], sum(counts))
        cumulative, running = [], 0
        for le, n in zip((*map(str, REQUEST_BUCKETS), "+Inf"), counts, strict=True):
            running += n
            cumulative.append((le, running))
        seconds.add_metric([op], cumulative, sums[op])
    failed = CounterMetricFamily(
        "sferp_salesforce_request_errors",
        "Failed Salesforce API calls by operation and error code (TIMEOUT, SERVER_UNAVAILABLE...).",
        labels=["op", "code"],
    )
    for (op, code), n in sorted(errors.items()):
        failed.add_metric([op, code], n)
    readings = [s.read_gate() for s in registered]
    ratios = [r.usage_ratio for r in readings if r.usage_ratio is not None]
    yield requests
    yield failed
    yield seconds
    if _LAST_POLL:
        last = GaugeMetricFamily(
            "sferp_salesforce_last_poll_timestamp_seconds",
            "When a poll cycle of the object last completed (Unix seconds).",
            labels=["object"],
        )
        for sobject, at in sorted(_LAST_POLL.items()):
            last.add_metric([sobject], at)
        yield last
    yield GaugeMetricFamily(
        "sferp_salesforce_breaker_open",
        "1 while the Salesforce circuit breaker is open or half-open (calls held back).",
        value=int(any(r.breaker_open for r in readings)),
    )
    usage = GaugeMetricFamily(
        "sferp_salesforce_api_usage_ratio",
        "Daily Salesforce API calls used / allowed, as the org last reported them.",
    )
    if ratios:
        usage.add_metric([], max(ratios))
    yield usage
    yield GaugeMetricFamily(
        "sferp_salesforce_api_reserve_reached",
        "1 while calls wait because the org's usage reached salesforce.api_reserve_fraction.",
        value=int(any(r.reserve_reached for r in readings)),
    )


def _writeback_families(writebacks: list[Any]) -> Iterable[Metric]:
    failed: dict[str, int] = {}
    for wb in writebacks:
        for code, n in list(wb.failed.items()):
            failed[code] = failed.get(code, 0) + n
    yield CounterMetricFamily(
        "sferp_salesforce_writeback_written",
        "Records the write-back wrote to Salesforce (acknowledged or found already right).",
        value=sum(wb.written for wb in writebacks),
    )
    gave_up = CounterMetricFamily(
        "sferp_salesforce_writeback_failed",
        "Records the write-back gave up on, by error code (each also went to integration.dlq).",
        labels=["code"],
    )
    for code, n in sorted(failed.items()):
        gave_up.add_metric([code], n)
    yield gave_up
    yield GaugeMetricFamily(
        "sferp_salesforce_writeback_pending",
        "Records waiting to be written back to Salesforce.",
        value=sum(len(wb.pending) for wb in writebacks),
    )
