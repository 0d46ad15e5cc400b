"""The reconcile dataflow: the composition root that wires operators to connectors.

    Kafka ─► decode+route ─► merge shards ─► orders ─► products ─► skus
                  │              │             │                   │
                  └──────────────┴─────────────┴───────────────────┴─► coordinator
                                                   ├─► DuckDB views
                                                   └─► reconciled.*, DLQ

Every stateful stage is keyed by a shard id (operators/routing.py) and handles
a shard's batch at once. The coordinator is the single key where the clock,
flow_stats and the exceptions meet (DESIGN.md).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import FixedPartitionedSource
from bytewax.operators import StatefulBatchLogic
from sferp.connectors.audit_log import AuditSettings, LineageTap
from sferp.connectors.duckdb_views import DuckDBViewsSink
from sferp.connectors.kafka import KafkaSink, KafkaSource
from sferp.connectors.kafka_outputs import ReconciledKafkaSink, mirror_path
from sferp.operators.coordinator import (
    LIVE_EMIT_INTERVAL_MS,
    Coordinator,
    CoordinatorState,
    OutputTopics,
)
from sferp.operators.decode import (
    IGNORED_MESSAGE,
    IGNORED_TRUNCATE,
    DecodeConfig,
    decode_batch,
)
from sferp.operators.facts import CHANGES, GLOBAL_IN, TICK, GlobalInput
from sferp.operators.merge import CONSUMED, DEAD, IGNORED, Merger, MergeState
from sferp.operators.routing import GLOBAL, MERGE, ORDERS, PRODUCTS, SHARDS, SKUS, shard
from sferp.operators.views import OrdersStage, ProductsStage, SkusStage

from sferp.config import Settings
from sferp.events import Change, DeadLetter, Ignored, RawMessage
from sferp.stage_time import StageClock, TimedSink, TimedSource
from sferp.wrapped import WrappedSource

log = logging.getLogger("sferp.flow")

_TICK_SHARDS = [f"{MERGE}{i:02d}" for i in range(SHARDS)]
_ERP_CONTROL_EVENTS = {  # kind of event -> what the log line says about it
    IGNORED_TRUNCATE: (
        "truncate (op t)",
        "; the ERP emptied the table, the views keep its rows until their deletes "
        "or a new snapshot arrive",
    ),
    IGNORED_MESSAGE: ("logical decoding message (op m)", ""),
}
CONTROL_LOG_INTERVAL_S = 60.0


class ControlEventLog:
    """Logs the ERP's `t` and `m` events, which are counted as ignored (CONTRACT §1.2):
    the first of a kind per topic at once, then at most one line a minute with the count."""

    def __init__(self, interval_s: float = CONTROL_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    def saw(self, event: Ignored, now: float) -> None:
        """Count one such event and log when the kind's line is due."""
        key = (event.topic, event.why)
        count = self._unlogged.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._unlogged[key] = count
            return
        self._last[key] = now
        self._unlogged[key] = 0
        kind, note = _ERP_CONTROL_EVENTS[event.why]
        log.warning(
            "erp %s on %s[%d] at offset %d%s: counted as ignored%s",
            kind,
            event.topic,
            event.partition,
            event.offset,
            f" ({count} such events since the last line)" if count > 1 else "",
            note,
        )


@dataclass
class FlowOptions:
    """What a run needs beyond the settings."""

    bounded: bool = False  # --until-caught-up
    views_path: str | None = None
    recovery: bool = False  # snapshots are only pickled when a recovery store exists
    writer: bool = True  # this process may own the DuckDB writer partition
    stop_event: threading.Event = field(default_factory=threading.Event)
    kafka_outputs: bool = True
    source: Any = None  # a Bytewax source of list[RawMessage] items instead of Kafka (tests)
    metrics: Any = None  # a sferp.metrics.Monitor observing the flow's edges, or None
    # Called when Bytewax lists the source's partitions: the cluster's processes are
    # connected by then (sferp/runner.py watches signals until it is).
    on_started: Callable[[], None] | None = None


class _AnnouncingSource(WrappedSource):
    """The flow's source, telling `on_started` when Bytewax first lists its partitions."""

    def __init__(self, inner: FixedPartitionedSource, on_started: Callable[[], None]) -> None:
        super().__init__(inner)
        self._on_started = on_started

    def list_parts(self) -> list[str]:
        """The inner source's partitions, after the announcement."""
        self._on_started()
        return super().list_parts()


def make_router(cfg: DecodeConfig, *, live: bool, max_future_skew_ms: int) -> Any:
    """Decode a batch of raw messages and route its outcomes to merge shards.

    Each change is stamped with its partition's clock as of its own message (the
    largest event time the partition has shown so far: this worker reads the
    partition, so the router remembers its clock between batches). A shard's
    de-duplication and lateness decisions use that stamp, so they are exact
    without hearing of other batches. Ticks with the partition clocks go to every
    merge shard only when a partition's clock enters a new minute (and at the
    first batch after a start): they let shards that see no change of that
    partition release de-duplication memory, which is kept in minute buckets. In
    live runs, where a batch is a few dozen messages, ticks to all 32 shards per
    batch were most of the items between the stages.
    """
    known: dict[tuple[str, int], int] = {}  # partition -> its clock so far
    control_log = ControlEventLog()
    ticked: dict[tuple[str, int], int] = {}  # partition -> minute of its last tick

    def route(batch: list[RawMessage]) -> list[tuple[str, tuple]]:
        if not batch:
            return []
        outcomes = decode_batch(batch, cfg)
        cap = (time.time() * 1000 + max_future_skew_ms) if live else float("inf")
        per_tp: dict[tuple[str, int], dict[str, tuple[list, list]]] = {}
        stats: dict[str, list[int]] = {}
        dead: list[DeadLetter] = []
        clocks: dict[tuple[str, int], int] = {}  # per partition (a Kafka batch has one)
        tp: tuple[str, int] | None = None
        slots: dict[str, tuple[list, list]] = {}
        clock = -1
        for o in outcomes:
            if tp is None or o.partition != tp[1] or o.topic != tp[0]:
                if tp is not None:
                    clocks[tp] = clock
                tp = (o.topic, o.partition)
                clock = clocks.get(tp, known.get(tp, -1))
                slots = per_tp.setdefault(tp, {})
            if type(o) is Change:
                t = o.event_time
                if clock < t <= cap:
                    clock = t
                dest = shard(MERGE, o.key)
                slot = slots.get(dest)
                if slot is None:
                    slot = slots[dest] = ([], [])
                slot[0].append(o)
                slot[1].append(clock)
                continue
            s = stats.get(o.topic)
            if s is None:
                s = stats[o.topic] = [0, 0, 0, 0, 0, 0]
            s[CONSUMED] += 1
            if type(o) is DeadLetter:
                s[DEAD] += 1
                dead.append(o)
            else:
                s[IGNORED] += 1
                if o.why in _ERP_CONTROL_EVENTS:
                    control_log.saw(o, time.monotonic())
                t = o.event_time
                if t is not None and clock < t <= cap:
                    clock = t
        if tp is not None:
            clocks[tp] = clock
        clocks = {k: v for k, v in clocks.items() if v >= 0}
        known.update(clocks)
        out: list[tuple[str, tuple]] = [
            (dest, (CHANGES, part, chs, stamps))
            for part, by_shard in per_tp.items()
            for dest, (chs, stamps) in by_shard.items()
        ]
        if any(ticked.get(k) != v // 60_000 for k, v in clocks.items()):
            for k, v in clocks.items():
                ticked[k] = v // 60_000
            out.extend((dest, (TICK, clocks)) for dest in _TICK_SHARDS)
        if stats or clocks:
            top = max(clocks.values()) if clocks else None
            gi = GlobalInput(stats, top, dead, {}, [], [], [], clocks)
            out.append((GLOBAL, (GLOBAL_IN, gi)))
        return out

    return route


class _Logic(StatefulBatchLogic):
    """Adapts a stage object (`process(payloads) -> outputs`) to Bytewax.

    Snapshots are pickled at once (the state keeps changing after the call) and
    only when a recovery store is configured. With a stage clock, batches and
    snapshots count as the stage's busy time (sferp/stage_time.py).
    """

    def __init__(
        self, stage: Any, state: Any, recovery: bool, clock: StageClock | None, name: str
    ) -> None:
        self.stage = stage
        self.state = state
        self.recovery = recovery
        self.process = stage.process if clock is None else clock.wrap(name, stage.process)
        self._pickle = self._pickle_state if clock is None else clock.wrap(name, self._pickle_state)

    def on_batch(self, values: list) -> tuple[list, bool]:
        return [self.process(values)], StatefulBatchLogic.RETAIN

    def _pickle_state(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)

    def snapshot(self) -> Any:
        return self._pickle() if self.recovery else None


class _CoordinatorLogic(StatefulBatchLogic):
    def __init__(
        self, coord: Coordinator, recovery: bool, live: bool, clock: StageClock | None = None
    ) -> None:
        self.coord = coord
        self.recovery = recovery
        self.live = live
        self._process, self._tick, self._flush, self._pickle = (
            (coord.process, coord.tick, coord.flush, self._pickle_state)
            if clock is None
            else (
                clock.wrap("coordinator", coord.process),
                clock.wrap("coordinator", coord.tick),
                clock.wrap("coordinator", coord.flush),
                clock.wrap("coordinator", self._pickle_state),
            )
        )

    def _pickle_state(self) -> bytes:
        return pickle.dumps(self.coord.state, protocol=pickle.HIGHEST_PROTOCOL)

    def on_batch(self, values: list) -> tuple[list, bool]:
        return [self._process([v[1] for v in values])], StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list, bool]:
        delta, kafka = self._tick()
        return ([(delta, kafka)] if delta or kafka else []), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list, bool]:
        kafka = self._flush()  # records waiting for the emit interval
        return ([({}, kafka)] if kafka else []), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        """Each second (the hand-off SLA), sooner when Kafka records wait to be emitted."""
        if not self.live:
            return None
        wait = self.coord.next_emit_s()
        return datetime.now(UTC) + timedelta(seconds=1 if wait is None else min(1.0, wait))

    def snapshot(self) -> Any:
        return self._pickle() if self.recovery else None


def _restore(resume: Any, default: Any) -> Any:
    return default if resume is None else pickle.loads(resume)


def _prefix(p: str) -> Any:
    return lambda kv: kv[0][0] == p


def _unwrap(kv: tuple[str, list]) -> list:
    return kv[1]


def build_flow(settings: Settings, opts: FlowOptions) -> Dataflow:
    """Build the reconcile dataflow for these settings."""
    fs = settings.flow
    topics = settings.topics
    roles = topics.input_roles()
    live = not opts.bounded
    rec = opts.recovery
    decode_cfg = DecodeConfig(
        topics=roles, max_message_bytes=fs.max_message_bytes, max_fields=fs.max_fields
    )
    sf_api = bool(settings.salesforce.instance_url)  # README "Connecting to Salesforce"
    if sf_api:
        from sferp.flows import salesforce as sfc

        decode_cfg = sfc.with_echo_rule(decode_cfg, settings)
    client_config = settings.kafka_client_config()
    # docs/data-protection.md: field encryption (None: nothing configured, zero cost)
    # and the audit log, both on the writer's side; key errors surface here, before Bytewax.
    from sferp.protect import protector_from_settings

    protector = protector_from_settings(settings)
    sec = settings.security
    audit = AuditSettings(retention_days=sec.audit_retention_days) if sec.audit_log else None

    flow = Dataflow("sferp_reconcile")
    source = opts.source or KafkaSource(
        settings.kafka.bootstrap,
        list(roles),
        start=settings.kafka.start,
        bounded=opts.bounded,
        batch_size=fs.batch_size,
        client_config=client_config,
        stop_event=opts.stop_event,
        linger_ms=fs.linger_ms,
    )
    if opts.on_started is not None and isinstance(source, FixedPartitionedSource):
        source = _AnnouncingSource(source, opts.on_started)
    probe = opts.metrics
    # Busy time per stage (`sferp_worker_busy_seconds_total`), only with metrics.
    clock: StageClock | None = probe.stage_clock if probe is not None else None
    if clock is not None and isinstance(source, FixedPartitionedSource):
        source = TimedSource(source, clock)
    raw = op.input("kafka_in", flow, source)
    router = make_router(decode_cfg, live=live, max_future_skew_ms=fs.max_future_skew_s * 1000)
    routed = op.flat_map("decode", raw, router if clock is None else clock.wrap("decode", router))
    if probe is not None:  # observe only: messages read, partition clocks
        op.inspect("metrics_in", raw, probe.on_input)
        op.inspect("metrics_decoded", routed, probe.on_routed)

    extract_topics: tuple[str, ...] = ()
    if settings.erp_extracts.path:  # ERP extract files beside Kafka (README "Batch extracts")
        from sferp.connectors.erp_extracts import source_from_settings
        from sferp.operators.extract_routing import make_extract_router

        ex_source = source_from_settings(
            settings.erp_extracts,
            views_path=opts.views_path or settings.views.path,
            bounded=opts.bounded,
            recovery=rec,
            batch_size=fs.batch_size,
            stop_event=opts.stop_event,
        )
        extract_topics = ex_source.topics
        ex_routed = op.flat_map(
            "extracts_route",
            op.input("extracts_in", flow, ex_source),
            make_extract_router(live=live, max_future_skew_ms=fs.max_future_skew_s * 1000),
        )
        if opts.metrics is not None:  # event lag of the extract pseudo-topics
            op.inspect("metrics_extracts", ex_routed, opts.metrics.on_routed)
        routed = op.merge("with_extracts", routed, ex_routed)

    if sf_api:  # polled changes join, gap markers wait for their re-reads
        routed = sfc.attach_salesforce(
            flow, routed, settings, bounded=opts.bounded, recovery=rec, stop_event=opts.stop_event
        )

    window_ms = fs.dedup_window_s * 1000
    lateness_ms = fs.allowed_lateness_s * 1000

    def merge_builder(resume: Any) -> _Logic:
        state = _restore(resume, None) or MergeState(window_ms)
        merger = Merger(state, lateness_ms)
        return _Logic(merger, state, rec, clock, "merge")

    merged = op.flat_map(
        "merge_out",
        op.stateful_batch("merge", op.filter("to_merge", routed, _prefix(MERGE)), merge_builder),
        _unwrap,
    )

    def stage_builder(name: str, cls: Any) -> Any:
        def build(resume: Any) -> _Logic:
            state = _restore(resume, {})
            logic = cls(state)
            return _Logic(logic, state, rec, clock, name)

        return build

    def stage(name: str, prefix: str, cls: Any, *ups: Stream) -> Stream:
        ins = [op.filter(f"{name}_in_{i}", up, _prefix(prefix)) for i, up in enumerate(ups)]
        joined = ins[0] if len(ins) == 1 else op.merge(f"{name}_in", *ins)
        return op.flat_map(
            f"{name}_out", op.stateful_batch(name, joined, stage_builder(name, cls)), _unwrap
        )

    orders = stage("orders", ORDERS, OrdersStage, merged)
    products = stage("products", PRODUCTS, ProductsStage, merged, orders)
    skus = stage("skus", SKUS, SkusStage, merged, products)

    out_topics = OutputTopics(
        topics.out_inventory, topics.out_orders, topics.out_exceptions, topics.dlq
    )

    def coord_builder(resume: Any) -> _CoordinatorLogic:
        state = _restore(resume, None) or CoordinatorState()
        coord = Coordinator(
            state,
            handoff_sla_ms=fs.handoff_sla_s * 1000,
            topics=out_topics,
            live=live,
            max_future_skew_ms=fs.max_future_skew_s * 1000,
            input_topics=tuple(roles) + extract_topics,
            kafka_outputs=opts.kafka_outputs,
            emit_interval_ms=LIVE_EMIT_INTERVAL_MS if live else 0,
        )
        if audit is not None:  # hands view rows' lineage to the writer's audit_log
            coord = LineageTap(coord)
        return _CoordinatorLogic(coord, rec, live, clock)

    to_global = [
        op.filter(f"global_in_{i}", up, _prefix(GLOBAL))
        for i, up in enumerate((routed, merged, orders, skus))
    ]
    if probe is not None:
        coord_builder = probe.wrap_coordinator(coord_builder)
    coordinated = op.stateful_batch("coordinator", op.merge("global_in", *to_global), coord_builder)
    deltas = op.map_value("deltas", coordinated, probe.stamp if probe else lambda out: out[0])
    views_sink = DuckDBViewsSink(
        opts.views_path or settings.views.path,
        writer=opts.writer,
        undo=opts.recovery,
        audit=audit,
        protect=protector,
        memory_limit_mb=settings.views.memory_limit_mb,
        nice=fs.background_nice,
    )
    observed = probe.views_sink(views_sink) if probe else views_sink
    op.output("views", deltas, observed if clock is None else TimedSink(observed, clock, "views"))
    if sf_api and settings.salesforce.writeback:
        dlq = sfc.dead_letter_writer(settings, opts.kafka_outputs)
        sfc.attach_writeback(deltas, settings, dlq, writer=opts.writer, recovery=rec)
    if opts.kafka_outputs:
        # One producer on the writer's process, keyed records in the coordinator's order;
        # with recovery, a mirror brings the compacted topics back to the snapshot on resume.
        records = op.filter_map_value("kafka_records", coordinated, lambda out: out[1] or None)
        kafka_sink = ReconciledKafkaSink(
            KafkaSink(
                settings.kafka.bootstrap,
                client_config=client_config,
                own_process=True,
                nice=fs.background_nice,
            ),
            compacted=(topics.out_inventory, topics.out_orders, topics.out_exceptions),
            mirror=mirror_path(opts.views_path or settings.views.path) if rec else None,
            writer=opts.writer,
            protect=protector.for_kafka(
                dlq=topics.dlq, orders=topics.out_orders, exceptions=topics.out_exceptions
            )
            if protector is not None
            else None,
        )
        op.output(
            "kafka_out",
            records,
            kafka_sink if clock is None else TimedSink(kafka_sink, clock, "kafka_out"),
        )
    return flow
