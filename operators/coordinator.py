"""The coordinator: the one single-key stage where global facts meet.

It owns the flow's clock (CONTRACT §2), the flow_stats totals, the open
reconciliation exceptions (it alone decides first_seen/last_seen), the
hand-off SLA check that needs the global clock, and it renders each batch into
one DuckDB delta and the Kafka records for reconciled.* and the DLQ.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from .facts import ExceptionFact, GlobalInput, HandoffCandidate
from .merge import APPLIED, CONSUMED, DEAD, DUPLICATES, IGNORED, LATE
from .numbers import decimal_text

ORDER_COLUMNS = (
    "sf_order_id",
    "order_number",
    "account_id",
    "erp_order_no",
    "sf_status",
    "erp_status",
    "stage",
    "sf_total",
    "erp_total",
    "amount_matches",
    "activated_at",
    "invoiced_at",
    "quote_to_cash_s",
    "updated_at",
)
INVENTORY_COLUMNS = (
    "sku",
    "on_hand",
    "allocated",
    "sf_open_demand",
    "available_to_promise",
    "updated_at",
)
EXCEPTION_COLUMNS = ("kind", "key", "detail", "first_seen", "last_seen", "open")
_TIMESTAMPS = {"activated_at", "invoiced_at", "updated_at", "first_seen", "last_seen"}
# Live runs emit the reconciled.* and DLQ records at most this often, each key in
# its latest version (the views commit at the same cadence). Hot keys (a SKU's
# stock, an order under work) change in most live steps, and each step rendered
# them again: in-process, 266,000 JSON renders per 400,000 messages in
# 3,000-message steps against 89,000 in 40,000-message steps. At 20 % load this
# halved the coordinator's CPU; at 80 % a step already spans more than 250 ms.
LIVE_EMIT_INTERVAL_MS = 250


@dataclass(frozen=True)
class OutputTopics:
    """Where the coordinator's Kafka records go."""

    inventory: str = "reconciled.inventory"
    orders: str = "reconciled.orders"
    exceptions: str = "reconciled.exceptions"
    dlq: str = "integration.dlq"


_ISO_SECONDS: dict[int, str] = {}
_ISO_MS: dict[int, str] = {}  # whole texts: an order's activated_at recurs in each render
_TIMESTAMP_PLACES: dict[tuple[str, ...], tuple[int, ...]] = {}  # columns -> timestamp places


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (`2026-11-02T08:00:00.000Z`)."""
    if ms is None:
        return None
    text = _ISO_MS.get(ms)
    if text is not None:
        return text
    sec, milli = divmod(ms, 1000)
    prefix = _ISO_SECONDS.get(sec)
    if prefix is None:
        if len(_ISO_SECONDS) > 8192:
            _ISO_SECONDS.clear()
        t = time.gmtime(sec)  # the year padded to 4 digits, which strftime's %Y does not do
        prefix = _ISO_SECONDS[sec] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
    if len(_ISO_MS) > 16384:
        _ISO_MS.clear()
    text = _ISO_MS[ms] = f"{prefix}.{milli:03d}Z"
    return text


def row_json(columns: tuple[str, ...], row: tuple, lineage: dict[str, str]) -> bytes:
    """A view row as the JSON value of a reconciled.* record (decimals as strings).

    The hottest part of the coordinator in live runs (about two thirds of it): the
    timestamp columns' places are looked up once per column set, and whole
    timestamp texts are cached (measured on captured renders: 2.9-3.4 -> 1.9-2.6 µs).
    """
    places = _TIMESTAMP_PLACES.get(columns)
    if places is None:
        places = _TIMESTAMP_PLACES[columns] = tuple(
            i for i, name in enumerate(columns) if name in _TIMESTAMPS
        )
    values = list(row)
    for i in places:
        if i < len(values):
            values[i] = iso(values[i])
    doc = dict(zip(columns, values, strict=False))
    doc["lineage"] = lineage
    return orjson.dumps(doc, default=decimal_text)


class CoordinatorState:
    """Snapshotted state of the coordinator."""

    def __init__(self) -> None:
        self.stats: dict[str, list[int]] = {}
        self.clock = 0  # largest event time of any event not dead-lettered
        # Wall-clock ms when `clock` was last raised: a live clock ages from it, also
        # across a restart from a snapshot (Bytewax's EventClock snapshots it too).
        self.clock_wall = 0
        self.sla: int | None = None  # flow.handoff_sla_s (ms) the overdue set was judged by
        self.open: dict[tuple[str, str], list] = {}  # (kind, key) -> [detail, first, last]
        self.pending: dict[str, int] = {}  # order -> activated_at (hand-off candidates)
        self.overdue: set[str] = set()
        self.heap: list[tuple[int, str]] = []
        self.lineage: dict[str, dict[str, str]] = {}  # pending order -> its row's lineage
        # Kafka records not yet emitted, (topic, key) -> value; pickled with the
        # state, so a snapshot taken while records wait still carries them.
        self.outbox: dict[tuple[str, bytes], Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("outbox", {})  # snapshots taken before the outbox existed
        state.setdefault("lineage", {})  # ... and before hand-offs kept their lineage
        state.setdefault("clock_wall", 0)  # ... and before the clock's wall time was kept
        state.setdefault("sla", None)  # ... and before the hand-off SLA was kept
        self.__dict__.update(state)


class Coordinator:
    """Coordinator logic, free of Bytewax so it can be tested directly."""

    def __init__(
        self,
        state: CoordinatorState,
        *,
        handoff_sla_ms: int,
        topics: OutputTopics,
        live: bool = False,
        max_future_skew_ms: int = 300_000,
        input_topics: tuple[str, ...] = (),
        kafka_outputs: bool = True,
        emit_interval_ms: int = 0,
    ) -> None:
        self.state = state
        self.kafka_outputs = kafka_outputs
        # 0: every batch's records at once (bounded runs, tests); see LIVE_EMIT_INTERVAL_MS
        self.emit_interval_ms = emit_interval_ms if kafka_outputs else 0
        self._last_emit = _clock()
        for topic in input_topics:  # flow_stats has a row for every input topic
            state.stats.setdefault(topic, [0, 0, 0, 0, 0, 0])
        self._unwritten = set(input_topics)
        self.sla = handoff_sla_ms
        # A restart with a longer flow.handoff_sla_s: the orders overdue under the old one
        # are judged again at the next check (a shorter one needs nothing: the orders not
        # overdue yet are all still waiting in the heap).
        self._sla_raised = state.sla is not None and handoff_sla_ms > state.sla
        state.sla = handoff_sla_ms
        self.topics = topics
        self.live = live
        self.skew = max_future_skew_ms
        if not state.clock_wall:  # a new state, or a snapshot from before clock_wall
            state.clock_wall = _wall_ms()

    def now(self) -> int:
        """The flow's clock: event time, aged by wall clock when live (CONTRACT §2).

        It ages from when the largest event time was seen, downtime included: after a
        restart from a snapshot the flow's "now" is where it would have been.
        """
        c = self.state.clock
        if not self.live:
            return c
        wall = _wall_ms()
        aged = c + max(0, wall - self.state.clock_wall) if c else 0
        return min(aged, wall + self.skew) if c else 0

    def process(self, inputs: list[GlobalInput]) -> tuple[dict, list]:
        """Fold one batch of stage outputs; return (DuckDB delta, Kafka records)."""
        st = self.state
        delta: dict[str, dict[tuple, tuple | None]] = {}
        # Kafka records of this batch, one per (topic, key): a row that changed
        # several times in the batch is sent once, in its final version.
        kafka = self._records()
        touched_topics: set[str] = self._unwritten
        self._unwritten = set()
        for gi in inputs:
            for topic, vec in gi.stats.items():
                acc = st.stats.get(topic)
                if acc is None:
                    acc = st.stats[topic] = [0, 0, 0, 0, 0, 0]
                for i, v in enumerate(vec):
                    acc[i] += v
                touched_topics.add(topic)
            if gi.clock is not None and gi.clock > st.clock:
                st.clock = gi.clock
                st.clock_wall = _wall_ms()
            if gi.dead_letters:
                dl_rows = delta.setdefault("dead_letters", {})
                for d in gi.dead_letters:
                    dl_rows[(d.topic, d.partition, d.offset)] = tuple(d)
                    coordinates = f"{d.topic}:{d.partition}:{d.offset}"
                    value = {
                        "reason": d.reason,
                        "topic": d.topic,
                        "partition": d.partition,
                        "offset": d.offset,
                        "raw": d.raw,
                        "lineage": {"input": coordinates},  # the message itself
                    }
                    kafka[(self.topics.dlq, coordinates.encode())] = orjson.dumps(value)
            for table, rows in gi.rows.items():
                if not rows:
                    continue
                out = delta.setdefault(table, {})
                if table == "records":
                    out.update(rows)
                    continue
                columns, topic = (
                    (ORDER_COLUMNS, self.topics.orders)
                    if table == "order_status"
                    else (INVENTORY_COLUMNS, self.topics.inventory)
                )
                for pk, row in rows.items():
                    key = str(pk[0]).encode()
                    if row is None:
                        out[pk] = None
                        kafka[(topic, key)] = None
                        continue
                    out[pk] = row[:-2]
                    if row[-1] or (topic, key) in kafka:
                        kafka[(topic, key)] = (columns, row[:-2], row[-2])
            for exc in gi.exceptions:
                self._exception(exc, delta, kafka)
            for cand in gi.handoffs:
                self._handoff(cand, delta, kafka)
        self._check_overdue(delta, kafka)
        if touched_topics:
            fs = delta.setdefault("flow_stats", {})
            for topic in touched_topics:
                s = st.stats[topic]
                fs[(topic,)] = (
                    topic,
                    s[CONSUMED],
                    s[APPLIED],
                    s[DUPLICATES],
                    s[LATE],
                    s[DEAD],
                    s[IGNORED],
                )
        return delta, self._emit(kafka)

    def tick(self) -> tuple[dict, list]:
        """Re-evaluate the clock-dependent exceptions (live runs, with no new input)."""
        delta: dict = {}
        kafka = self._records()
        self._check_overdue(delta, kafka)
        return delta, self._emit(kafka)

    def _records(self) -> dict[tuple[str, bytes], Any]:
        """Where a batch's Kafka records go: with an emit interval, the records still
        waiting from before (so a key keeps only its latest version), else a new dict."""
        return self.state.outbox if self.emit_interval_ms else {}

    def flush(self) -> list:
        """Every waiting Kafka record, now (the input ended)."""
        return self._emit(self.state.outbox, force=True)

    def next_emit_s(self) -> float | None:
        """Seconds until waiting Kafka records are due, or None when none wait."""
        if not self.state.outbox:
            return None
        due = self._last_emit + self.emit_interval_ms / 1000
        return max(0.0, due - _clock())

    def _emit(self, kafka: dict[tuple[str, bytes], Any], force: bool = False) -> list:
        """Render `kafka` unless its records are to wait for the emit interval."""
        if not self.emit_interval_ms:
            return self._render(kafka)
        now = _clock()
        if not kafka or (not force and (now - self._last_emit) * 1000 < self.emit_interval_ms):
            return []
        self._last_emit = now
        out = self._render(kafka)
        kafka.clear()  # the outbox
        return out

    def _render(self, pending: dict[tuple[str, bytes], Any]) -> list:
        """The batch's Kafka records as (topic, key, value); empty when outputs are off."""
        if not self.kafka_outputs:
            return []
        out = []
        for (topic, key), v in pending.items():
            if type(v) is tuple:
                v = row_json(*v)
            out.append((topic, key, v))
        return out

    def _exception(self, exc: ExceptionFact, delta: dict, kafka: dict) -> None:
        st = self.state
        k = (exc.kind, exc.key)
        cur = st.open.get(k)
        if exc.open:
            if cur is None:
                cur = st.open[k] = [exc.detail, exc.event_time, exc.event_time]
            elif cur[0] == exc.detail and cur[2] >= exc.event_time:
                return
            else:
                cur[0] = exc.detail
                cur[2] = max(cur[2], exc.event_time)
            row = (exc.kind, exc.key, cur[0], cur[1], cur[2], True)
        else:
            if cur is None:
                return
            del st.open[k]
            row = (exc.kind, exc.key, exc.detail, cur[1], max(cur[2], exc.event_time), False)
        delta.setdefault("reconciliation_exceptions", {})[k] = row
        kafka[(self.topics.exceptions, f"{exc.kind}:{exc.key}".encode())] = (
            EXCEPTION_COLUMNS,
            row,
            exc.lineage or {},
        )

    def _handoff(self, cand: HandoffCandidate, delta: dict, kafka: dict) -> None:
        st = self.state
        oid = cand.order_id
        if cand.activated_at is None:
            st.pending.pop(oid, None)
            st.lineage.pop(oid, None)
            if oid in st.overdue:
                st.overdue.discard(oid)
                fact = ExceptionFact(
                    "HANDOFF_OVERDUE", oid, False, "handed off", st.clock, cand.lineage
                )
                self._exception(fact, delta, kafka)
            return
        st.pending[oid] = cand.activated_at
        if cand.lineage:
            st.lineage[oid] = cand.lineage
        heapq.heappush(st.heap, (cand.activated_at, oid))

    def _check_overdue(self, delta: dict, kafka: dict) -> None:
        st = self.state
        now = self.now()
        heap = st.heap
        if self._sla_raised:
            self._sla_raised = False
            for oid in sorted(st.overdue):
                activated = st.pending.get(oid)
                if activated is not None and now - activated <= self.sla:
                    st.overdue.discard(oid)
                    heapq.heappush(heap, (activated, oid))
                    detail = f"hand-off SLA raised to {self.sla / 60_000:g} min"
                    fact = ExceptionFact(
                        "HANDOFF_OVERDUE", oid, False, detail, st.clock, st.lineage.get(oid)
                    )
                    self._exception(fact, delta, kafka)
        while heap and now - heap[0][0] > self.sla:
            activated, oid = heapq.heappop(heap)
            if st.pending.get(oid) != activated or oid in st.overdue:
                continue
            st.overdue.add(oid)
            detail = (
                f"Activated at {iso(activated)}, not handed off to the ERP within "
                f"{self.sla / 60_000:g} min"
            )
            # It became overdue at activated_at + SLA (event time): that is its first_seen.
            fact = ExceptionFact(
                "HANDOFF_OVERDUE", oid, True, detail, activated + self.sla, st.lineage.get(oid)
            )
            self._exception(fact, delta, kafka)
        # An order whose candidate moved (re-activated later) but is overdue under
        # the old time stays open until retracted: retraction closes it.


_clock = time.monotonic  # when waiting Kafka records are due (tests replace it)


def _wall_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
