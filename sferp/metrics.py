"""Operational visibility of a running flow: Prometheus metrics, health, readiness, progress.

Every `sferp run` process serves HTTP on `metrics.bind`, port `metrics.port` plus
its process id (`-i`; 0 for a single process; `metrics.port = 0` picks a free
port, logged at start):

- `/metrics`: Prometheus text format (prometheus-client, a registry per run);
- `/healthz`: 200 while the process runs;
- `/readyz`: 200 once every input partition this process reads is within
  `metrics.ready_max_lag` messages of its end offset (and, in the process that
  owns the DuckDB views, once the views are open), else 503 with the reason.

The numbers come in two kinds (docs in README "Operating sferp"):

- **View totals**, exported only by the process that owns the DuckDB views (the
  single writer): `sferp_events_*_total{topic}` (the `flow_stats` columns),
  `sferp_dead_letters_total{topic,reason}`, row counts, open exceptions, orders
  by stage, quote-to-cash. They are read from the committed views with one
  read-only query through the writer's own query endpoint, at most once a
  second, so they equal `flow_stats` and `dead_letters` and carry across
  restarts: a resumed run continues from its snapshot's totals, never from zero
  and never double counting what it replays. After a crash the replay starts
  below the totals the crashed run had committed; the counters hold those until
  the replay passes them (read from the views file before the writer rolls it
  back), so they never go down.
- **Per-process edge numbers**: messages read per partition, consumer positions
  and lag, event lag, and the `sferp_view_commit_seconds` histogram. Counters
  among them start at zero with the process, like most Prometheus counters, and
  count messages replayed after a crash again.

The dataflow calls the probe methods (`on_input`, `on_routed`, `stamp`,
`wrap_coordinator`, `views_sink`): they observe at the edges of the operators
and never change what flows.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import duckdb
import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sferp.config import Settings
from sferp.connectors import sf_stats
from sferp.connectors.duckdb_schema import TABLES
from sferp.connectors.kafka import end_offsets, read_positions, unread_topics
from sferp.connectors.query_server import TOKEN_HEADER, endpoint_path
from sferp.duckdb_connect import connect
from sferp.events import RawMessage
from sferp.operators.facts import GLOBAL_IN, TICK
from sferp.stage_time import StageClock
from sferp.wrapped import WrappedSink

# No `<name>_created` series beside the histogram's (prometheus_client's default): they
# were the only ones, undocumented, and Prometheus does not need them.
disable_created_metrics()

log = logging.getLogger("sferp.metrics")

# Consume to view commit: the commit interval is 0.5 s, the alert fires at p99 > 2 s.
COMMIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# Salesforce activation to ERP invoice: 15 min to 30 days.
QUOTE_TO_CASH_BUCKETS = (
    900,
    1800,
    3600,
    7200,
    14400,
    28800,
    43200,
    86400,
    172800,
    259200,
    604800,
    1209600,
    2592000,
)
EXCEPTION_KINDS = (
    "AMOUNT_MISMATCH",
    "ORPHAN_ERP_ORDER",
    "UNKNOWN_SKU",
    "HANDOFF_OVERDUE",
    "SF_RESYNC_NEEDED",
)
STAGES = ("DRAFT", "BOOKED", "OPEN", "ALLOCATED", "SHIPPED", "INVOICED", "CANCELLED")
# flow_stats column -> counter name (without `_total`) and help.
STAT_COUNTERS = (
    ("consumed", "sferp_events_consumed", "Messages consumed from the input topic (flow_stats)."),
    ("applied", "sferp_events_applied", "Events applied to the views (flow_stats)."),
    ("duplicates", "sferp_events_duplicate", "Duplicate events counted, not applied."),
    ("late", "sferp_events_late", "Applied events that arrived behind the allowed lateness."),
    ("dead_lettered", "sferp_events_dead_lettered", "Messages that became dead letters."),
    ("ignored", "sferp_events_ignored", "Legitimate messages outside the views (tombstones...)."),
)
DEAD_LETTERS_HELP = "Dead letters by input topic and reason (the dead_letters view)."
DEAD_LETTER_REPORT_S = 60.0  # at most one dead-letter summary line per minute
SNAPSHOT_REPORT_S = 60.0  # at most one snapshot line per minute
_MAX_PENDING_BATCHES = 100_000  # bound on consume times awaiting their commit


def views_sql() -> str:
    """One read-only statement (one consistent snapshot) with every view-derived number.

    Rows are `(kind, a, b, value)`.
    """
    rows = [f"SELECT 'rows', '{t}', NULL, count(*) FROM {t}" for t in TABLES]
    cases = " ".join(
        f"WHEN quote_to_cash_s <= {le} THEN {i}" for i, le in enumerate(QUOTE_TO_CASH_BUCKETS)
    )
    parts = [
        "SELECT 'stat', topic, s, v FROM (UNPIVOT flow_stats ON consumed, applied, duplicates, "
        "late, dead_lettered, ignored INTO NAME s VALUE v)",
        "SELECT 'dead', topic, reason, count(*) FROM dead_letters GROUP BY topic, reason",
        *rows,
        "SELECT 'exc', kind, NULL, count(*) FROM reconciliation_exceptions WHERE open "
        "GROUP BY kind",
        "SELECT 'stage', stage, NULL, count(*) FROM order_status GROUP BY stage",
        "SELECT 'linked', coalesce(CAST(amount_matches AS VARCHAR), 'unknown'), NULL, count(*) "
        "FROM order_status WHERE erp_order_no IS NOT NULL GROUP BY 2",
        "SELECT 'activated', NULL, NULL, count(*) FROM order_status WHERE sf_status = 'Activated'",
        "SELECT 'out_of_sync', NULL, NULL, count(*) FROM order_status o "
        "WHERE sf_status = 'Activated' AND (amount_matches = false OR EXISTS (SELECT 1 FROM "
        "reconciliation_exceptions e WHERE e.open AND e.kind = 'HANDOFF_OVERDUE' "
        "AND e.key = o.sf_order_id))",
        f"SELECT 'q2c', CAST(b AS VARCHAR), NULL, count(*) FROM (SELECT CASE {cases} "
        f"ELSE {len(QUOTE_TO_CASH_BUCKETS)} END AS b FROM order_status "
        "WHERE quote_to_cash_s IS NOT NULL) GROUP BY b",
        "SELECT 'q2c_sum', NULL, NULL, coalesce(sum(quote_to_cash_s), 0) FROM order_status",
    ]
    return " UNION ALL ".join(
        f"SELECT * FROM ({p}) AS t{i}(k, a, b, v)" if i == 0 else p for i, p in enumerate(parts)
    )


class ViewTotals:
    """The view-derived numbers of one refresh."""

    def __init__(self, rows: Iterable[Iterable[Any]] = ()) -> None:
        """Parse the `(kind, a, b, value)` rows of `views_sql()`."""
        self.stats: dict[tuple[str, str], float] = {}  # (column, topic)
        self.dead: dict[tuple[str, str], float] = {}  # (topic, reason)
        self.rows: dict[str, float] = {}
        self.exceptions: dict[str, float] = {}
        self.stages: dict[str, float] = {}
        self.linked: dict[str, float] = {}
        self.activated = 0.0
        self.out_of_sync = 0.0
        self.q2c: dict[int, float] = {}
        self.q2c_sum = 0.0
        for kind, a, b, v in rows:
            v = float(v or 0)
            if kind == "stat":
                self.stats[(b, a)] = v
            elif kind == "dead":
                self.dead[(a, b)] = v
            elif kind == "rows":
                self.rows[a] = v
            elif kind == "exc":
                self.exceptions[a] = v
            elif kind == "stage":
                self.stages[a] = v
            elif kind == "linked":
                self.linked[a] = v
            elif kind == "activated":
                self.activated = v
            elif kind == "out_of_sync":
                self.out_of_sync = v
            elif kind == "q2c":
                self.q2c[int(a)] = v
            elif kind == "q2c_sum":
                self.q2c_sum = v


def read_view_totals(views_path: str) -> ViewTotals | None:
    """The view totals of a views file no process has open (None when it cannot be read)."""
    if not os.path.exists(views_path):
        return None
    try:
        con = connect(views_path, read_only=True, config={"enable_external_access": False})
    except duckdb.Error:
        return None
    try:
        return ViewTotals(con.execute(views_sql()).fetchall())
    except duckdb.Error:
        return None  # an empty or foreign file: no totals to carry over
    finally:
        con.close()


class Monitor:
    """Metrics, health and progress of one `sferp run` process.

    Create it, `start()` it before the dataflow runs, hand it to `build_flow`
    (`FlowOptions.metrics`), and `stop()` it afterwards.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        views_path: str,
        bounded: bool = False,
        process_id: int | None = None,
        workers: int = 1,
        writer: bool = True,
        resuming: bool = False,
        progress: IO[str] | None = None,
        positions: Callable[[], dict[tuple[str, int], int]] = read_positions,
    ) -> None:
        """Prepare the registry; nothing listens and no thread runs before `start()`.

        `positions` returns the next offset of every partition read in this process
        (the Kafka source's own record, by default).
        """
        self.settings = settings
        self.views_path = views_path
        self.bounded = bounded
        self.process_id = process_id
        self.workers = workers
        self.writer = writer
        self.topics = tuple(settings.topics.input_roles())
        self.interval = settings.metrics.poll_interval_s
        self.max_lag = settings.metrics.ready_max_lag
        self._progress_out = progress
        self._positions = positions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.port: int | None = None  # the bound port, after start()

        # Input edge (per process).
        self._read: dict[tuple[str, int], int] = {}
        self._read_total = 0
        self._next: dict[tuple[str, int], int] = {}  # offset after the last message counted
        self._first_read: float | None = None
        self._event_ms: dict[str, int] = {}
        # Consume to commit: exact alignment needs every input partition, the
        # coordinator and the writer in this process (a single-process run).
        self._align = process_id is None
        self._cum: dict[str, int] = {}
        self._pending: dict[str, deque[tuple[int, float]]] = {}
        self._base: dict[str, int] = {}
        # Consumer lag.
        self._known_parts: set[tuple[str, int]] = set()
        self._ends: dict[tuple[str, int], int] = {}
        self._ends_at_start: dict[tuple[str, int], int] | None = None
        self._lag_ok_at: float | None = None
        self._lag_errors = 0
        self._lag_failing = False
        # Views (writer process).
        self._views: ViewTotals | None = None
        self._floor = ViewTotals()
        self._views_open = False
        self._views_seen = False
        self._dirty = threading.Event()
        self._next_refresh = 0.0
        self._refresh_errors = 0
        self._refreshed_at: float | None = None
        self._refresh_failing = False
        self._dl_reported: dict[tuple[str, str], float] = {}
        self._dl_reported_at = time.monotonic()
        self._snapshots = 0
        self._snap_reported_at: float | None = None
        self._snap_unreported = 0
        self._progress_at = 0.0
        self._progress_drawn = False

        self.stage_clock = StageClock()  # the flow times its stages with it (stage_time.py)
        self.registry = CollectorRegistry()
        self.commit_seconds = Histogram(
            "sferp_view_commit_seconds",
            "Seconds from consuming a batch from Kafka to the DuckDB commit that holds it.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(self))
        if writer and resuming:
            floor = read_view_totals(views_path)
            if floor is not None:
                self._floor = floor
        # Dead letters are reported when they go beyond what earlier runs committed.
        self._dl_reported = dict(self._floor.dead)

    # -- hooks called by the dataflow ---------------------------------------------------------

    def on_input(self, _step_id: str, batch: list[RawMessage]) -> None:
        """Count a batch read from Kafka (one partition per fetch) and remember when."""
        if not batch:
            return
        now = time.time()
        first, last = batch[0], batch[-1]
        if first.partition == last.partition and first.topic == last.topic:
            counts = {(first.topic, first.partition): len(batch)}
            nxt = {(last.topic, last.partition): last.offset + 1}
        else:
            counts, nxt = {}, {}
            for m in batch:
                tp = (m.topic, m.partition)
                counts[tp] = counts.get(tp, 0) + 1
                nxt[tp] = m.offset + 1
        with self._lock:
            if self._first_read is None:
                self._first_read = time.monotonic()
            self._read_total += len(batch)
            self._next.update(nxt)
            for tp, n in counts.items():
                self._read[tp] = self._read.get(tp, 0) + n
                if self._align:
                    topic = tp[0]
                    cum = self._cum[topic] = self._cum.get(topic, 0) + n
                    pending = self._pending.get(topic)
                    if pending is None:
                        pending = self._pending[topic] = deque(maxlen=_MAX_PENDING_BATCHES)
                    pending.append((cum, now))

    def on_routed(self, _step_id: str, item: tuple[str, tuple]) -> None:
        """Follow the partition clocks of each decode batch (ticks, or the coordinator's input)."""
        payload = item[1]
        if payload[0] == TICK:
            clocks = payload[1]
        elif payload[0] == GLOBAL_IN and payload[1].clocks:
            clocks = payload[1].clocks
        else:
            return
        with self._lock:
            ev = self._event_ms
            for (topic, _part), ms in clocks.items():
                if ms > ev.get(topic, -1):
                    ev[topic] = ms

    def wrap_coordinator(self, builder: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap the coordinator's builder to learn the totals it resumes from."""

        def build(resume: Any) -> Any:
            logic = builder(resume)
            stats = getattr(getattr(getattr(logic, "coord", None), "state", None), "stats", {})
            with self._lock:
                self._base = {topic: vec[0] for topic, vec in stats.items()}  # 0: consumed
            return logic

        return build

    def stamp(self, out: tuple[dict, list]) -> dict:
        """The coordinator's DuckDB delta, with the consume times it completes as `_meta`.

        A batch is complete once the coordinator's `consumed` total for its topic
        covers it (its last message was decoded and, for changes, merged). In a
        multi-process cluster the other processes' batches are not known here:
        the time the coordinator emitted the delta stands in for them.
        """
        delta = out[0]
        if not delta:
            return delta
        now = time.time()
        if self._align:
            fs = delta.get("flow_stats")
            if not fs:
                return delta
            consumed_at: list[float] = []
            with self._lock:
                for row in fs.values():
                    if row is None:
                        continue
                    pending = self._pending.get(row[0])
                    if not pending:
                        continue
                    done = row[1] - self._base.get(row[0], 0)
                    while pending and pending[0][0] <= done:
                        consumed_at.append(pending.popleft()[1])
            if not consumed_at:
                return delta
            meta: tuple[float, list[float]] = (now, consumed_at)
        else:
            meta = (now, [now])
        stamped = dict(delta)
        stamped["_meta"] = meta  # type: ignore[assignment]
        return stamped

    def on_commit(self, metas: list[Any]) -> None:
        """After a views commit: observe consume-to-commit latencies, schedule a refresh."""
        try:
            now = time.time()
            for meta in metas:
                if isinstance(meta, tuple) and len(meta) == 2:
                    for t in meta[1]:
                        self.commit_seconds.observe(max(0.0, now - t))
            self._dirty.set()
        except Exception:  # never fail the writer for a metric
            log.exception("metrics: cannot record a views commit")

    def views_sink(self, sink: Any) -> FixedPartitionedSink:
        """Wrap the DuckDB views sink: commit hook, snapshot and resume logging."""
        return _ObservedViewsSink(sink, self)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the metrics port (a warning if it is taken) and start the pollers."""
        m = self.settings.metrics
        port = m.port + (self.process_id or 0) if m.port else 0
        try:
            self._server = _Server((m.bind, port), self)
        except OSError as exc:
            log.warning(
                "metrics: cannot listen on %s:%d (%s); running without /metrics, "
                "/healthz and /readyz (set metrics.port)",
                m.bind,
                port,
                exc.strerror or exc,
            )
        else:
            self.port = self._server.server_address[1]
            self._spawn("sferp-metrics-http", self._server.serve_forever, 0.2)
            host = f"[{m.bind}]" if ":" in m.bind else m.bind
            log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", host, self.port)
        self._spawn("sferp-lag", self._lag_loop)
        self._spawn("sferp-monitor", self._monitor_loop)
        if self._progress_out is not None:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._clear_progress)

    def stop(self) -> None:
        """Stop serving; a last views refresh and summary from the closed views file."""
        self._stop.set()
        for t in self._threads:
            if t.name == "sferp-monitor":
                t.join(timeout=5)
        if self.writer and self._views_seen and not self._views_open:
            totals = read_view_totals(self.views_path)  # the writer has closed the file
            if totals is not None:
                self._set_views(totals)
        self._report_dead_letters(force=True)
        if self._progress_out is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._clear_progress)
            self._progress(final=True)  # the last line, also for runs shorter than a second
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elapsed = time.monotonic() - self._started
        with self._lock:
            n, parts = self._read_total, len(self._read)
        log.info(
            "read %s messages from %d partitions in %.1f s (%s messages/s)",
            f"{n:,}",
            parts,
            elapsed,
            f"{n / elapsed:,.0f}" if elapsed > 0 else "-",
        )
        busy = self.stage_clock.summary(elapsed)
        if busy:
            log.info("worker time by stage: %s", busy)

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- readiness ---------------------------------------------------------------------------

    def _own_positions(self) -> dict[tuple[str, int], int]:
        return {tp: off for tp, off in self._positions().items() if tp[0] in self.topics}

    def lags(self) -> dict[tuple[str, int], int]:
        """Consumer lag (end offset minus position) of each partition this process reads."""
        pos = self._own_positions()
        with self._lock:
            ends = dict(self._ends)
        return {tp: max(0, ends[tp] - off) for tp, off in pos.items() if tp in ends}

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): caught up within `metrics.ready_max_lag` messages everywhere."""
        if self._stop.is_set():
            return False, "stopping"
        unread = unread_topics()
        if unread and not self.bounded:
            return False, (
                f"input topic(s) {', '.join(sorted(unread))} did not exist at start: "
                "not read until sferp restarts"
            )
        pos = self._own_positions()
        uptime = time.monotonic() - self._started
        if not pos and (self.process_id is None or uptime < 2 * self.interval):
            return False, "input partitions not assigned yet"
        ok_at = self._lag_ok_at
        if ok_at is None or time.monotonic() - ok_at > 3 * self.interval + 20:
            return False, "end offsets of the input partitions unknown"
        lags = self.lags()
        if len(lags) < len(pos):
            return False, "end offsets of the input partitions unknown"
        worst = max(lags.items(), key=lambda kv: kv[1], default=(None, 0))
        if worst[1] > self.max_lag:
            (topic, part), n = worst
            return False, f"behind: {n} messages on {topic}[{part}] (ready_max_lag {self.max_lag})"
        if self.writer and not self._views_open:
            return False, "views not open yet"
        return True, f"caught up: at most {worst[1]} messages behind"

    # -- background work ---------------------------------------------------------------------

    def _lag_loop(self) -> None:
        while True:
            try:
                self._poll_lag()
            except Exception:
                log.exception("metrics: consumer lag poll failed")
            # Poll soon after start-up, until the source partitions exist.
            if self._stop.wait(self.interval if self._known_parts else 0.5):
                return

    def _poll_lag(self) -> None:
        pos = self._own_positions()
        parts = set(pos)
        if parts != self._known_parts:
            self._known_parts = parts
            if parts:
                log.info("reading %d input partitions: %s", len(parts), _describe(parts))
        if not pos:
            self._lag_ok_at = time.monotonic()
            return
        kafka = self.settings.kafka
        try:
            ends = end_offsets(
                kafka.bootstrap,
                sorted({t for t, _ in pos}),
                self.settings.kafka_client_config(),
            )
        except Exception as exc:
            self._lag_errors += 1
            if not self._lag_failing:
                self._lag_failing = True
                log.warning("metrics: cannot read end offsets, consumer lag unknown: %s", exc)
            return
        if self._lag_failing:
            self._lag_failing = False
            log.info("metrics: end offsets readable again")
        with self._lock:
            self._ends = {tp: ends[tp] for tp in pos if tp in ends}
            if self._ends_at_start is None:
                self._ends_at_start = dict(self._ends)
        self._lag_ok_at = time.monotonic()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(0.25 if self._dirty.is_set() else 1.0):
            try:
                if self.writer:
                    self._maybe_refresh()
                    self._report_dead_letters()
                if self._progress_out is not None:
                    self._progress()
            except Exception:
                log.exception("metrics: monitor step failed")

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh or not (
            self._dirty.is_set() or now - self._last() > self.interval
        ):
            return
        self._dirty.clear()
        t0 = time.monotonic()
        try:
            rows = self._query_writer(views_sql())
        except Exception as exc:
            self._refresh_errors += 1
            if not self._refresh_failing:  # once per outage, not once per attempt
                log.warning(
                    "metrics: cannot read the view numbers (%s); the business gauges are "
                    "missing until they can be read",
                    exc,
                )
            self._refresh_failing = True
            rows = None
        took = time.monotonic() - t0
        # Refresh at most once a second, and spend at most ~10 % of a core on it.
        self._next_refresh = time.monotonic() + max(1.0, 10 * took)
        if rows is not None:
            if self._refresh_failing:
                log.info("metrics: the view numbers can be read again")
                self._refresh_failing = False
            self._set_views(ViewTotals(rows))

    def _last(self) -> float:
        return self._refreshed_at or 0.0

    def _set_views(self, totals: ViewTotals) -> None:
        with self._lock:
            self._views = totals
            self._refreshed_at = time.monotonic()

    def _query_writer(self, sql: str) -> list[list[Any]] | None:
        """Rows of `sql` from this process's own views writer; None when it is not serving."""
        try:
            info = orjson.loads(Path(endpoint_path(self.views_path)).read_bytes())
        except (OSError, ValueError):
            return None
        if info.get("pid") != os.getpid():
            return None
        conn = http.client.HTTPConnection(info.get("host", "127.0.0.1"), int(info["port"]), 10)
        try:
            conn.request(
                "POST",
                "/query",
                body=orjson.dumps({"sql": sql, "max_rows": 10_000, "timeout_s": 10}),
                headers={"Content-Type": "application/json", TOKEN_HEADER: str(info["token"])},
            )
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            return None  # the writer is closing
        finally:
            conn.close()
        body = orjson.loads(data)
        if resp.status != 200:
            raise RuntimeError(f"views query failed: {body.get('error')}")
        return body["rows"]

    def _report_dead_letters(self, *, force: bool = False) -> None:
        """One line per minute at most, when new dead letters were committed."""
        now = time.monotonic()
        if not force and now - self._dl_reported_at < DEAD_LETTER_REPORT_S:
            return
        with self._lock:
            views, before = self._views, self._dl_reported
        if views is None:
            return
        new = {k: v - before.get(k, 0) for k, v in views.dead.items() if v > before.get(k, 0)}
        self._dl_reported_at = now
        if not new:
            return
        with self._lock:
            self._dl_reported = dict(views.dead)
        total = int(sum(new.values()))
        top = sorted(new.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
        detail = ", ".join(f"{t}/{r}: {int(n)}" for (t, r), n in top)
        more = f", {len(new) - len(top)} more" if len(new) > len(top) else ""
        log.warning(
            "%s new dead letters since the last report (%s%s); see the dead_letters view",
            f"{total:,}",
            detail,
            more,
        )

    # -- views writer events -----------------------------------------------------------------

    def _views_opened(self, resume_state: Any) -> None:
        self._views_open = self._views_seen = True
        if resume_state is not None:
            log.info(
                "views: resumed at snapshot %s; commits after it were rolled back", resume_state
            )

    def _views_snapshot(self, seq: Any) -> None:
        self._snapshots += 1
        self._snap_unreported += 1
        now = time.monotonic()
        if self._snap_reported_at is None or now - self._snap_reported_at >= SNAPSHOT_REPORT_S:
            log.info(
                "snapshot taken: views at commit %s (%d snapshot%s since the last such line)",
                seq,
                self._snap_unreported,
                "" if self._snap_unreported == 1 else "s",
            )
            self._snap_reported_at = now
            self._snap_unreported = 0

    def _views_closed(self) -> None:
        self._views_open = False

    # -- progress ----------------------------------------------------------------------------

    def _clear_progress(self, _record: logging.LogRecord) -> bool:
        """Log filter: erase a drawn progress line so the log line starts at column 0."""
        out = self._progress_out
        if out is not None and self._progress_drawn:
            self._progress_drawn = False
            out.write("\r\x1b[K")
            out.flush()
        return True

    def _progress(self, *, final: bool = False) -> None:
        out = self._progress_out
        now = time.monotonic()
        if out is None or (not final and now - self._progress_at < 1.0):
            return
        with self._lock:
            done, first, ends = self._read_total, self._first_read, self._ends_at_start
            pos = self._own_positions() | self._next  # counted batches first: no double count
        if first is None or (not final and (ends is None or now - first < 1.0)):
            return
        self._progress_at = now
        ends = ends or {}
        remaining = (
            0 if final else sum(max(0, ends[tp] - off) for tp, off in pos.items() if tp in ends)
        )
        elapsed = max(now - first, 1e-6)
        rate = done / elapsed
        line = progress_line(done, done + remaining, rate, elapsed, final=final)
        out.write(("\r" + line + "\x1b[K\n") if final else ("\r" + line + "\x1b[K"))
        out.flush()
        self._progress_drawn = not final


def progress_line(done: int, total: int, rate: float, elapsed: float, *, final: bool) -> str:
    """The progress text: events done of total, rate and ETA (or the elapsed time when done)."""
    pct = 100.0 * done / total if total else 100.0
    head = f"{done:,} of {total:,} events ({pct:.1f} %), {rate:,.0f} events/s"
    if final:
        return f"caught up: {head}, {elapsed:.1f} s"
    remaining = max(0, total - done)
    eta = f"{remaining / rate:.0f} s" if rate > 0 else "unknown"
    return f"progress: {head}, ETA {eta}"


def _describe(parts: Iterable[tuple[str, int]]) -> str:
    by_topic: dict[str, list[int]] = {}
    for topic, part in sorted(parts):
        by_topic.setdefault(topic, []).append(part)
    return ", ".join(f"{t}[{','.join(map(str, ps))}]" for t, ps in by_topic.items())


class _Collector(Collector):
    """Renders the monitor's state at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self.m = monitor

    def collect(self) -> Iterable[Metric]:  # noqa: C901 - one metric family after another
        m = self.m
        ready, _ = m.readiness()
        yield GaugeMetricFamily("sferp_up", "1 while this sferp process runs.", value=1)
        yield GaugeMetricFamily(
            "sferp_ready", "1 when caught up within metrics.ready_max_lag.", value=int(ready)
        )
        info = GaugeMetricFamily(
            "sferp_info",
            "Process facts: version, process id, workers, whether it owns the views.",
            labels=["version", "process", "workers", "writer"],
        )
        info.add_metric(
            [
                _version(),
                str(m.process_id or 0),
                str(m.workers),
                "true" if m.writer else "false",
            ],
            1,
        )
        yield info
        yield GaugeMetricFamily(
            "sferp_start_time_seconds",
            "Unix time this process started the flow.",
            value=time.time() - (time.monotonic() - m._started),
        )
        yield from sf_stats.families()  # only once this process made a Salesforce client
        with m._lock:
            read = dict(m._read)
            event_ms = dict(m._event_ms)
            ends = dict(m._ends)
            views, floor = m._views, m._floor
        pos = m._own_positions()

        c = CounterMetricFamily(
            "sferp_source_messages",
            "Messages read from each input partition by this process (restarts at zero).",
            labels=["topic", "partition"],
        )
        for (topic, part), n in sorted(read.items()):
            c.add_metric([topic, str(part)], n)
        yield c
        busy = CounterMetricFamily(
            "sferp_worker_busy_seconds",
            "Wall-clock seconds each worker thread of this process spent inside each stage "
            "(a rate near 1 per worker: no headroom left).",
            labels=["worker", "stage"],
        )
        for worker, stage, _calls, seconds in m.stage_clock.totals():
            busy.add_metric([worker, stage], seconds)
        yield busy
        now = time.time()
        lag = GaugeMetricFamily(
            "sferp_event_lag_seconds",
            "Wall clock minus the event time of the newest event read from the topic.",
            labels=["topic"],
        )
        last = GaugeMetricFamily(
            "sferp_last_event_timestamp_seconds",
            "Event time of the newest event read from the topic (Unix seconds).",
            labels=["topic"],
        )
        for topic, ms in sorted(event_ms.items()):
            lag.add_metric([topic], now - ms / 1000)
            last.add_metric([topic], ms / 1000)
        yield lag
        yield last
        position = GaugeMetricFamily(
            "sferp_consumer_position",
            "Next offset this process reads in the partition.",
            labels=["topic", "partition"],
        )
        end = GaugeMetricFamily(
            "sferp_consumer_end_offset",
            "End offset of the partition at the last poll.",
            labels=["topic", "partition"],
        )
        clag = GaugeMetricFamily(
            "sferp_consumer_lag_messages",
            "End offset minus position: messages not read yet (approximate on Tansu).",
            labels=["topic", "partition"],
        )
        for tp, off in sorted(pos.items()):
            labels = [tp[0], str(tp[1])]
            position.add_metric(labels, off)
            if tp in ends:
                end.add_metric(labels, ends[tp])
                clag.add_metric(labels, max(0, ends[tp] - off))
        yield position
        yield end
        yield clag
        yield CounterMetricFamily(
            "sferp_lag_poll_errors",
            "Failed polls of the input partitions' end offsets.",
            value=m._lag_errors,
        )
        if not m.writer:
            # CONTRACT §5: every process serves these names. Their totals are the
            # views', known only to the writer's process: here they have no samples,
            # so that a sum over the cluster's processes counts each message once.
            for _, name, doc in STAT_COUNTERS:
                yield CounterMetricFamily(name, doc, labels=["topic"])
            yield CounterMetricFamily(
                "sferp_dead_letters", DEAD_LETTERS_HELP, labels=["topic", "reason"]
            )
            return
        yield from self._view_families(m, views, floor)

    def _view_families(
        self, m: Monitor, views: ViewTotals | None, floor: ViewTotals
    ) -> Iterable[Metric]:
        cur = views or ViewTotals()
        # Every input topic, also before its first message, and any other flow_stats row
        # (ERP extract files, for example).
        topics = sorted(set(m.topics) | {t for _, t in cur.stats} | {t for _, t in floor.stats})
        for col, name, doc in STAT_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["topic"])
            for topic in topics:
                key = (col, topic)
                c.add_metric([topic], max(cur.stats.get(key, 0), floor.stats.get(key, 0)))
            yield c
        dead = CounterMetricFamily(
            "sferp_dead_letters", DEAD_LETTERS_HELP, labels=["topic", "reason"]
        )
        for key in sorted(set(cur.dead) | set(floor.dead)):
            dead.add_metric(list(key), max(cur.dead.get(key, 0), floor.dead.get(key, 0)))
        yield dead
        # Also while the view numbers cannot be read: their age is what alerts on that
        # (SferpViewNumbersStale), since the business gauges below are then missing.
        yield CounterMetricFamily(
            "sferp_snapshots", "Snapshots of the views writer in this process.", value=m._snapshots
        )
        yield GaugeMetricFamily(
            "sferp_views_refresh_age_seconds",
            "Seconds since these view numbers were read.",
            value=time.monotonic() - (m._refreshed_at or m._started),
        )
        yield CounterMetricFamily(
            "sferp_views_refresh_errors",
            "Failed reads of the view numbers.",
            value=m._refresh_errors,
        )
        if views is None:
            return
        rows = GaugeMetricFamily("sferp_view_rows", "Rows in each view.", labels=["view"])
        for t in TABLES:
            rows.add_metric([t], views.rows.get(t, 0))
        yield rows
        exc = GaugeMetricFamily(
            "sferp_exceptions_open", "Open reconciliation exceptions by kind.", labels=["kind"]
        )
        for kind in sorted(set(EXCEPTION_KINDS) | set(views.exceptions)):
            exc.add_metric([kind], views.exceptions.get(kind, 0))
        yield exc
        stages = GaugeMetricFamily(
            "sferp_orders", "Salesforce Orders by stage (order_status).", labels=["stage"]
        )
        for stage in list(STAGES) + sorted(set(views.stages) - set(STAGES)):
            stages.add_metric([stage], views.stages.get(stage, 0))
        yield stages
        linked = GaugeMetricFamily(
            "sferp_orders_linked",
            "Orders linked to an ERP sales order, by whether the amounts match.",
            labels=["amount_matches"],
        )
        for k in sorted({"true", "false"} | set(views.linked)):
            linked.add_metric([k], views.linked.get(k, 0))
        yield linked
        yield GaugeMetricFamily(
            "sferp_orders_activated",
            "Orders whose Salesforce status is Activated.",
            value=views.activated,
        )
        yield GaugeMetricFamily(
            "sferp_orders_out_of_sync",
            "Activated orders whose amounts differ from the ERP or whose hand-off is overdue.",
            value=views.out_of_sync,
        )
        cum, buckets = 0.0, []
        for i, le in enumerate(QUOTE_TO_CASH_BUCKETS):
            cum += views.q2c.get(i, 0)
            buckets.append((str(float(le)), cum))
        cum += views.q2c.get(len(QUOTE_TO_CASH_BUCKETS), 0)
        buckets.append(("+Inf", cum))
        yield HistogramMetricFamily(
            "sferp_quote_to_cash_seconds",
            "Activation in Salesforce to ERP invoice, over the orders in order_status.",
            buckets=buckets,
            sum_value=views.q2c_sum,
        )


def _version() -> str:
    try:
        return metadata.version("sferp")
    except metadata.PackageNotFoundError:
        return "unknown"


class _ObservedViewsSink(WrappedSink):
    """The DuckDB views sink, unchanged, with the monitor told about commits and snapshots."""

    def __init__(self, inner: Any, monitor: Monitor) -> None:
        super().__init__(inner)
        self._m = monitor
        previous = inner.on_commit

        def on_commit(metas: list[Any]) -> None:
            if previous is not None:
                previous(metas)
            monitor.on_commit(metas)

        inner.on_commit = on_commit

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> StatefulSinkPartition:
        """Open the inner partition (it rolls back to `resume_state`), then observe it."""
        part = self._inner.build_part(step_id, for_part, resume_state)
        self._m._views_opened(resume_state)
        return _ObservedViewsPartition(part, self._m)


class _ObservedViewsPartition(StatefulSinkPartition):
    def __init__(self, inner: StatefulSinkPartition, monitor: Monitor) -> None:
        self._inner = inner
        self._m = monitor

    def write_batch(self, values: list[Any]) -> None:
        self._inner.write_batch(values)

    def snapshot(self) -> Any:
        seq = self._inner.snapshot()
        self._m._views_snapshot(seq)
        return seq

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._m._views_closed()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], monitor: Monitor) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.monitor = monitor


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes and probes are not logged (one every few seconds)."""

    def do_GET(self) -> None:
        """/metrics, /healthz, /readyz."""
        path = self.path.split("?", 1)[0]
        m = self.server.monitor
        if path == "/metrics":
            self._send(200, generate_latest(m.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ready, reason = m.readiness()
            self._send(200 if ready else 503, (reason + "\n").encode())
        elif path == "/":
            self._send(200, b"sferp: /metrics /healthz /readyz\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def recovery_has_state(recovery_dir: str | None) -> bool:
    """Whether a run with this recovery dir resumes (call before the store is initialised)."""
    if not recovery_dir:
        return False
    path = Path(recovery_dir)
    return path.is_dir() and any(path.iterdir())


def create_monitor(
    settings: Settings,
    *,
    views_path: str,
    bounded: bool,
    process_id: int | None,
    workers: int,
    resuming: bool,
) -> Monitor:
    """The monitor of one `sferp run` process (progress on stderr when it is a terminal)."""
    return Monitor(
        settings,
        views_path=views_path,
        bounded=bounded,
        process_id=process_id,
        workers=workers,
        writer=process_id in (None, 0),
        resuming=resuming,
        progress=sys.stderr if bounded and sys.stderr.isatty() else None,
    )
